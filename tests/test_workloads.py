"""Synthetic workloads, prompt files and arrival processes."""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
from collections import Counter, defaultdict
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvqueue.errors import InputFormatError
from kvqueue.gpu.hashing import DEFAULT_HASH_SEED, hash_token_blocks, salt_keys
from kvqueue.gpu.request import Request
from kvqueue.report.metrics import ideal_hit_rate
from kvqueue.workloads.arrivals import ARRIVAL_PROCESSES, poisson_times, retime
from kvqueue.workloads.options import add_workload_arguments, build_requests
from kvqueue.workloads.synthetic import (
    SHARED_PREFIX_PRESETS,
    WORKLOADS,
    make_workload,
    multi_turn,
    no_sharing,
    read_prompts,
    shared_prefix,
)

FIXTURES = Path(__file__).parent / "fixtures"


def char_tokens(text: str) -> list[int]:
    """A deterministic stand-in tokenizer: one token per character."""
    return [ord(c) for c in text]


def common_prefix(a: Request, b: Request) -> int:
    n = 0
    for x, y in zip(a.block_hashes, b.block_hashes, strict=False):
        if x != y:
            break
        n += 1
    return n


def group_of(request: Request) -> str:
    return request.request_id.split("-p")[0]


# -- determinism ---------------------------------------------------------------------------------
SMALL_WORKLOADS = ["shared-prefix-tiny", "shared-prefix-small", "multi-turn", "no-sharing"]


@pytest.mark.parametrize("name", SMALL_WORKLOADS)
def test_same_seed_gives_the_same_requests(name):
    assert make_workload(name, seed=7) == make_workload(name, seed=7)


@pytest.mark.parametrize("name", SMALL_WORKLOADS)
def test_different_seeds_give_different_prompts(name):
    one, two = make_workload(name, seed=1), make_workload(name, seed=2)
    assert [r.token_ids for r in one] != [r.token_ids for r in two]
    assert not {r.block_hashes[0] for r in one} & {r.block_hashes[0] for r in two}


def test_registry_names_every_preset_and_control():
    assert set(WORKLOADS) == {*SHARED_PREFIX_PRESETS, "multi-turn", "no-sharing"}


def test_unknown_workload_name_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match=r"unknown workload 'sharedprefix'.*multi-turn, no-sharing"
    ):
        make_workload("sharedprefix")


def test_options_override_the_preset():
    requests = make_workload("shared-prefix-tiny", output_len=5, question_len=16)
    assert {r.max_tokens for r in requests} == {5}
    assert {r.num_prompt_tokens for r in requests} == {256 + 16}


def test_block_hashes_are_the_chained_hashes_of_the_token_ids():
    for request in make_workload("shared-prefix-tiny", hash_seed="cluster-a"):
        assert request.block_hashes == tuple(hash_token_blocks(request.token_ids, "cluster-a"))
        assert request.arrival_ms == 0.0
    default = make_workload("shared-prefix-tiny")[0]
    assert default.block_hashes == tuple(hash_token_blocks(default.token_ids, DEFAULT_HASH_SEED))
    salted = make_workload("shared-prefix-tiny", hash_seed="x")[0]
    assert default.token_ids == salted.token_ids
    assert default.block_hashes[0] != salted.block_hashes[0]


# -- shared prefix ---------------------------------------------------------------------------------
def test_sglang_defaults_make_64_groups_of_16_prompts_of_2176_tokens():
    requests = make_workload("shared-prefix")
    assert len(requests) == 1024
    assert Counter(group_of(r) for r in requests) == {f"sp-g{g:03d}": 16 for g in range(64)}
    shapes = {(r.num_prompt_tokens, r.num_blocks, r.max_tokens) for r in requests}
    assert shapes == {(2176, 136, 256)}


def test_small_preset_fits_the_default_gpu():
    requests = make_workload("shared-prefix-small")
    assert len(requests) == 64
    assert {(r.num_prompt_tokens, r.num_blocks, r.max_tokens) for r in requests} == {(576, 36, 32)}


