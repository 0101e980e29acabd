"""Random workloads on the `Scheduler`, driven without a model: arrival times, prompt
lengths (some sharing prefixes), ``max_tokens``, ``n``, priorities, aborts, stop tokens, seeds
and repetition penalties, against random small KV pools, block sizes, token budgets and
``max_num_seqs``, with and without chunked prefill and prefix caching, synchronous and with
async scheduling. ``scheduler_workloads.simulate`` checks every step against the invariants
of ``scheduler_invariants`` and the worker replica of ``scheduler_harness``, and
``check_final`` every sequence's output.
"""

from __future__ import annotations

from hypothesis import event, given, settings

from pagedllm.core.sequence import SequenceStatus
from tests.core.scheduler_harness import LAGS
from tests.core.scheduler_workloads import GroupSpec, SimConfig, simulate_and_check, workload


@LAGS
@settings(max_examples=250, deadline=None)
@given(wl=workload())
def test_random_workloads_keep_invariants_and_finish(
    lag: bool, wl: tuple[SimConfig, list[GroupSpec]]
) -> None:
    cfg, groups = wl
    res = simulate_and_check(cfg, groups, lag)
    kv = res.sched.kv
    event(f"preempted: {res.sched.num_preemptions > 0}")
    event(f"prefix hits: {kv.prefix_hits > 0}")
    event(f"aborted: {bool(res.aborted)}")
    event(f"forked: {any(g.n > 1 for g in groups)}")
    statuses = {s.status for seqs in res.seqs.values() for s in seqs}
    event(f"stopped: {SequenceStatus.FINISHED_STOPPED in statuses}")
    event(f"n > max_num_seqs: {any(g.n > cfg.max_num_seqs for g in groups)}")
    event(f"penalties: {any(g.penalty for g in groups)}")
    event(f"ran ahead: {res.harness.num_fixups > 0}")
    if not lag:
        assert res.harness.num_fixups == 0
    assert res.max_running <= cfg.max_num_seqs


@LAGS
@settings(max_examples=60, deadline=None)
@given(wl=workload(max_n=1))
def test_single_sequence_requests_respect_max_num_seqs(
    lag: bool, wl: tuple[SimConfig, list[GroupSpec]]
) -> None:
    cfg, groups = wl
    res = simulate_and_check(cfg, groups, lag)
    assert res.max_running <= cfg.max_num_seqs


@LAGS
@settings(max_examples=60, deadline=None)
@given(wl=workload(max_n=8))
def test_random_workloads_with_large_n_respect_max_num_seqs(
    lag: bool, wl: tuple[SimConfig, list[GroupSpec]]
) -> None:
    cfg, groups = wl
    res = simulate_and_check(cfg, groups, lag)  # checks seats after every schedule and update
    assert res.max_running <= cfg.max_num_seqs


@LAGS
@settings(max_examples=80, deadline=None)
@given(wl=workload(chunked=False))
def test_random_workloads_without_chunked_prefill(
    lag: bool, wl: tuple[SimConfig, list[GroupSpec]]
) -> None:
    cfg, groups = wl
    simulate_and_check(cfg, groups, lag)
