"""plan.pipeline._min_stage_dp (breadth first over stage counts) against the end-by-end DP it replaced
(tests/planning_graphs.reference_min_stage_dp): equal fewest-stage counts and parents, on random DAGs with memory and
on a transformer with every recompute mode, "full:k" included."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st

from partitioner.annotate import annotate
from partitioner.cost import node_costs
from partitioner.devices import get_device_spec
from partitioner.plan.graph import build_planning_graph
from partitioner.plan.pipeline import (
    _chain_floor,
    _coarse_level,
    _in_flight_array,
    _min_stage_dp,
    _prefix,
    _split_to,
    _stage_starts,
    contiguous_partition,
    cut_mask,
)
from tests.planning_graphs import random_dags, reference_min_stage_dp, reference_split_to, synthetic_graph
from zoo.gpt3 import GPT, GPTConfig


def _same(pre, T: float, num_inputs: int, flight: np.ndarray, limit: float, stages: int) -> None:
    g, parent = _min_stage_dp(pre, T, num_inputs, flight, limit, stages)
    g_ref, parent_ref = reference_min_stage_dp(pre, T, num_inputs, flight, limit, stages)
    # The breadth-first DP stops at the stage count that reaches the end: prefixes first reached with more stages
    # stay unreached there (the answer never reads them); every other one must match.
    needed = g_ref <= g_ref[pre.n] if np.isfinite(g_ref[pre.n]) else np.ones(len(g_ref), dtype=bool)
    np.testing.assert_array_equal(g[needed], g_ref[needed])
    assert not np.isfinite(g[~needed]).any()
    reached = np.isfinite(g_ref) & needed
    np.testing.assert_array_equal(parent[reached], parent_ref[reached])


@settings(max_examples=60, deadline=None)
@given(random_dags(max_nodes=12), st.integers(1, 5), st.floats(0.3, 3.0), st.floats(0.0, 1.0), st.booleans())
def test_breadth_first_dp_equals_the_end_by_end_dp_on_random_graphs(pg, stages, t_scale, memory_scale, coarse):
    rng = np.random.default_rng(pg.n)
    pg.saved_bytes[:] = rng.uniform(0, 100, pg.n)
    pg.param_static.update({f"p{i}": int(rng.integers(0, 500)) for i in range(pg.n)})
    pg.param_bytes.update(pg.param_static)
    for i in range(pg.n):
        pg.params[i] = [f"p{i}"]
    m = 4
    pre = _prefix(pg, m, ("none",), coarse)
    flight = _in_flight_array([min(stages - s, m) for s in range(stages)], stages, m)
    total = float(pre.P[-1])
    limit = np.inf if memory_scale > 0.9 else memory_scale * float(pre.S[-1] + pre.A[0][-1] * m) + 1.0
    for T in (np.inf, t_scale * total / stages):
        _same(pre, T, pg.num_inputs, flight, limit, stages)


def test_the_dp_stops_at_the_stage_count_that_reaches_the_end() -> None:
    # Found by the random test: one stage holds the whole graph, so the DP stops there; prefix 6 (its cut crossing a
    # value at no overlap) would need a second stage, which only the end-by-end reference goes on to fill.
    pg = synthetic_graph([0, 0, 0, 0, 1.0, 0, 0], [(0, k) for k in range(1, 7)] + [(5, 6)], [0, 0, 0, 0, 0, 1.0, 0],
                         overlaps_comm=False)  # fmt: skip
    pre = _prefix(pg, 4, ("none",))
    flight = _in_flight_array([2, 1], 2, 4)
    g, _ = _min_stage_dp(pre, 1.0, pg.num_inputs, flight, np.inf, 2)
    assert g[pre.n] == 1 and not np.isfinite(g[6])
    _same(pre, 1.0, pg.num_inputs, flight, np.inf, 2)


def _gpt_planning_graph(layers: int, dropout: float = 0.0):
    """The training planning graph of a small fx GPT (d 64, 4 heads, 32 tokens) on meta, priced for an A100."""
    cfg = GPTConfig(n_layer=layers, d_model=64, n_head=4, vocab_size=256, n_ctx=32, attention="math", dropout=dropout)
    with torch.device("meta"):
        model = GPT(cfg)
    gm = fx.symbolic_trace(model)
    annotate(gm, [torch.zeros(8, 32, dtype=torch.long, device="meta")])
    spec = get_device_spec("a100")
    return build_planning_graph(gm, node_costs(gm, spec), spec, training=True)


@pytest.fixture(scope="module")
def transformer():
    """A 4-layer GPT with its recompute regions (selective and full, so "full:k" too)."""
    return _gpt_planning_graph(4, dropout=0.1)


@pytest.mark.parametrize("coarse", [False, True])
@pytest.mark.parametrize("stages", [1, 2, 3, 5])
def test_breadth_first_dp_equals_the_end_by_end_dp_with_every_recompute_mode(transformer, coarse, stages) -> None:
    pg, m = transformer, 8
    assert set(pg.recompute_modes()) >= {"none", "selective", "full"}
    pre = _prefix(pg, m, pg.recompute_modes(), coarse)
    flight = _in_flight_array([min(stages - s, m) for s in range(stages)], stages, m)
    total, heaviest = float(pre.P[-1]), float(pre.S[-1] + pre.A[0][-1] * m)
    for T in (np.inf, 1.5 * total / stages, 1.05 * total / stages, total / stages):
        for fraction in (np.inf, 0.8, 0.5, 0.3, 0.15):
            limit = np.inf if fraction == np.inf else fraction * heaviest / stages
            _same(pre, T, pg.num_inputs, flight, limit, stages)


def test_coarse_cuts_of_an_export_transformer_are_its_block_boundaries() -> None:
    """An HF Llama captured by torch.export carries its rotary tables and causal mask from the start through every
    block, so 5+ values cross nearly every cut; the coarse cuts leave those out (they cross every cut alike) and
    keep the few places per block where only the residual stream crosses, and the DP on them is still exact."""
    transformers = pytest.importorskip("transformers")
    from partitioner.capture import capture

    layers = 8
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, use_cache=False)  # fmt: skip
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    call = {"input_ids": torch.zeros(2, 16, dtype=torch.long, device="meta")}
    cg = capture(model, (), call)
    annotate(cg.graph_module, cg.flatten_inputs((), call))
    spec = get_device_spec("a100")
    pg = build_planning_graph(cg.graph_module, node_costs(cg.graph_module, spec), spec, training=True)
    full, coarse = _prefix(pg, 4, ("none",), False), _prefix(pg, 4, ("none",), True)
    assert 2 * layers <= len(coarse.positions) <= len(full.positions) // 4
    residual_only = coarse.positions[(coarse.positions > 0) & (coarse.positions < pg.n)]
    assert (full.messages[residual_only] > 1).mean() > 0.5  # the long-lived values cross there too
    for stages in (2, 4):
        flight = _in_flight_array([min(stages - s, 4) for s in range(stages)], stages, 4)
        _same(coarse, np.inf, pg.num_inputs, flight, np.inf, stages)
        _same(coarse, 1.1 * float(coarse.P[-1]) / stages, pg.num_inputs, flight, np.inf, stages)


@pytest.fixture
def deep_transformer():
    """An 8-layer GPT: its narrowest cuts (the residual stream) are 22 places, too few for 22+ stages."""
    return _gpt_planning_graph(8)


def test_coarse_cuts_for_more_stages_than_the_narrowest_hold_are_the_next_narrowest(deep_transformer) -> None:
    """A coarse split into more stages than the narrowest cuts can bound takes the next-narrowest set, a superset of
    the narrowest and far from every place: it fell back to every place, the cost of a full plan (GPT 39.1B's
    128-stage candidates, half its search). Fewer stages keep the narrowest cuts."""
    pg = deep_transformer
    narrowest = cut_mask(pg, True)
    places = int(narrowest.sum())
    assert 16 <= places < 24
    for stages in (2, places - 1):
        np.testing.assert_array_equal(cut_mask(pg, True, stages), narrowest)
        assert _coarse_level(pg, True, stages) == 1
    for stages in (places, 30):
        wider = cut_mask(pg, True, stages)
        assert _coarse_level(pg, True, stages) > 1
        assert wider.sum() > stages and (wider >= narrowest).all() and wider.sum() < cut_mask(pg).sum() // 2
    cuts = contiguous_partition(pg, 30, microbatches=8, coarse=True, rel_tol=1e-3)
    assert len(cuts) == 31 and set(cuts) <= set(np.flatnonzero(cut_mask(pg, True, 30)).tolist())
    working = _prefix(pg, 8, ("none",)).working
    assert (np.diff(working[cuts]) > 0).all()  # every stage holds compute


@settings(max_examples=60, deadline=None)
@given(random_dags(max_nodes=14), st.data(), st.booleans())
def test_split_to_equals_the_position_by_position_search(pg, data, coarse):
    """_split_to (more stages than the DP needed: a cut at a time, where the larger half is smallest among the cuts
    adding the fewest stages without compute) picks every position all at once; the same cuts or the same error as
    the scalar loop it replaced, from any starting cuts."""
    pre = _prefix(pg, 2, ("none",), coarse)
    inner = [int(p) for p in pre.positions if 0 < p < pre.n]
    start = sorted({0, pre.n, *data.draw(st.lists(st.sampled_from(inner), max_size=3) if inner else st.just([]))})
    target = len(start) - 1 + data.draw(st.integers(1, pg.n))
    outcomes = []
    for split in (_split_to, reference_split_to):
        try:
            outcomes.append(split(pre, start, target, pg.num_inputs))
        except ValueError as e:
            outcomes.append(str(e))
    assert outcomes[0] == outcomes[1]


@settings(max_examples=60, deadline=None)
@given(random_dags(max_nodes=12), st.integers(1, 5), st.booleans())
def test_chain_floor_is_the_least_largest_compute_of_any_split(pg, stages, coarse):
    """contiguous_partition starts its bisection at _chain_floor: it must never exceed the least largest stage
    compute over every split at the DP's cut positions into at most `stages` stages (brute force), and be that
    optimum to its tolerance."""
    pre = _prefix(pg, 1, ("none",), coarse)
    inner = [int(p) for p in pre.positions if max(pg.num_inputs, 1) <= p < pre.n]
    best = np.inf
    for k in range(min(stages - 1, len(inner)) + 1):
        for chosen in itertools.combinations(inner, k):
            bounds = [0, *chosen, pre.n]
            best = min(best, max(pre.P[b] - pre.P[a] for a, b in zip(bounds, bounds[1:])))
    floor = _chain_floor(pre.P[_stage_starts(pg, coarse)], stages)
    assert floor <= best
    assert floor >= best * (1 - 2e-4) - 1e-12