def test_requests_of_one_group_share_exactly_the_system_prompt_blocks():
    requests = make_workload("shared-prefix-tiny")  # 256-token system prompt = 16 blocks
    for a in requests:
        for b in requests:
            if a is b:
                continue
            expected = 16 if group_of(a) == group_of(b) else 0
            assert common_prefix(a, b) == expected, (a.request_id, b.request_id)


def test_a_system_prompt_that_ends_mid_block_shares_only_its_full_blocks():
    requests = shared_prefix(
        num_groups=1, prompts_per_group=3, system_prompt_len=200, question_len=40
    )
    assert [common_prefix(requests[0], r) for r in requests[1:]] == [12, 12]


def test_groups_are_shuffled_together():
    groups = [group_of(r) for r in make_workload("shared-prefix-small", seed=0)]
    assert groups != sorted(groups)


def test_num_requests_adds_groups_and_cuts_the_last_one_short():
    requests = make_workload("shared-prefix-small", num_requests=20)
    assert sorted(Counter(group_of(r) for r in requests).values()) == [4, 8, 8]


@settings(max_examples=25, deadline=None)
@given(
    num_groups=st.integers(1, 4),
    prompts_per_group=st.integers(1, 4),
    system_prompt_len=st.integers(0, 80),
    question_len=st.integers(1, 40),
    seed=st.integers(0, 3),
)
def test_shared_prefix_sharing_is_exactly_the_full_system_prompt_blocks(
    num_groups, prompts_per_group, system_prompt_len, question_len, seed
):
    requests = shared_prefix(
        num_groups, prompts_per_group, system_prompt_len, question_len, 1, seed=seed
    )
    assert len(requests) == num_groups * prompts_per_group
    by_group = defaultdict(list)
    for r in requests:
        assert r.num_blocks == (system_prompt_len + question_len) // 16
        by_group[group_of(r)].append(r)
    for members in by_group.values():
        for other in members[1:]:
            shared = common_prefix(members[0], other)
            # Random 16-token questions never coincide in practice, so sharing stops at the
            # last full system-prompt block (or at the shorter prompt's end).
            assert shared == min(system_prompt_len // 16, other.num_blocks)


# -- multi-turn ----------------------------------------------------------------------------------
def test_each_turn_extends_the_previous_turn_of_its_conversation():
    requests = multi_turn(num_conversations=3, turns=4, user_len=20, answer_len=30, seed=5)
    by_conversation = defaultdict(list)
    for r in requests:
        by_conversation[r.request_id.rsplit("-t", 1)[0]].append(r)
    for turns in by_conversation.values():
        for k, (prev, nxt) in enumerate(pairwise(turns)):
            assert nxt.request_id.endswith(f"-t{k + 1}")
            assert nxt.token_ids[: prev.num_prompt_tokens] == prev.token_ids
            assert nxt.block_hashes[: prev.num_blocks] == prev.block_hashes
            assert nxt.num_prompt_tokens == (k + 2) * 20 + (k + 1) * 30
    assert {r.max_tokens for r in requests} == {30}


def test_multi_turn_comes_turn_major():
    turns = [int(r.request_id.rsplit("-t", 1)[1]) for r in make_workload("multi-turn")]
    assert turns == sorted(turns)
    assert len(turns) == 64


def test_multi_turn_num_requests_keeps_every_kept_turns_predecessors():
    requests = make_workload("multi-turn", num_requests=10, turns=4)  # 3 conversations
    ids = {r.request_id for r in requests}
    assert len(requests) == 10
    for rid in ids:
        conversation, turn = rid.rsplit("-t", 1)
        assert all(f"{conversation}-t{k}" in ids for k in range(int(turn)))


# -- no sharing ----------------------------------------------------------------------------------
def test_no_sharing_requests_share_no_block():
    requests = no_sharing(num_requests=50, prompt_len=40, output_len=3)
    assert ideal_hit_rate(requests) == 0.0
    assert {(r.num_prompt_tokens, r.num_blocks, r.max_tokens) for r in requests} == {(40, 2, 3)}


def test_no_sharing_defaults_mirror_the_small_preset():
    requests = make_workload("no-sharing")
    assert len(requests) == 64
    assert {(r.num_prompt_tokens, r.max_tokens) for r in requests} == {(576, 32)}


# -- prompt files --------------------------------------------------------------------------------
def test_text_prompts_one_per_line_skip_blank_lines():
    requests = read_prompts(FIXTURES / "prompts.txt", char_tokens, max_tokens=8)
    assert [r.request_id for r in requests] == ["prompt-1", "prompt-3"]
    first = "You are a helpful assistant. Summarize the plot of Hamlet in one line."
    assert requests[0].token_ids == tuple(char_tokens(first))
    assert requests[0].num_prompt_tokens == 70 and requests[0].num_blocks == 4
    assert {r.max_tokens for r in requests} == {8}


def test_jsonl_prompts_carry_max_tokens_and_arrival_seconds():
    requests = read_prompts(FIXTURES / "prompts.jsonl", char_tokens)
    assert [(r.max_tokens, r.arrival_ms) for r in requests] == [(32, 0.0), (None, 1500.0), (0, 0.0)]
    assert requests[0].block_hashes == requests[1].block_hashes  # 48 common characters
    assert requests[2].num_blocks == 0


def test_a_txt_file_whose_lines_start_with_a_brace_is_jsonl(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text('{"prompt": "abc", "max_tokens": 4}\n')
    assert read_prompts(path, char_tokens)[0].max_tokens == 4


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "ok"', "invalid JSON"),
        ('["prompt"]', "expected a JSON object"),
        ('{"text": "no prompt key"}', "'prompt' must be a string"),
        ('{"prompt": "x", "max_tokens": "many"}', "max_tokens must be an integer"),
        ('{"prompt": "x", "max_tokens": -1}', "max_tokens must be an integer >= 0"),
        ('{"prompt": "x", "arrival": "soon"}', "arrival must be a number"),
        ('{"prompt": "   "}', "empty prompt"),
    ],
)
def test_malformed_jsonl_prompt_lines_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n\n' + line + "\n")
    with pytest.raises(InputFormatError, match=rf"prompts\.jsonl:3: {message}"):
        read_prompts(path, char_tokens)


