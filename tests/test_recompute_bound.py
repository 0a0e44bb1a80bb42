"""plan.recompute_bound: the recompute memory forces, bounded before any split is planned.

The floor must never exceed what a priced plan recomputes (else the search would skip a candidate that could win):
checked on every candidate the search prices for gpt3-tiny under memory limits that force recomputation, with both
single-stage schedules. And it must see what it is for: GPipe holds every microbatch in flight, so a limit below
the batch's activations forces recompute whatever the split.
"""

from __future__ import annotations

import math

import partitioner
import zoo
from partitioner.plan.recompute_bound import forced_recompute_floor
from partitioner.plan.search import search
from tests.planning_graphs import H100_TENSORS_ONLY


def _tiny_graph():
    cm = partitioner.compile(zoo.get("gpt3-tiny"), devices=1, example_inputs=zoo.example_inputs("gpt3-tiny", batch=16),
                             device_type=H100_TENSORS_ONLY, verbose=False)  # fmt: skip
    return cm.planning_graph


def test_the_floor_never_exceeds_what_a_priced_plan_recomputes() -> None:
    pg = _tiny_graph()
    forced = 0
    free, _ = search(pg, 4, tp_model=lambda *a, **k: None, max_tp=1, batch=16, memory_limit=math.inf,
                     schedules=("gpipe", "1f1b"), data_parallel=("ddp",), mincut=False)  # fmt: skip
    for share in (0.9, 0.6, 0.4):
        forced += _check_priced(pg, share * free.peak_memory)
    assert forced  # limits this far below the free plan's peak force recompute the floor sees


def _check_priced(pg, limit: float) -> int:
    """Assert the floor of every candidate the search prices under `limit` is within what its plan recomputes; the
    number of candidates whose floor is above 0."""
    _, evaluated = search(pg, 4, tp_model=lambda *a, **k: None, max_tp=1, batch=16, memory_limit=limit,
                          schedules=("gpipe", "1f1b"), data_parallel=("ddp",), mincut=False)  # fmt: skip
    priced = [c for c in evaluated if c.fits and c.stages_per_device == 1]
    assert priced
    forced = 0
    for c in priced:
        floor = forced_recompute_floor(c.graph, stages=c.degrees.pp, schedule=c.schedule,
                                       microbatch_counts=[c.microbatches], memory_limit=limit,
                                       modes=pg.recompute_modes())  # fmt: skip
        done = sum(s.recompute_time for s in c.metrics)
        assert floor <= done * (1 + 1e-9) + 1e-15, (c.degrees, c.schedule, c.microbatches, floor, done)
        assert c.bound <= c.step_time * (1 + 1e-9)
        forced += floor > 0
    return forced


def test_gpipe_holding_every_microbatch_is_bounded_by_its_forced_recompute() -> None:
    """At pp 1 GPipe and 1F1B both hold every microbatch (m in flight on the one stage): a limit below the batch's
    activations plus the weights forces at least that much dropped, at the best bytes per second any region offers."""
    pg = _tiny_graph()
    static = sum(pg.param_static.values())
    activations = float(pg.saved_bytes.sum())
    limit = static + 0.5 * activations
    floor = forced_recompute_floor(pg, stages=1, schedule="gpipe", microbatch_counts=[4], memory_limit=limit,
                                   modes=pg.recompute_modes())  # fmt: skip
    assert floor > 0
    unlimited = forced_recompute_floor(pg, stages=1, schedule="gpipe", microbatch_counts=[4],
                                       memory_limit=static + activations, modes=pg.recompute_modes())  # fmt: skip
    assert unlimited == 0
    assert (
        forced_recompute_floor(
            pg, stages=1, schedule="gpipe", microbatch_counts=[4], memory_limit=limit, modes=("none",)
        )
        == 0
    )  # nothing to recompute: no floor (the plan does not fit)
