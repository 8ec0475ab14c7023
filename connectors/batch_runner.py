"""Run a batch plan with the transformers connector: each shared prefix computed once, pinned while its group runs.

    from kvfs.connectors.batch import plan_batch
    from kvfs.connectors.batch_runner import BatchRunner
    from kvfs.connectors.hf import CachedLM

    plan = plan_batch(prompts, decode_tokens=max_tokens)
    with CachedLM(model, "memory://?capacity=4GiB", save=False) as lm:
        result = BatchRunner(lm, kv_budget="2GiB", workers=2).run(plan, max_tokens)
    result.outputs[i]          # request i's generated tokens (None if it failed: result.results[i].error)

For each group, in plan order, the runner prefills the group's prefix once
(:meth:`CachedLM.prefill`, reusing whatever of it is already stored), stores
it (:meth:`CachedLM.store_prompt`) and pins its chunks; every request of the
group then runs through :meth:`CachedLM.generate`, which loads the prefix's
KV from kvfs and computes only the request's own suffix. When the group's
last request is done (or has failed) the prefix is unpinned, so capacity
eviction can take it; no request waits for another group to finish first.

Memory: a request is admitted only when the KV bytes of the requests in
flight (admitted and not finished), plus its own, fit ``kv_budget``. A
request needs ``(prompt tokens + max new tokens) * KVSpec.bytes_per_token``;
a prefix being prefilled needs its tokens' worth. A request larger than the
whole budget runs alone. ``workers`` threads execute the admitted requests
(the connector runs one sequence per call; torch releases the GIL in its
kernels, so threads overlap on a GPU or many cores, hardly on two).

Pins live in the store's catalog: a process killed mid-group leaves its
group's prefix pinned; ``kvfs unpin --reset MODEL/NS`` clears it.
"""

from __future__ import annotations

import logging
import numbers
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import InvalidInput, NoSpace, NotFound
from ..units import parse_size
from .batch import BatchPlan, Group
from .hf import CachedLM

log = logging.getLogger(__name__)


@dataclass
class RequestResult:
    """One request of the batch: its generated tokens, or the error it failed with."""

    index: int  # in the original batch
    group: int
    tokens: list[int] | None
    error: BaseException | None = None
    reused: int = 0  # prompt tokens whose KV came from kvfs
    computed: int = 0  # prompt tokens the model ran
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class BatchResult:
    """Every request's result (by original index) and what the run did."""

    results: list[RequestResult]
    wall_s: float
    prefix_tokens_computed: int  # prefixes prefilled for their groups
    kv_budget: int
    peak_kv_bytes: int  # the most KV bytes admitted at once
    peak_requests: int  # the most requests admitted at once (a prefix being prefilled counts as one)
    prefix_errors: dict[int, BaseException] = field(default_factory=dict)  # group id -> why its prefix failed

    @property
    def outputs(self) -> list[list[int] | None]:
        return [r.tokens for r in self.results]

    @property
    def failed(self) -> list[RequestResult]:
        return [r for r in self.results if r.error is not None]

    @property
    def prompt_tokens_computed(self) -> int:
        """Every prompt token the model ran: the prefixes and the requests' own parts."""
        return self.prefix_tokens_computed + sum(r.computed for r in self.results)

    @property
    def prompt_tokens_reused(self) -> int:
        return sum(r.reused for r in self.results)


