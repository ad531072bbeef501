"""Decode-length oracles: how many tokens a request generates.

(a) the request's own `max_tokens` (trace `output_length`) when given;
(b) a real transformers causal LM, greedy until EOS or the cap (see `TransformersOracle`);
(c) a deterministic fallback seeded by the prompt's hash.
Every oracle says which one decided (`decode_length` returns ``(tokens, source)``): the source is
``"request"``, ``"model:<name>"``, or starts with ``"fallback"`` (``"fallback:<why>"`` when a
model oracle could not run the model on that request). `make_oracle` builds one from settings.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from kvqueue.errors import ConfigError
from kvqueue.gpu.model_names import looks_like_local_path
from kvqueue.gpu.request import Request

logger = logging.getLogger(__name__)

SOURCE_REQUEST = "request"
SOURCE_FALLBACK = "fallback"
DEFAULT_FALLBACK_MEAN_TOKENS = 128
DEFAULT_MAX_NEW_TOKENS = 512


class DecodeLengthOracle(Protocol):
    def decode_length(self, request: Request) -> tuple[int, str]: ...


def prompt_digest(request: Request) -> bytes:
    """A stable digest of the prompt: its last block hash, or its tokens, or its id."""
    if request.block_hashes:
        return hashlib.sha256(
            request.block_hashes[-1] + str(request.num_prompt_tokens).encode()
        ).digest()
    if request.token_ids is not None:
        return hashlib.sha256(repr(request.token_ids).encode()).digest()
    return hashlib.sha256(request.request_id.encode()).digest()


class FallbackOracle:
    """Request-given length, else a deterministic draw seeded by the prompt's digest.

    The draw is geometric-like around `mean_tokens`, capped at `max_new_tokens`; the same
    prompt always gets the same length, in every process.
    """

    def __init__(
        self,
        mean_tokens: int = DEFAULT_FALLBACK_MEAN_TOKENS,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> None:
        if mean_tokens <= 0:
            raise ValueError(f"mean_tokens must be positive, got {mean_tokens}")
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        self.mean_tokens = mean_tokens
        self.max_new_tokens = max_new_tokens

    def decode_length(self, request: Request) -> tuple[int, str]:
        if request.max_tokens is not None:
            return request.max_tokens, SOURCE_REQUEST
        rng = random.Random(prompt_digest(request))
        draw = 1 + int(rng.expovariate(1.0 / self.mean_tokens))
        return min(draw, self.max_new_tokens), SOURCE_FALLBACK


class TransformersOracle:
    """Request-given length, else what a real causal LM generates greedily for the prompt.

    Invariants: a request's `max_tokens` always wins and the model is not run. Otherwise the
    model decodes greedily from the request's `token_ids` until an EOS token or
    `max_new_tokens`, and the number of generated tokens (EOS included: it costs a decode step
    like any other) is cached under the digest of those token ids, so a repeated prompt gets the
    same answer without running the model again. Requests the model cannot read (no token ids,
    an id outside its vocabulary, no room left in its context) get `fallback`'s deterministic
    draw with source ``"fallback:<why>"``; nothing raises per request.

    The constructor does no I/O: the model is loaded by `load()` or on first use.
    """

    def __init__(
        self,
        model_name_or_path: str,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        eos_token_id: int | Sequence[int] | None = None,
        fallback: FallbackOracle | None = None,
    ) -> None:
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        self.model_name = model_name_or_path
        self.max_new_tokens = max_new_tokens
        self.source = f"model:{model_name_or_path}"
        self.fallback = fallback or FallbackOracle(max_new_tokens=max_new_tokens)
        self.eos_token_ids: tuple[int, ...] = _as_ids(eos_token_id)
        self.num_generations = 0  # model runs, i.e. cache misses
        self._explicit_eos = eos_token_id is not None
        self._model: Any = None
        self._length_by_prompt: dict[bytes, int] = {}
        self._warned: set[str] = set()

    def load(self) -> TransformersOracle:
        """Load the model (once). Raises ImportError without torch/transformers, ConfigError
        for a missing local path, and whatever transformers raises for an unusable model."""
        if self._model is not None:
            return self
        path = Path(self.model_name).expanduser()
        if not path.exists() and looks_like_local_path(self.model_name):
            raise ConfigError(f"decode model path {self.model_name!r} does not exist")
        import torch  # noqa: F401  (fail early and clearly when torch is missing)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            str(path) if path.exists() else self.model_name
        )
        model.eval()
        if not self._explicit_eos:
            configured = model.generation_config.eos_token_id
            if configured is None:
                configured = getattr(model.config, "eos_token_id", None)
            self.eos_token_ids = _as_ids(configured)
        self._model = model
        return self

    def decode_length(self, request: Request) -> tuple[int, str]:
        if request.max_tokens is not None:
            return request.max_tokens, SOURCE_REQUEST
        token_ids = request.token_ids
        if not token_ids:
            return self._fall_back(request, "no-token-ids")
        key = hashlib.sha256(repr(tuple(token_ids)).encode()).digest()
        cached = self._length_by_prompt.get(key)
        if cached is not None:
            return cached, self.source
        model = self.load()._model
        vocab_size = model.get_input_embeddings().num_embeddings
        if min(token_ids) < 0 or max(token_ids) >= vocab_size:
            return self._fall_back(request, "out-of-vocab", f"the model has {vocab_size} tokens")
        max_positions = getattr(model.config, "max_position_embeddings", None)
        cap = self.max_new_tokens
        if max_positions is not None:
            cap = min(cap, max_positions - len(token_ids))
        if cap < 1:
            return self._fall_back(
                request, "prompt-too-long", f"the model's context is {max_positions} tokens"
            )
        length = self._generate(token_ids, cap)
        self._length_by_prompt[key] = length
        return length, self.source

    def _generate(self, token_ids: Sequence[int], cap: int) -> int:
        import torch
        from transformers import GenerationConfig

        model = self._model
        input_ids = torch.tensor([list(token_ids)], dtype=torch.long, device=model.device)
        eos = list(self.eos_token_ids)
        config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=cap,
            eos_token_id=eos or None,
            pad_token_id=eos[0] if eos else 0,
        )
        with torch.inference_mode():
            output = model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
            )
        self.num_generations += 1
        generated = output[0, input_ids.shape[1] :].tolist()
        # One sequence is never padded, but count up to the first EOS to be sure of it.
        for position, token in enumerate(generated):
            if token in self.eos_token_ids:
                return position + 1
        return len(generated)

    def _fall_back(self, request: Request, why: str, detail: str = "") -> tuple[int, str]:
        if why not in self._warned:
            self._warned.add(why)
            logger.warning(
                "decode model %s cannot read request %r (%s%s); using the deterministic "
                "fallback for such requests (source 'fallback:%s')",
                self.model_name,
                request.request_id,
                why,
                f": {detail}" if detail else "",
                why,
            )
        tokens, _ = self.fallback.decode_length(request)
        return tokens, f"{SOURCE_FALLBACK}:{why}"


def make_oracle(
    decode_model: str | None,
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    fallback_mean_tokens: int = DEFAULT_FALLBACK_MEAN_TOKENS,
    eos_token_id: int | Sequence[int] | None = None,
) -> DecodeLengthOracle:
    """The oracle for a `decode_model` setting (``KVQ_DECODE_MODEL``).

    None or "" → `FallbackOracle`. A model name or path → a loaded `TransformersOracle`; if it
    cannot be loaded (torch or transformers missing, path missing, broken checkpoint) the run
    still goes on with `FallbackOracle`, after a logged warning that names the model and why.
    """
    fallback = FallbackOracle(fallback_mean_tokens, max_new_tokens)
    if not decode_model:
        return fallback
    oracle = TransformersOracle(decode_model, max_new_tokens, eos_token_id, fallback)
    try:
        return oracle.load()
    except ImportError as exc:
        logger.warning(
            "decode model %r needs torch and transformers, which cannot be imported (%s: %s); "
            "decode lengths come from the deterministic fallback instead (source 'fallback')",
            decode_model,
            type(exc).__name__,
            exc,
        )
        return fallback
    except Exception as exc:  # any other load failure degrades the same way, loudly
        logger.warning(
            "decode model %r cannot be loaded (%s: %s); decode lengths come from the "
            "deterministic fallback instead (source 'fallback')",
            decode_model,
            type(exc).__name__,
            exc,
        )
        return fallback


def _as_ids(token_id: int | Sequence[int] | None) -> tuple[int, ...]:
    if token_id is None:
        return ()
    if isinstance(token_id, int):
        return (token_id,)
    return tuple(int(t) for t in token_id)
