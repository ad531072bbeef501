"""Decode-length oracles: request lengths win, a real tiny LM decides greedily, else a fallback."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kvqueue.errors import ConfigError
from kvqueue.gpu.hashing import hash_token_blocks
from kvqueue.gpu.oracle import FallbackOracle, TransformersOracle, make_oracle
from kvqueue.gpu.request import Request

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY_VOCAB = 96
TINY_CONTEXT = 128
PROMPT = [5, 17, 33, 2, 90, 41, 7, 7, 12, 64, 3, 88, 19, 19, 40, 1, 72, 9]
NUM_REFERENCE_TOKENS = 24

MakeRequest = Callable[..., Request]


def request_from_tokens(tokens: list[int], request_id: str = "r") -> Request:
    return Request(
        request_id=request_id,
        num_prompt_tokens=len(tokens),
        block_hashes=tuple(hash_token_blocks(tokens)),
        token_ids=tuple(tokens),
    )


FALLBACK_PROMPTS = [list(range(n, n + 40)) for n in range(0, 400, 20)]


def fallback_lengths() -> list[list[Any]]:
    oracle = FallbackOracle()
    return [list(oracle.decode_length(request_from_tokens(t))) for t in FALLBACK_PROMPTS]


# --- the fallback -------------------------------------------------------------------------


def test_fallback_is_the_same_in_another_process_and_says_fallback() -> None:
    here = fallback_lengths()
    script = "import json, tests.test_oracle as t; print(json.dumps(t.fallback_lengths()))"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == here
    assert {source for _, source in here} == {"fallback"}
    assert len({tokens for tokens, _ in here}) > 5  # a spread, not one constant
    assert all(1 <= tokens <= FallbackOracle().max_new_tokens for tokens, _ in here)


def test_fallback_lets_the_request_length_win(make_request: MakeRequest) -> None:
    assert FallbackOracle().decode_length(make_request(40, max_tokens=7)) == (7, "request")


def test_no_decode_model_means_the_fallback() -> None:
    assert isinstance(make_oracle(None), FallbackOracle)
    assert isinstance(make_oracle(""), FallbackOracle)


def test_missing_model_path_falls_back_with_a_warning_naming_it(
    tmp_path: Path, make_request: MakeRequest, caplog: pytest.LogCaptureFixture
) -> None:
    missing = str(tmp_path / "no-such-model")
    with caplog.at_level(logging.WARNING, logger="kvqueue.gpu.oracle"):
        oracle = make_oracle(missing, max_new_tokens=64)
    assert isinstance(oracle, FallbackOracle)
    assert oracle.max_new_tokens == 64
    assert missing in caplog.text
    assert "does not exist" in caplog.text
    assert oracle.decode_length(make_request(40))[1] == "fallback"


def test_missing_torch_falls_back_with_a_warning_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with caplog.at_level(logging.WARNING, logger="kvqueue.gpu.oracle"):
        oracle = make_oracle(str(tmp_path))
    assert isinstance(oracle, FallbackOracle)
    assert "needs torch and transformers" in caplog.text
    assert "import of torch halted" in caplog.text


def test_model_oracle_constructor_does_no_io_and_load_names_the_missing_path() -> None:
    oracle = TransformersOracle("/nonexistent/decode-model")
    with pytest.raises(ConfigError, match="'/nonexistent/decode-model' does not exist"):
        oracle.load()


# --- a real (tiny, random) causal LM ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with a 96-token vocabulary and no EOS, saved like any checkpoint."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_CONTEXT,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> list[int]:
    """What `generate` yields greedily from PROMPT, called directly, with no EOS to stop it."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    input_ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=NUM_REFERENCE_TOKENS,
            pad_token_id=0,
        )
    generated = output[0, len(PROMPT) :].tolist()
    assert len(generated) == NUM_REFERENCE_TOKENS
    return generated


def first_new_token_at_or_after(tokens: list[int], start: int) -> tuple[int, int]:
    """(position, token) of the first token at or after `start` not seen earlier."""
    for position in range(start, len(tokens)):
        if tokens[position] not in tokens[:position]:
            return position, tokens[position]
    raise AssertionError(f"no fresh token after position {start} in {tokens}")


def test_model_counts_greedy_tokens_up_to_and_including_eos(
    tiny_model_dir: Path, reference: list[int]
) -> None:
    position, eos = first_new_token_at_or_after(reference, 3)
    oracle = TransformersOracle(str(tiny_model_dir), max_new_tokens=50, eos_token_id=eos)

    tokens, source = oracle.decode_length(request_from_tokens(PROMPT))

    assert tokens == position + 1
    assert source == f"model:{tiny_model_dir}"