class _Budget:
    """A byte semaphore: admit while what is in flight plus the newcomer fits (or nothing is in flight)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.count = 0
        self.peak = 0
        self.peak_count = 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cond:
            while self.count and self.used + n > self.limit:
                self._cond.wait()
            self.used += n
            self.count += 1
            self.peak = max(self.peak, self.used)
            self.peak_count = max(self.peak_count, self.count)

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self.count -= 1
            self._cond.notify_all()

    def wait_idle(self) -> None:
        """Until nothing is in flight."""
        with self._cond:
            while self.count:
                self._cond.wait()


class _OpenGroup:
    """A group whose prefix is stored and pinned; unpinned once, when its last request is done."""

    def __init__(self, runner: "BatchRunner", group: Group) -> None:
        self.runner = runner
        self.group = group
        self.pinned: list[str] = []
        self.remaining = group.size
        self.closed = False
        self._lock = threading.Lock()

    def finish_one(self) -> None:
        with self._lock:
            self.remaining -= 1
            last = self.remaining == 0
        if last:
            self.close()

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            paths, self.pinned = self.pinned, []
        self.runner._unpin(paths)


class BatchRunner:
    """Executes a :class:`~kvfs.connectors.batch.BatchPlan` with a :class:`~kvfs.connectors.hf.CachedLM`.

    Whether each request's own prompt is stored as well is the connector's
    ``save`` setting (``save=False``: only the shared prefixes are written;
    ``save=True`` also lets requests reuse each other's deeper prefixes,
    e.g. the turns of one conversation, at the cost of storing every prompt).
    """

    def __init__(self, lm: CachedLM, *, kv_budget: int | str = "1GiB", workers: int = 1) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise InvalidInput(f"workers must be an integer >= 1, got {workers!r}")
        self.lm = lm
        self.kv_budget = parse_size(kv_budget, "kv_budget")
        if self.kv_budget <= 0:
            raise InvalidInput(f"kv_budget must be positive, got {kv_budget!r}")
        self.workers = workers

    # ---------------------------------------------------------------------------------- the run
    def run(self, plan: BatchPlan, max_new_tokens: int | Sequence[int],
            on_result: Callable[[RequestResult], Any] | None = None) -> BatchResult:
        """Run every request of ``plan``; ``max_new_tokens`` is one count or one per request (original index).

        A failing request does not stop the batch: its :class:`RequestResult`
        holds the error. ``on_result`` is called (from a worker thread) with
        each result as soon as it is done, while its group's prefix is still
        pinned.
        """
        n = plan.report.requests
        new = _per_request(max_new_tokens, n)
        bpt = self.lm.spec.bytes_per_token
        budget = _Budget(self.kv_budget)
        results: list[RequestResult | None] = [None] * n
        opened: list[_OpenGroup] = []
        prefix_errors: dict[int, BaseException] = {}
        prefix_computed = 0
        t0 = time.perf_counter()
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="kvfs-batch")
        try:
            for g in plan.groups:
                state = _OpenGroup(self, g)
                opened.append(state)
                if g.size > 1 and len(g.prefix):
                    try:
                        prefix_computed += self._open(state, budget, bpt)
                    except Exception as e:  # noqa: BLE001 - the requests still run, without the shared prefix
                        log.warning("group %d: prefix of %d tokens could not be prepared (%s); its requests run "
                                    "without it", g.id, len(g.prefix), e)
                        prefix_errors[g.id] = e
                        state.close()
                for i, r in enumerate(g.requests):
                    need = (len(g.prefix) + len(g.suffixes[i]) + new[r]) * bpt
                    budget.acquire(need)
                    try:
                        pool.submit(self._task, state, i, r, new[r], need, budget, results, on_result)
                    except BaseException:
                        budget.release(need)
                        raise
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # interrupted: finish what runs, start nothing more
            raise
        finally:
            pool.shutdown(wait=True)
            for state in opened:  # whatever happened, no group stays pinned
                state.close()
        assert all(r is not None for r in results)
        return BatchResult(results, time.perf_counter() - t0, prefix_computed, self.kv_budget, budget.peak,
                           budget.peak_count, prefix_errors)

    def _open(self, state: _OpenGroup, budget: _Budget, bpt: int) -> int:
        """Pin what is stored of the group's prefix, prefill and store the rest, pin that; returns tokens computed.

        What is already stored is pinned first, so that making room for the
        rest cannot evict it. If the store has no room because earlier
        groups' prefixes are still pinned, wait for their requests to finish
        (they unpin) and try again once.
        """
        lm, prefix = self.lm, state.group.prefix
        covered = self._pin_stored(state)
        if covered == len(prefix):
            return 0
        budget.acquire(len(prefix) * bpt)
        try:
            pre = lm.prefill(prefix)
            try:
                lm.store_prompt(prefix, pre.cache)
            except NoSpace:
                budget.release(len(prefix) * bpt)  # not counted while waiting for the others to finish
                budget.wait_idle()
                budget.acquire(len(prefix) * bpt)
                lm.store_prompt(prefix, pre.cache)
            computed = pre.computed
            del pre
        finally:
            budget.release(len(prefix) * bpt)
        covered = self._pin_stored(state)
        if covered < len(prefix):
            log.warning("group %d: only %d of its prefix's %d tokens are stored; its requests compute the rest",
                        state.group.id, covered, len(prefix))
        return computed

    def _pin_stored(self, state: _OpenGroup) -> int:
        """Pin the stored chunks that serve the group's prefix (once each); returns the tokens they cover."""
        items = self.lm.ns.plan(state.group.prefix)
        have = set(state.pinned)
        for item in items:
            if item.key.path not in have:
                try:
                    self.lm.store.pin(item.key.path)
                except NotFound:  # evicted since the lookup (other writers): the rest is not reachable
                    return item.start
                state.pinned.append(item.key.path)
        return items[-1].end if items else 0

    def _task(self, state: _OpenGroup, i: int, r: int, new: int, need: int, budget: _Budget,
              results: list, on_result) -> None:
        g = state.group
        t = time.perf_counter()
        try:
            try:
                out = self.lm.generate(g.prompt(i), new)
                res = RequestResult(r, g.id, out.tokens, None, out.prefill.reused, out.prefill.computed,
                                    time.perf_counter() - t)
            except Exception as e:  # noqa: BLE001 - one request's failure is its result, not the batch's
                log.warning("request %d (group %d) failed: %s", r, g.id, e)
                res = RequestResult(r, g.id, None, e, seconds=time.perf_counter() - t)
            results[r] = res
            if on_result is not None:
                try:
                    on_result(res)
                except Exception:  # noqa: BLE001 - the caller's callback must not stop the batch
                    log.exception("on_result raised for request %d", r)
        finally:
            state.finish_one()  # unpin (if last) before the budget says this request is done
            budget.release(need)

    def _unpin(self, paths: list[str]) -> None:
        for p in paths:
            try:
                self.lm.store.unpin(p)
            except NotFound:
                pass  # quarantined or removed behind our back: nothing left to unpin
            except Exception as e:  # noqa: BLE001 - keep unpinning the others
                log.warning("could not unpin %s: %s (run `kvfs unpin %s`)", p, e, p)


def _per_request(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    # numpy integers count as integers (a 0-d array or np.int64 is one count, a 1-D array one per request)
    if isinstance(max_new_tokens, numbers.Integral) or getattr(max_new_tokens, "ndim", None) == 0:
        vals = [max_new_tokens] * n
    elif not hasattr(max_new_tokens, "__len__") or isinstance(max_new_tokens, (str, bytes)):
        raise InvalidInput(f"max_new_tokens must be an integer or one integer per request, got {max_new_tokens!r}")
    else:
        vals = list(max_new_tokens)
        if len(vals) != n:
            raise InvalidInput(f"max_new_tokens has {len(vals)} entries for {n} requests; give one per request")
    out = []
    for i, v in enumerate(vals):
        if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise InvalidInput(f"request {i}: max_new_tokens must be an integer >= 1, got {v!r}")
        out.append(int(v))
    return out
