"""Global prefix sharing for large offline batches (BatchLLM, arXiv 2412.03594).

    from kvfs.connectors.batch import plan_batch
    plan = plan_batch(prompts, decode_tokens=[r["max_tokens"] for r in requests])
    print(plan.report)                      # logical tokens, tokens to prefill, trie optimum, saving
    for group in plan.groups:               # decode-heavy groups first
        group.prefix                        # computed once, reused by every request of the group
        for i, suffix in zip(group.requests, group.suffixes):
            ...                             # request i = group.prefix + suffix

An engine that runs a batch first-come-first-served with an LRU prefix cache
evicts shared KV before it is reused. The planner looks at the whole batch
first: it builds a radix trie over the prompts' tokens, chooses one shared
prefix per group of requests, and orders the groups so that each prefix is
computed once and can be dropped when its group is done.

Costs are counted in prompt tokens to prefill. A group with prefix ``P`` and
requests ``r_1..r_k`` prefills ``|P| + sum(|r_i| - |P|)`` tokens: it saves
``(k - 1) * |P|`` against running each request alone. The *trie optimum* is
the number of distinct prefixes in the batch (the token count of its trie):
what a cache that never evicts would prefill. One shared prefix per group
("single level") can only approach it; :func:`single_level_optimum` finds the
best single-level choice exactly, :func:`greedy_groups` is BatchLLM's greedy.

No torch here: the planner is numpy and Python, usable by any engine.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from ..errors import InvalidInput
from ..keys import as_tokens

METHODS = ("dp", "greedy")


# ---------------------------------------------------------------------------------------------- the trie
class RadixTrie:
    """A compressed trie (radix tree) over a batch of token sequences.

    Node 0 is the root (the empty prefix). Every other node ends an edge of
    one or more tokens; ``depth[v]`` is the length of the prefix it spells,
    ``rep[v]`` a request whose prompt spells it, ``count[v]`` how many
    requests pass through it and ``ends[v]`` the requests whose prompt ends
    exactly there. ``tokens`` (the sum of edge lengths) is the number of
    distinct non-empty prefixes in the batch: the trie optimum.

    Built from the prompts sorted lexicographically and the longest common
    prefix of sorted neighbours (the suffix-array-to-suffix-tree method), so
    the only per-token work is a byte sort and a numpy comparison; the
    Python loop runs once per prompt, not per token.
    """

    def __init__(self, prompts: Sequence[np.ndarray]) -> None:
        self.prompts = prompts
        n = len(prompts)
        # big-endian bytes compare like token sequences (and a prefix sorts before its extensions)
        keys = [p.astype(">u4").tobytes() for p in prompts]
        order = sorted(range(n), key=keys.__getitem__)
        del keys
        parent, depth, rep = [-1], [0], [-1]
        ends: list[list[int]] = [[]]
        stack = [0]
        prev: np.ndarray | None = None
        for i in order:
            t = prompts[i]
            common = 0 if prev is None else _lcp(prev, t)
            last = -1
            while depth[stack[-1]] > common:
                last = stack.pop()
            if depth[stack[-1]] < common:  # the previous prompt's edge splits at `common`
                parent.append(stack[-1]), depth.append(common), rep.append(rep[last]), ends.append([])
                parent[last] = len(parent) - 1
                stack.append(len(parent) - 1)
            if len(t) > common:
                parent.append(stack[-1]), depth.append(len(t)), rep.append(i), ends.append([i])
                stack.append(len(parent) - 1)
            else:  # a duplicate of the previous prompt (sorting puts a proper prefix first)
                ends[stack[-1]].append(i)
            prev = t
        self.parent = np.asarray(parent, dtype=np.int64)
        self.depth = np.asarray(depth, dtype=np.int64)
        self.rep = np.asarray(rep, dtype=np.int64)
        self.ends = ends
        m = len(parent)
        self.children: list[list[int]] = [[] for _ in range(m)]
        for v in range(1, m):
            self.children[parent[v]].append(v)
        # top-down (breadth-first) order and levels; reversed, it is a valid bottom-up order
        top = [0]
        level = np.zeros(m, dtype=np.int64)
        for v in top:  # grows while iterating
            for c in self.children[v]:
                level[c] = level[v] + 1
                top.append(c)
        self.top_down = np.asarray(top, dtype=np.int64)
        self.level = level
        count = np.fromiter((len(e) for e in ends), dtype=np.int64, count=m)
        for v in reversed(top[1:]):
            count[parent[v]] += count[v]
        self.count = count
        self.tokens = int((self.depth[1:] - self.depth[self.parent[1:]]).sum()) if m > 1 else 0

    @property
    def num_nodes(self) -> int:
        """Nodes of the compressed trie, root excluded."""
        return len(self.parent) - 1

    def edge(self, v: int) -> int:
        """Tokens on the edge into node ``v``."""
        return int(self.depth[v] - self.depth[self.parent[v]]) if v else 0

    def prefix(self, v: int) -> np.ndarray:
        """The tokens node ``v`` spells (a view of one prompt)."""
        return self.prompts[self.rep[v]][: self.depth[v]] if v else self.prompts[0][:0]


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    head = min(m, 64)  # most neighbours differ early: don't compare thousands of tokens for that
    diff = np.flatnonzero(a[:head] != b[:head])
    if diff.size:
        return int(diff[0])
    diff = np.flatnonzero(a[head:m] != b[head:m])
    return head + int(diff[0]) if diff.size else m


# ---------------------------------------------------------------------------------------------- choosing prefixes
def single_level_optimum(trie: RadixTrie, min_shared: int = 1) -> tuple[int, np.ndarray]:
    """The best single-level grouping, exactly: ``(tokens saved, group node per request)``.

    A grouping picks a set S of trie nodes; each request joins its deepest
    ancestor-or-self in S (node 0, the root, means "not shared") and a group
    at node v with a requests saves ``(a - 1) * depth[v]`` tokens. The dynamic
    program runs bottom-up: ``h_v(w)`` is the best saving inside v's subtree
    when the requests left ungrouped there would join a group at an ancestor
    of depth ``w``, for every ancestor depth ``w`` of v (a vector as long as
    v's level). Then ``h_v(w) = max(sum_c h_c(w) + ends_v * w,
    sum_c h_c(depth v) + (ends_v - 1) * depth v)`` - v not in S, or v in S.
    Nodes shallower than ``min_shared`` tokens are never in S.
    Time and memory are the sum of node levels: linear for tries of bounded
    height (instructions, documents, questions), quadratic only for long
    chains of prompts that are prefixes of each other.
    """
    m = len(trie.parent)
    parent, depth, level, top = trie.parent, trie.depth, trie.level, trie.top_down
    anc: list[np.ndarray | None] = [None] * m  # depths of v's strict ancestors, root first
    anc[0] = np.zeros(0, dtype=np.int64)
    for v in top[1:]:
        p = parent[v]
        anc[v] = np.append(anc[p], depth[p])
    acc: list[np.ndarray | None] = [None] * m  # sum of the children's h, one entry per ancestor and v itself
    choose: list[np.ndarray | None] = [None] * m
    for v in top[:0:-1]:
        s = acc[v] if acc[v] is not None else np.zeros(level[v] + 1, dtype=np.int64)
        own = len(trie.ends[v])
        not_in = s[:-1] + own * anc[v]
        in_s = s[-1] + (own - 1) * depth[v]
        pick = in_s > not_in  # ties: fewer, larger groups
        if depth[v] < min_shared:
            pick[:] = False
        h = np.where(pick, in_s, not_in)
        choose[v] = pick
        anc[v] = None
        p = parent[v]
        if acc[p] is None:
            acc[p] = h
        else:
            acc[p] += h
        acc[v] = None
    best = int(acc[0][0]) if acc[0] is not None else 0
    # top-down: which nodes are in S, given the deepest S ancestor above each
    inherit = np.zeros(m, dtype=np.int64)
    assign = np.zeros(len(trie.prompts), dtype=np.int64)
    for v in top[1:]:
        g = inherit[parent[v]]
        in_s = bool(choose[v][level[g]])
        inherit[v] = v if in_s else g
        for r in trie.ends[v]:
            assign[r] = inherit[v]
    return best, assign


def greedy_groups(trie: RadixTrie, min_shared: int = 1) -> np.ndarray:
    """BatchLLM's greedy: the group node of each request.

    Start with one group per child of the root (the first-level prefixes;
    with ``min_shared``, the shallowest nodes at least that deep).
    A group at node p (prefix of ``depth[p]`` tokens) gives a child g its own,
    longer prefix when ``(count[g] - 1) * edge(g) > depth[p]``: g's requests
    then share ``edge(g)`` more tokens each, all but one of them saving it,
    at the price of prefilling p's prefix once more. A child that passes
    becomes a group and is enlarged the same way; one that fails stays in p's
    group with everything below it.

    Bound: the greedy never saves less than the first-level groups and never
    more than :func:`single_level_optimum`. Its gap to that optimum is at most
    its gap to the trie optimum, which :func:`plan_batch` reports exactly
    (``PlanReport.trie_gap_tokens``). No constant-factor bound holds in
    general: a child that fails the test by a hair (a short edge, few
    requests) can hide arbitrarily long shared prefixes below it, which the
    greedy then prefills once per request and the dynamic program does not
    (``docs/batch.md`` gives the example). That is why ``plan_batch`` uses the
    exact dynamic program by default.
    """
    m = len(trie.parent)
    parent, depth, count = trie.parent, trie.depth, trie.count
    inherit = np.zeros(m, dtype=np.int64)
    assign = np.zeros(len(trie.prompts), dtype=np.int64)
    for v in trie.top_down[1:]:
        p = parent[v]
        if inherit[p] == 0:
            inherit[v] = v if depth[v] >= min_shared else 0
        elif inherit[p] == p and (count[v] - 1) * (depth[v] - depth[p]) > depth[p]:
            inherit[v] = v
        else:
            inherit[v] = inherit[p]
        for r in trie.ends[v]:
            assign[r] = inherit[v]
    return assign


# ---------------------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class Group:
    """Requests that share one prefix: its KV is computed once and reused by each of them.

    ``requests`` are the requests' indices in the original batch, in the
    order to run them; ``suffixes[i]`` is what request ``requests[i]`` adds
    after ``prefix`` (possibly nothing: a duplicate of the prefix). A request
    that shares nothing is a group of one with an empty prefix.
    """

    id: int
    prefix: np.ndarray
    requests: tuple[int, ...]
    suffixes: tuple[np.ndarray, ...]
    decode_tokens: float  # estimated tokens generated by the whole group

    @property
    def size(self) -> int:
        return len(self.requests)

    @property
    def prefill_tokens(self) -> int:
        """Tokens this group prefills: the prefix once plus every suffix."""
        return len(self.prefix) + sum(len(s) for s in self.suffixes)

    @property
    def logical_tokens(self) -> int:
        """Prompt tokens of the group's requests, as if each ran alone."""
        return self.size * len(self.prefix) + sum(len(s) for s in self.suffixes)

    @property
    def decode_ratio(self) -> float:
        """Estimated decode tokens per token prefilled: the ordering key (decode-heavy first)."""
        return self.decode_tokens / max(self.prefill_tokens, 1)

    def prompt(self, i: int) -> np.ndarray:
        """The full prompt of the group's ``i``-th request (prefix + suffix)."""
        return np.concatenate([self.prefix, self.suffixes[i]])