def test_model_without_eos_generates_up_to_the_cap(
    tiny_model_dir: Path, reference: list[int]
) -> None:
    oracle = TransformersOracle(str(tiny_model_dir), max_new_tokens=NUM_REFERENCE_TOKENS)
    assert oracle.decode_length(request_from_tokens(PROMPT)) == (
        len(reference),
        f"model:{tiny_model_dir}",
    )


def test_model_uses_the_eos_of_its_generation_config(
    tiny_model_dir: Path, reference: list[int], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    position, eos = first_new_token_at_or_after(reference, 5)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.generation_config.eos_token_id = eos
    model.save_pretrained(tmp_path)

    oracle = make_oracle(str(tmp_path), max_new_tokens=50)

    assert isinstance(oracle, TransformersOracle)
    assert oracle.eos_token_ids == (eos,)
    assert oracle.decode_length(request_from_tokens(PROMPT))[0] == position + 1


def test_repeated_prompt_is_answered_from_the_cache(tiny_model_dir: Path) -> None:
    oracle = TransformersOracle(str(tiny_model_dir), max_new_tokens=12)
    first = oracle.decode_length(request_from_tokens(PROMPT, "a"))
    again = [oracle.decode_length(request_from_tokens(PROMPT, f"b{i}")) for i in range(3)]
    assert again == [first] * 3
    assert oracle.num_generations == 1
    oracle.decode_length(request_from_tokens([*PROMPT, 4], "c"))
    assert oracle.num_generations == 2


def test_prompts_differing_only_in_the_partial_block_are_cached_apart(
    tiny_model_dir: Path, reference: list[int]
) -> None:
    _, eos = first_new_token_at_or_after(reference, 3)
    oracle = TransformersOracle(str(tiny_model_dir), max_new_tokens=12, eos_token_id=eos)
    # 18 tokens: one full block, then two tokens that no block hash covers.
    other = [*PROMPT[:-1], (PROMPT[-1] + 1) % TINY_VOCAB]
    oracle.decode_length(request_from_tokens(PROMPT))
    oracle.decode_length(request_from_tokens(other))
    assert oracle.num_generations == 2


def test_request_max_tokens_wins_without_running_the_model(tiny_model_dir: Path) -> None:
    oracle = TransformersOracle(str(tiny_model_dir))
    request = replace(request_from_tokens(PROMPT), max_tokens=3)
    assert oracle.decode_length(request) == (3, "request")
    assert oracle.num_generations == 0


def test_request_without_token_ids_gets_the_fallback_and_says_so(tiny_model_dir: Path) -> None:
    fallback = FallbackOracle(mean_tokens=20, max_new_tokens=40)
    oracle = TransformersOracle(str(tiny_model_dir), max_new_tokens=40, fallback=fallback)
    request = replace(request_from_tokens(PROMPT), token_ids=None)
    assert oracle.decode_length(request) == (
        fallback.decode_length(request)[0],
        "fallback:no-token-ids",
    )
    assert oracle.num_generations == 0


def test_token_ids_outside_the_model_vocabulary_get_the_fallback(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    oracle = TransformersOracle(str(tiny_model_dir))
    with caplog.at_level(logging.WARNING, logger="kvqueue.gpu.oracle"):
        _, source = oracle.decode_length(request_from_tokens([*PROMPT, 100_000]))
    assert source == "fallback:out-of-vocab"
    assert f"{TINY_VOCAB} tokens" in caplog.text


def test_prompt_filling_the_model_context_gets_the_fallback(tiny_model_dir: Path) -> None:
    oracle = TransformersOracle(str(tiny_model_dir))
    long_prompt = [i % TINY_VOCAB for i in range(TINY_CONTEXT)]
    assert oracle.decode_length(request_from_tokens(long_prompt))[1] == "fallback:prompt-too-long"


def test_generation_is_capped_by_the_room_left_in_the_model_context(
    tiny_model_dir: Path,
) -> None:
    oracle = TransformersOracle(str(tiny_model_dir), max_new_tokens=50)
    near_full = [i % TINY_VOCAB for i in range(TINY_CONTEXT - 5)]
    assert oracle.decode_length(request_from_tokens(near_full)) == (5, oracle.source)
