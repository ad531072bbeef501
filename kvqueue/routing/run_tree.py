"""Chains of blocks held as a radix tree of runs, with one number per run.

The router's records of what it routed (`kvqueue.routing.active`, `kvqueue.routing.recency`)
hold sets of chains — a request's prompt blocks, parent first — and a number per block that
every block of a stretch shares: a reference count, a release stamp. A tree of `RunNode`s
holds each such stretch once: a node is a run of consecutive blocks (a slice of the chain it
was stored from) with one `value`, its children keyed by their first block. Walking a chain
down the tree is a dict lookup and one comparison per run (its last block: see below), plus
a binary search in the run the chain leaves; storing a chain adds at most two nodes (a
split and a new leaf). So the Python work per chain is per run, never per block.

A node's path from the root spells a chain prefix. Chained hashing (a block's hash fixes
every block before it, `kvqueue.gpu.hashing`) makes a block's position in the tree unique: a
block seen under one parent is never seen under another, so the blocks of a tree are exactly
the distinct blocks of the chains stored in it, and along any chain the blocks the tree
holds are a leading run. The helpers here are pure tree surgery; the records own the values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from kvqueue.gpu.hashing import BlockHash

Chain = tuple[BlockHash, ...]


@dataclass(slots=True, eq=False)
class RunNode:
    """Blocks `run` (non-empty, except at the root) below `parent`, all sharing `value`.
    `ends` counts the records that end exactly at this node's last block (the in-flight
    requests whose chain it closes, for `kvqueue.routing.active`)."""

    run: Chain = ()
    parent: RunNode | None = None
    value: int = 0
    ends: int = 0
    children: dict[BlockHash, RunNode] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Walk:
    """Where a chain leaves a tree: `path` the nodes it covers whole (root excluded), `depth`
    the blocks they hold; then `shared` more blocks of `partial` (the node the chain turns
    away from, or ends inside), None if the chain leaves at a node boundary."""

    path: list[RunNode]
    depth: int
    partial: RunNode | None
    shared: int

    @property
    def matched(self) -> int:
        """Leading blocks of the chain the tree holds."""
        return self.depth + self.shared


def walk(root: RunNode, chain: Sequence[BlockHash]) -> Walk:
    """Follow `chain` down from `root` (a lookup and a comparison per run)."""
    if not isinstance(chain, tuple):  # runs are tuples: compare like with like
        chain = tuple(chain)
    node, depth, n = root, 0, len(chain)
    path: list[RunNode] = []
    while depth < n:
        child = node.children.get(chain[depth])
        if child is None:
            break
        size = len(child.run)
        shared = _shared(chain, depth, child.run, min(size, n - depth))
        if shared < size:
            return Walk(path, depth, child, shared)
        path.append(child)
        depth += size
        node = child
    return Walk(path, depth, None, 0)


def _shared(chain: Chain, depth: int, run: Chain, limit: int) -> int:
    """How many leading blocks of `run` ``chain[depth:]`` shares, at most `limit`, given that
    the first agree. Chained hashing makes agreement prefix-closed (two chains equal at a
    position are equal before it), so the last position decides a whole run and a binary
    search finds where they part: O(log run) probes, not a pass over the run."""
    if chain[depth + limit - 1] == run[limit - 1]:
        return limit
    lo, hi = 1, limit - 1  # run[:lo] agrees; run[hi] is the last that may
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if chain[depth + mid - 1] == run[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def split(node: RunNode, at: int) -> RunNode:
    """Cut `node` after its first `at` blocks (0 < at < len(run)): a new node takes the head,
    with `node`'s value, and becomes `node`'s parent; `node` keeps the tail, so a record that
    ends at `node` still ends at it. Returns the head."""
    parent = node.parent
    assert parent is not None and 0 < at < len(node.run)
    head = RunNode(node.run[:at], parent, node.value)
    node.run = node.run[at:]
    node.parent = head
    head.children[node.run[0]] = node
    parent.children[head.run[0]] = head
    return head


def extend(walked: Walk, root: RunNode, chain: Sequence[BlockHash], value: int) -> list[RunNode]:
    """Make the tree hold all of `chain`: split where it ends inside or turns away from a run,
    and hang the rest as a new leaf with `value`. Returns the nodes spelling `chain` (root
    excluded), parent first; the new leaf, if any, last."""
    path = walked.path
    depth = walked.depth
    if walked.partial is not None:
        path.append(split(walked.partial, walked.shared))
        depth += walked.shared
    if depth < len(chain):
        parent = path[-1] if path else root
        leaf = RunNode(tuple(chain[depth:]), parent, value)
        parent.children[chain[depth]] = leaf
        path.append(leaf)
    return path


def merge_into_child(node: RunNode) -> RunNode:
    """Fold `node` into its only child (whose value it shares, and at which no record ends
    apart from the child's own): the child takes `node`'s blocks in front of its own and
    its place under the parent. Returns the child."""
    parent = node.parent
    assert parent is not None and len(node.children) == 1
    (child,) = node.children.values()
    child.run = node.run + child.run
    child.parent = parent
    parent.children[node.run[0]] = child
    node.children.clear()
    return child


def mergeable(node: RunNode) -> bool:
    """`node` has one child, of its value, and no record ends at it."""
    if len(node.children) != 1 or node.ends:
        return False
    (child,) = node.children.values()
    return child.value == node.value


def holds(root: RunNode, block: BlockHash) -> RunNode | None:
    """The node holding `block`, by a scan of the whole tree (O(blocks held): for inspection
    and tests; a chain is found by `walk`)."""
    stack = list(root.children.values())
    while stack:
        node = stack.pop()
        if block in node.run:
            return node
        stack.extend(node.children.values())
    return None