@dataclass(frozen=True)
class PlanReport:
    """What a plan saves. Token counts are prompt tokens; savings are fractions of ``logical_tokens``."""

    method: str
    requests: int
    groups: int
    shared_groups: int  # groups of two or more requests
    logical_tokens: int  # every prompt in full
    prefill_tokens: int  # what the plan prefills
    trie_tokens: int  # the trie optimum: distinct prefixes (nodes of the uncompressed token trie)
    trie_nodes: int  # nodes of the compressed trie
    single_level_tokens: int  # the exact single-level optimum
    trie_gap_tokens: int  # prefill_tokens - trie_tokens: the plan's bound against both optima
    seconds: float

    @property
    def saving(self) -> float:
        return 1.0 - self.prefill_tokens / self.logical_tokens if self.logical_tokens else 0.0

    @property
    def trie_saving(self) -> float:
        return 1.0 - self.trie_tokens / self.logical_tokens if self.logical_tokens else 0.0

    @property
    def single_level_saving(self) -> float:
        return 1.0 - self.single_level_tokens / self.logical_tokens if self.logical_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(saving=self.saving, trie_saving=self.trie_saving, single_level_saving=self.single_level_saving)
        return d

    def __str__(self) -> str:
        def pct(x: float) -> str:
            return f"{100 * x:.1f}%"

        rows = [
            ("requests", f"{self.requests:,} in {self.groups:,} groups ({self.shared_groups:,} shared)"),
            ("logical tokens", f"{self.logical_tokens:,}"),
            ("tokens to prefill", f"{self.prefill_tokens:,}  (saving {pct(self.saving)}, method {self.method})"),
            ("single-level optimum", f"{self.single_level_tokens:,}  (saving {pct(self.single_level_saving)})"),
            ("trie optimum", f"{self.trie_tokens:,}  (saving {pct(self.trie_saving)}; "
                             f"{self.trie_nodes:,} trie nodes)"),
            ("planned in", f"{self.seconds:.2f} s"),
        ]
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