def test_a_prompt_that_tokenizes_to_nothing_names_its_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("hello\nworld\n")
    with pytest.raises(InputFormatError, match=r"prompts\.txt:2: prompt 'world' tokenizes"):
        read_prompts(path, lambda text: [] if text == "world" else [1])


def test_an_empty_prompts_file_is_an_error(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n\n")
    with pytest.raises(InputFormatError, match=r"prompts\.txt:1: no prompts"):
        read_prompts(path, char_tokens)


# -- tenants -------------------------------------------------------------------------------------
def test_lines_of_different_tenants_share_no_block_and_one_tenant_shares_its_own(tmp_path):
    prompt = "x" * 64  # 4 full blocks
    path = tmp_path / "tenants.jsonl"
    path.write_text(
        f'{{"prompt": "{prompt}", "tenant": "acme"}}\n'
        f'{{"prompt": "{prompt}", "tenant": "rival"}}\n'
        f'{{"prompt": "{prompt}", "cache_salt": "acme"}}\n'
        f'{{"prompt": "{prompt}"}}\n'
    )
    acme, rival, acme_salt, default = read_prompts(path, char_tokens, cache_salt="house")

    assert set(acme.block_hashes).isdisjoint(rival.block_hashes)
    assert acme.block_hashes == acme_salt.block_hashes  # `tenant` is the salt when alone
    unsalted = read_prompts(path, char_tokens)[3]
    assert set(default.block_hashes).isdisjoint(unsalted.block_hashes)  # the file's default
    assert default.block_hashes == tuple(
        hash_token_blocks(char_tokens(prompt), extra_keys=salt_keys("house"))
    )


def test_the_cache_salt_flag_salts_every_request_of_a_workload():
    parser = argparse.ArgumentParser()
    add_workload_arguments(parser, default="shared-prefix-tiny")
    plain, _ = build_requests(parser.parse_args([]))
    salted, meta = build_requests(parser.parse_args(["--cache-salt", "tenant-7"]))

    assert [r.request_id for r in plain] == [r.request_id for r in salted]
    assert all(
        set(p.block_hashes).isdisjoint(s.block_hashes) for p, s in zip(plain, salted, strict=True)
    )
    assert ideal_hit_rate(salted) == ideal_hit_rate(plain)  # the sharing within it stays
    assert meta["salted"] is True and "tenant-7" not in str(meta)


@pytest.mark.parametrize(
    "line", ['{"prompt": "x", "tenant": ""}', '{"prompt": "x", "cache_salt": 7}']
)
def test_a_malformed_tenant_salt_names_its_line(tmp_path, line):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(InputFormatError, match=r"prompts\.jsonl:2: '(tenant|cache_salt)' must be"):
        read_prompts(path, char_tokens)


# -- arrivals ------------------------------------------------------------------------------------
def test_asap_puts_every_request_at_zero():
    requests = retime(make_workload("shared-prefix-tiny"), "poisson", rate_rps=5.0)
    assert {r.arrival_ms for r in retime(requests, "asap")} == {0.0}


def test_poisson_arrivals_are_seeded_start_at_zero_and_never_go_back():
    requests = make_workload("shared-prefix-small")
    one = [r.arrival_ms for r in retime(requests, "poisson", rate_rps=10.0, seed=3)]
    assert one == [r.arrival_ms for r in retime(requests, "poisson", rate_rps=10.0, seed=3)]
    assert one != [r.arrival_ms for r in retime(requests, "poisson", rate_rps=10.0, seed=4)]
    assert one[0] == 0.0 and one == sorted(one)


def test_poisson_mean_gap_matches_the_rate():
    times = poisson_times(5001, 20.0, random.Random(0))
    assert times[-1] / 5000 == pytest.approx(50.0, rel=0.05)


def test_arrival_scale_stretches_every_gap():
    requests = make_workload("shared-prefix-tiny")
    base = [r.arrival_ms for r in retime(requests, "poisson", rate_rps=4.0, seed=1)]
    slow = retime(requests, "poisson", rate_rps=4.0, seed=1, arrival_scale=2.5)
    assert [r.arrival_ms for r in slow] == [2.5 * t for t in base]


def test_trace_arrivals_keep_the_requests_own_times_and_leave_the_input_alone():
    requests = retime(make_workload("shared-prefix-tiny"), "poisson", rate_rps=2.0)
    halved = retime(requests, "trace", arrival_scale=0.5)
    assert [r.arrival_ms for r in halved] == [r.arrival_ms / 2 for r in requests]
    assert [r.block_hashes for r in halved] == [r.block_hashes for r in requests]
    assert requests[1].arrival_ms != halved[1].arrival_ms


def test_unknown_arrival_process_lists_the_valid_ones():
    with pytest.raises(ValueError, match=", ".join(ARRIVAL_PROCESSES)):
        retime([], "bursty")
    with pytest.raises(ValueError, match="needs rate_rps"):
        retime([], "poisson")


# -- a file that is not there, from every entry point ------------------------------------------
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("command", "flag"),
    [
        (["-m", "kvqueue", "simulate"], "--prompts"),
        (["-m", "kvqueue", "simulate"], "--trace"),
        (["-m", "kvqueue", "sweep"], "--trace"),
        ([str(REPO_ROOT / "producer" / "send.py")], "--prompts"),
        ([str(REPO_ROOT / "analysis" / "compare.py")], "--prompts"),
    ],
)
def test_a_missing_workload_file_is_one_line_not_a_traceback(tmp_path, command, flag):
    missing = tmp_path / "nowhere.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "REDIS_URL": "redis://127.0.0.1:1/0"}
    done = subprocess.run(
        [sys.executable, *command, flag, str(missing)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "nowhere.jsonl" in line]
    assert len(errors) == 1 and errors[0].endswith(f"{flag} {missing}: no such file")
    assert "Traceback" not in done.stderr
