"""Workloads: synthetic generators and prompt files, each a `list[Request]` in dispatch order.

Synthetic workloads draw token ids directly (no tokenizer) from a ``random.Random(seed)`` they
create and pass down, so one seed gives the same requests — ids, tokens, hashes, order — for
every strategy and in every process. Their block hashes are always
``hash_token_blocks(token_ids, seed=hash_seed, extra_keys=extra_keys)``.
Every generated request arrives at 0 (as fast as possible);
`kvqueue.workloads.arrivals.retime` gives Poisson or scaled arrivals.

| workload             | requests | shared prefix    | prompt tokens  | output | notes            |
|----------------------|----------|------------------|----------------|--------|------------------|
| shared-prefix        | 64 × 16  | 2,048 per group  | 2,048 + 128    | 256    | SGLang defaults  |
| shared-prefix-medium | 32 × 8   | 1,024 per group  | 1,024 + 128    | 32     | 2,048 sys blocks |
| shared-prefix-small  | 8 × 8    | 512 per group    | 512 + 64       | 32     | 256 sys blocks   |
| shared-prefix-tiny   | 4 × 4    | 256 per group    | 256 + 32       | 16     | demos, tests     |
| multi-turn           | 16 × 4   | the conversation | 64 … 640       | 128    | turn-major order |
| no-sharing           | 64       | none             | 576            | 32     | sized as "small" |

The scaled presets are sized for the default 924-block GPU: "small"'s system prompts (256
blocks) fit one GPU, so every strategy ends up hitting; "medium"'s (2,048 blocks) overflow one
GPU but fit four, so routing decides whether groups thrash or partition across workers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvqueue.errors import InputFormatError
from kvqueue.gpu.hashing import DEFAULT_HASH_SEED, hash_token_blocks, salt_keys
from kvqueue.gpu.request import Request
from kvqueue.workloads.traces import as_int, as_number, iter_text_lines, parse_json_object

DEFAULT_VOCAB_SIZE = 32_000  # Llama 2's vocabulary

SHARED_PREFIX_PRESETS: dict[str, dict[str, int]] = {
    "shared-prefix": {
        "num_groups": 64,
        "prompts_per_group": 16,
        "system_prompt_len": 2048,
        "question_len": 128,
        "output_len": 256,
    },
    "shared-prefix-medium": {
        "num_groups": 32,
        "prompts_per_group": 8,
        "system_prompt_len": 1024,
        "question_len": 128,
        "output_len": 32,
    },
    "shared-prefix-small": {
        "num_groups": 8,
        "prompts_per_group": 8,
        "system_prompt_len": 512,
        "question_len": 64,
        "output_len": 32,
    },
    "shared-prefix-tiny": {
        "num_groups": 4,
        "prompts_per_group": 4,
        "system_prompt_len": 256,
        "question_len": 32,
        "output_len": 16,
    },
}


# -- building blocks ---------------------------------------------------------------------------
def random_tokens(
    rng: random.Random, length: int, vocab_size: int = DEFAULT_VOCAB_SIZE
) -> list[int]:
    """`length` token ids drawn uniformly from ``range(vocab_size)``."""
    return [rng.randrange(vocab_size) for _ in range(length)]


def synthetic_request(
    request_id: str,
    token_ids: Sequence[int],
    max_tokens: int | None,
    hash_seed: str = DEFAULT_HASH_SEED,
    extra_keys: Sequence[str] = (),
) -> Request:
    """A request for `token_ids` with its chained block hashes, arriving at 0."""
    tokens = tuple(token_ids)
    return Request(
        request_id=request_id,
        num_prompt_tokens=len(tokens),
        block_hashes=tuple(hash_token_blocks(tokens, seed=hash_seed, extra_keys=extra_keys)),
        max_tokens=max_tokens,
        arrival_ms=0.0,
        token_ids=tokens,
    )


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


def _check_non_negative(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


# -- generators --------------------------------------------------------------------------------
def shared_prefix(
    num_groups: int = 64,
    prompts_per_group: int = 16,
    system_prompt_len: int = 2048,
    question_len: int = 128,
    output_len: int = 256,
    num_requests: int | None = None,
    seed: int = 0,
    hash_seed: str = DEFAULT_HASH_SEED,
    extra_keys: Sequence[str] = (),
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> list[Request]:
    """SGLang's generated-shared-prefix benchmark: groups of prompts behind one system prompt.

    Prompt = the group's system prompt + a question of its own, both random tokens; requests of
    all groups are shuffled together. Requests of one group share exactly their first
    ``system_prompt_len // 16`` blocks (the block straddling system prompt and question differs);
    requests of different groups share none (barring a 16-token coincidence). With
    `num_requests`, ``num_groups = ceil(num_requests / prompts_per_group)`` and the last group is
    cut short. Ids are ``sp-g<group>-p<prompt>``.
    """
    if num_requests is not None:
        _check_positive(num_requests=num_requests, prompts_per_group=prompts_per_group)
        num_groups = math.ceil(num_requests / prompts_per_group)
    _check_positive(
        num_groups=num_groups, prompts_per_group=prompts_per_group, question_len=question_len
    )
    _check_non_negative(system_prompt_len=system_prompt_len, output_len=output_len)
    rng = random.Random(seed)
    total = num_requests if num_requests is not None else num_groups * prompts_per_group
    requests: list[Request] = []
    for group in range(num_groups):
        system = random_tokens(rng, system_prompt_len, vocab_size)
        for prompt in range(min(prompts_per_group, total - len(requests))):
            tokens = system + random_tokens(rng, question_len, vocab_size)
            request_id = f"sp-g{group:03d}-p{prompt:03d}"
            requests.append(
                synthetic_request(request_id, tokens, output_len, hash_seed, extra_keys)
            )
    rng.shuffle(requests)
    return requests


def multi_turn(
    num_conversations: int = 16,
    turns: int = 4,
    user_len: int = 64,
    answer_len: int = 128,
    num_requests: int | None = None,
    seed: int = 0,
    hash_seed: str = DEFAULT_HASH_SEED,
    extra_keys: Sequence[str] = (),
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> list[Request]:
    """Chat sessions: turn k+1's prompt = turn k's prompt + its answer + a new user message.

    Hence turn k's block hashes are a prefix of turn k+1's. Turn k's `max_tokens` is
    `answer_len`, the length of the synthetic answer the next turn carries; turn k's prompt has
    ``(k + 1) × user_len + k × answer_len`` tokens. Requests come turn-major — every
    conversation's turn 0 (in shuffled order), then every turn 1, … — so a user "replies" only
    after the other conversations had their turn. With `num_requests`,
    ``num_conversations = ceil(num_requests / turns)`` and the list is cut after `num_requests`
    (the last turns of some conversations go; every kept turn keeps its predecessors).
    Ids are ``mt-c<conversation>-t<turn>``.
    """
    if num_requests is not None:
        _check_positive(num_requests=num_requests, turns=turns)
        num_conversations = math.ceil(num_requests / turns)
    _check_positive(num_conversations=num_conversations, turns=turns, user_len=user_len)
    _check_non_negative(answer_len=answer_len)
    rng = random.Random(seed)
    histories: list[list[int]] = [[] for _ in range(num_conversations)]
    requests: list[Request] = []
    for turn in range(turns):
        order = list(range(num_conversations))
        rng.shuffle(order)
        for conversation in order:
            history = histories[conversation]
            if turn:
                history.extend(random_tokens(rng, answer_len, vocab_size))
            history.extend(random_tokens(rng, user_len, vocab_size))
            request_id = f"mt-c{conversation:03d}-t{turn}"
            requests.append(
                synthetic_request(request_id, history, answer_len, hash_seed, extra_keys)
            )
    return requests[:num_requests] if num_requests is not None else requests


def no_sharing(
    num_requests: int = 64,
    prompt_len: int = 576,
    output_len: int = 32,
    seed: int = 0,
    hash_seed: str = DEFAULT_HASH_SEED,
    extra_keys: Sequence[str] = (),
    vocab_size: int = DEFAULT_VOCAB_SIZE,
) -> list[Request]:
    """Control workload: random prompts of which no two share a block.

    Guaranteed, not just likely: the first two tokens of prompt i spell ``divmod(i,
    vocab_size)``, so first blocks differ and, the hashes being chained, so do all later ones.
    Defaults match "shared-prefix-small" (576-token prompts, 32 output tokens, 64 requests).
    Ids are ``ns-<index>``.
    """
    _check_positive(num_requests=num_requests, prompt_len=prompt_len)
    _check_non_negative(output_len=output_len)
    if num_requests > vocab_size**2:
        raise ValueError(f"num_requests must be <= vocab_size**2 = {vocab_size**2:,}")
    rng = random.Random(seed)
    requests = []
    for index in range(num_requests):
        tokens = random_tokens(rng, prompt_len, vocab_size)
        tokens[:2] = divmod(index, vocab_size)[: min(2, prompt_len)]
        request_id = f"ns-{index:05d}"
        requests.append(synthetic_request(request_id, tokens, output_len, hash_seed, extra_keys))
    return requests


# -- prompt files ------------------------------------------------------------------------------
def _is_jsonl(path: Path) -> bool:
    """``.jsonl`` files, or files whose first non-blank line starts with ``{``."""
    if path.suffix.lower() == ".jsonl":
        return True
    for _, text in iter_text_lines(path):
        if text.strip():
            return text.lstrip().startswith("{")
    return False


def _parse_prompt_line(
    path: Path, lineno: int, text: str, jsonl: bool
) -> tuple[str, int | None, float, str | None]:
    """(prompt, max_tokens or None, arrival ms, tenant salt or None) of one non-blank line."""
    if not jsonl:
        return text, None, 0.0, None
    data = parse_json_object(path, lineno, text)
    prompt = data.get("prompt")
    if not isinstance(prompt, str):
        raise InputFormatError(f"{path}:{lineno}: 'prompt' must be a string, got {prompt!r}")
    max_tokens = data.get("max_tokens")
    if max_tokens is not None:
        max_tokens = as_int(path, lineno, "max_tokens", max_tokens, minimum=0)
    arrival = data.get("arrival")
    arrival_ms = 0.0 if arrival is None else as_number(path, lineno, "arrival", arrival) * 1000
    salt = data.get("cache_salt", data.get("tenant"))
    if salt is not None and (not isinstance(salt, str) or not salt):
        field = "cache_salt" if "cache_salt" in data else "tenant"
        raise InputFormatError(
            f"{path}:{lineno}: {field!r} must be a non-empty string, got {salt!r}"
        )
    return prompt, max_tokens, arrival_ms, salt


def read_prompts(
    path: str | Path,
    tokenize: Callable[[str], list[int]],
    max_tokens: int | None = None,
    hash_seed: str = DEFAULT_HASH_SEED,
    extra_keys: Sequence[str] = (),
    id_prefix: str = "prompt",
    cache_salt: str | None = None,
) -> list[Request]:
    """Requests from a prompts file, in file order.

    Text: one prompt per line. JSONL (``.jsonl``, or a first non-blank line starting with
    ``{``): objects with `prompt`, optional `max_tokens` (overriding the `max_tokens` argument),
    optional `arrival` in seconds (default 0) and an optional tenant salt: `cache_salt`, or
    `tenant` (its name is the salt when `cache_salt` is absent), overriding the `cache_salt`
    argument. Requests with different salts never share a block hash (`salt_keys`). Blank
    lines are skipped in both formats; a prompt that is empty, whitespace or tokenizes to
    nothing raises `InputFormatError` naming the file and line, as does any malformed line.
    Ids are ``<id_prefix>-<line number>``.
    """
    path = Path(path)
    jsonl = _is_jsonl(path)
    requests: list[Request] = []
    for lineno, text in iter_text_lines(path):
        if not text.strip():
            continue
        prompt, line_max_tokens, arrival_ms, line_salt = _parse_prompt_line(
            path, lineno, text, jsonl
        )
        salted = (*extra_keys, *salt_keys(line_salt if line_salt is not None else cache_salt))
        if not prompt.strip():
            raise InputFormatError(f"{path}:{lineno}: empty prompt")
        tokens = tuple(tokenize(prompt))
        if not tokens:
            raise InputFormatError(f"{path}:{lineno}: prompt {prompt[:40]!r} tokenizes to nothing")
        request = Request(
            request_id=f"{id_prefix}-{lineno}",
            num_prompt_tokens=len(tokens),
            block_hashes=tuple(hash_token_blocks(tokens, seed=hash_seed, extra_keys=salted)),
            max_tokens=line_max_tokens if line_max_tokens is not None else max_tokens,
            arrival_ms=arrival_ms,
            token_ids=tokens,
        )
        requests.append(request)
    if not requests:
        raise InputFormatError(f"{path}:1: no prompts in the file")
    return requests


# -- registry ----------------------------------------------------------------------------------
WorkloadFactory = Callable[..., list[Request]]


def _registry() -> dict[str, tuple[WorkloadFactory, dict[str, Any]]]:
    entries: dict[str, tuple[WorkloadFactory, dict[str, Any]]] = {
        name: (shared_prefix, dict(preset)) for name, preset in SHARED_PREFIX_PRESETS.items()
    }
    entries["multi-turn"] = (multi_turn, {})
    entries["no-sharing"] = (no_sharing, {})
    return entries


WORKLOADS = _registry()


def make_workload(
    name: str, num_requests: int | None = None, seed: int = 0, **options: Any
) -> list[Request]:
    """The named workload (see the module table); `options` override its parameters.

    `num_requests` None keeps the workload's own size; otherwise shared-prefix and multi-turn
    grow or shrink their groups/conversations to match (see their docstrings). An unknown name
    raises ValueError listing the valid ones; an unknown option raises TypeError.
    """
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; valid: {', '.join(sorted(WORKLOADS))}")
    factory, defaults = WORKLOADS[name]
    params = {**defaults, **options, "seed": seed}
    if num_requests is not None:
        params["num_requests"] = num_requests
    return factory(**params)