@dataclass(frozen=True)
class BatchPlan:
    """Groups in the order to run them, and what the plan saves."""

    groups: tuple[Group, ...]
    report: PlanReport

    @property
    def order(self) -> list[int]:
        """Original request indices in execution order."""
        return [r for g in self.groups for r in g.requests]

    def group_of(self) -> np.ndarray:
        """The group id of every request, by original index."""
        out = np.empty(self.report.requests, dtype=np.int64)
        for g in self.groups:
            out[list(g.requests)] = g.id
        return out


def plan_batch(prompts: Sequence[Any], *, decode_tokens: Sequence[float] | None = None,
               method: str = "dp", min_shared: int = 1) -> BatchPlan:
    """Group a batch by shared prefixes and order the groups, decode-heavy first.

    ``prompts`` are token-id sequences (lists, numpy or torch 1-D); request i
    is ``prompts[i]``. ``decode_tokens[i]`` estimates the tokens request i
    generates (its ``max_tokens``, or a better guess); without it every
    request counts as 0 and groups keep the batch's order. ``method`` is
    ``"dp"`` (the exact single-level optimum) or ``"greedy"`` (BatchLLM's
    greedy enlarging of first-level prefixes). ``min_shared`` is the shortest
    prefix worth a group (an engine whose cache shares whole 16-token blocks
    gains nothing from shorter ones); shorter shared prefixes are ignored.

    Groups run in descending order of estimated decode tokens per prefilled
    token, requests inside a group likewise (ties keep the batch's order):
    decode-heavy work starts early and later prefills mix with its decodes.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise InvalidInput(f"unknown planning method {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(min_shared, bool) or not isinstance(min_shared, int) or min_shared < 1:
        raise InvalidInput(f"min_shared must be an integer >= 1, got {min_shared!r}")
    toks = _validate(prompts)
    decode = _decode_estimates(decode_tokens, len(toks))
    trie = RadixTrie(toks)
    dp_saving, dp_assign = single_level_optimum(trie, min_shared)
    assign = dp_assign if method == "dp" else greedy_groups(trie, min_shared)
    logical = int(sum(len(t) for t in toks))

    members: dict[int, list[int]] = {}
    for r, node in enumerate(assign.tolist()):
        members.setdefault(node, []).append(r)
    unshared = members.pop(0, [])
    raw: list[tuple[int, list[int]]] = [(0, [r]) for r in unshared]
    for node, reqs in members.items():
        if len(reqs) == 1:  # a prefix nobody else uses is not worth storing
            raw.append((0, reqs))
        else:
            raw.append((int(trie.depth[node]), reqs))

    groups: list[tuple[float, int, int, list[int]]] = []
    for plen, reqs in raw:
        reqs.sort(key=lambda r: (-decode[r] / len(toks[r]), r))
        gdecode = float(sum(decode[r] for r in reqs))
        prefill = plen + sum(len(toks[r]) - plen for r in reqs)
        groups.append((gdecode / max(prefill, 1), min(reqs), plen, reqs))
    groups.sort(key=lambda g: (-g[0], g[1]))

    out = []
    for gid, (_, _, plen, reqs) in enumerate(groups):
        first = toks[reqs[0]]
        out.append(Group(gid, first[:plen], tuple(reqs), tuple(toks[r][plen:] for r in reqs),
                         float(sum(decode[r] for r in reqs))))
    prefill = sum(g.prefill_tokens for g in out)
    report = PlanReport(
        method=method, requests=len(toks), groups=len(out), shared_groups=sum(g.size > 1 for g in out),
        logical_tokens=logical, prefill_tokens=prefill, trie_tokens=trie.tokens, trie_nodes=trie.num_nodes,
        single_level_tokens=logical - dp_saving, trie_gap_tokens=prefill - trie.tokens,
        seconds=time.perf_counter() - t0,
    )
    return BatchPlan(tuple(out), report)


def _validate(prompts: Sequence[Any]) -> list[np.ndarray]:
    if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
        raise InvalidInput("prompts must be a sequence of token-id sequences (one per request)")
    if len(prompts) == 0:
        raise InvalidInput("the batch is empty: give at least one prompt")
    toks = []
    for i, p in enumerate(prompts):
        try:
            toks.append(as_tokens(p))
        except InvalidInput as e:
            raise InvalidInput(f"request {i}: {e}") from None
    return toks


def _decode_estimates(decode_tokens: Sequence[float] | None, n: int) -> list[float]:
    if decode_tokens is None:
        return [0.0] * n
    if len(decode_tokens) != n:
        raise InvalidInput(f"decode_tokens has {len(decode_tokens)} entries for {n} prompts; give one per prompt")
    out = []
    for i, d in enumerate(decode_tokens):
        if d is None:
            out.append(0.0)
            continue
        try:
            x = float(d)
        except (TypeError, ValueError):
            raise InvalidInput(f"request {i}: decode estimate {d!r} is not a number") from None
        if isinstance(d, bool) or not x >= 0 or x == float("inf"):
            raise InvalidInput(f"request {i}: decode estimate {d!r} must be a finite number >= 0")
        out.append(x)
    return out


# ---------------------------------------------------------------------------------------------- cache simulation
@dataclass(frozen=True)
class CacheRun:
    """Tokens an engine with a prefix cache of fixed-size blocks prefills when it runs requests in one order."""

    logical_tokens: int
    hit_tokens: int
    capacity_blocks: int
    block_tokens: int

    @property
    def prefill_tokens(self) -> int:
        return self.logical_tokens - self.hit_tokens

    @property
    def hit_ratio(self) -> float:
        return self.hit_tokens / self.logical_tokens if self.logical_tokens else 0.0


def block_hashes(prompt: np.ndarray, block_tokens: int = 16) -> list[int]:
    """Chained hashes of a prompt's full blocks (a block names its whole prefix, like vLLM's prefix cache)."""
    buf = prompt.astype("<u4", copy=False).tobytes()
    step = 4 * block_tokens
    h = 0
    out = []
    for off in range(0, (len(prompt) // block_tokens) * step, step):
        h = hash((h, buf[off : off + step]))
        out.append(h)
    return out


def simulate_lru(blocks: Sequence[Sequence[int]], order: Sequence[int], capacity_blocks: int,
                 block_tokens: int = 16, lengths: Sequence[int] | None = None) -> CacheRun:
    """Run requests one after another through an LRU cache of ``capacity_blocks`` blocks.

    ``blocks[i]`` are request i's block hashes (:func:`block_hashes`). A
    request hits the leading blocks found in the cache (up to its first
    miss, as prefix caches do), then all its full blocks become most
    recently used, evicting the least recently used beyond capacity.
    ``lengths`` are the prompts' token counts (default: whole blocks only).
    """
    if capacity_blocks < 0:
        raise InvalidInput(f"capacity_blocks must be >= 0, got {capacity_blocks}")
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    logical = 0
    for i in order:
        bl = blocks[i]
        logical += lengths[i] if lengths is not None else len(bl) * block_tokens
        k = 0
        while k < len(bl) and bl[k] in cache:
            k += 1
        hits += k * block_tokens
        for h in bl:
            if h in cache:
                cache.move_to_end(h)
            else:
                cache[h] = None
                if len(cache) > capacity_blocks:
                    cache.popitem(last=False)
    return CacheRun(logical, hits, capacity_blocks, block_tokens)
