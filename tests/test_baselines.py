"""bench/baselines.py: each baseline against hand-worked examples of the algorithm it re-implements (the source
named in its docstring), and every baseline as a valid pipeline on zoo models."""

from __future__ import annotations

import functools

import pytest
import torch

import partitioner
import zoo
from bench import baselines as bl
from partitioner.plan.graph import evaluate


@functools.cache
def _planned(name: str, **overrides) -> tuple:
    """(planning graph, captured graph module, model) of a tiny zoo model planned on 4 devices."""
    model = zoo.get(name, **overrides)
    cm = partitioner.compile(model, devices=4, example_inputs=zoo.example_inputs(name, batch=8), pipeline=4)
    return cm.planning_graph, cm.captured.graph_module, model


# --- DeepSpeed: ds_utils.partition_uniform / partition_balanced (v0.16.5, the DP of PR #4312) ----------------


def test_deepspeed_partition_uniform():
    # 10 layers on 4 stages: chunk 10 // 4 = 2, residual 2 -> the first two parts get one more: 3, 3, 2, 2.
    assert bl.partition_uniform(10, 4) == [0, 3, 6, 8, 10]
    # No more layers than stages: one layer each, then empty stages.
    assert bl.partition_uniform(2, 3) == [0, 1, 2, 2]
    assert bl.partition_balanced([7, 1], 3) == [0, 1, 2, 2]  # partition_balanced defers to it when n <= parts


def test_deepspeed_partition_balanced_minimizes_largest_minus_smallest():
    # [5, 1, 1, 1, 1, 1] into 3. Both [5 | 1 | 1 1 1 1] (5, 1, 4) and [5 | 1 1 1 | 1 1] (5, 3, 2) have the
    # smallest largest part (5): the pre-#4312 objective (min max) cannot tell them apart, and our old DP
    # returned [0, 1, 2, 6]. DeepSpeed now minimizes max - min: 5 - 1 = 4 against 5 - 2 = 3. The spread-3
    # splits are 5|111|11 and 5|11|111 (a first part of 6 leaves 4 for two parts: spread >= 6 - 2 = 4);
    # on the tie the DP keeps the later start of the last part (its `>=`): 5 | 1 1 1 | 1 1.
    assert bl.partition_balanced([5, 1, 1, 1, 1, 1], 3) == [0, 1, 4, 6]


def test_deepspeed_partition_balanced_dp_trace():
    # [1, 4, 2, 2] into 3, DeepSpeed's DP state (i weights, j parts) -> kept (max, min), spread max - min:
    #   (1,1) [1]: (1, 1) 0      (2,1) [1 4]: (5, 5) 0      (3,1) [1 4 2]: (7, 7) 0
    #   (2,2): start 1 -> [1 | 4] = (4, 1) 3
    #   (3,2): start 1 -> [1 | 4 2] = (6, 1) 5;  start 2 -> [1 4 | 2] = (5, 2) 3  => kept start 2
    #   (4,3): start 2 -> (2,2) + [2 2] = (max(4, 4), min(1, 4)) = (4, 1) 3
    #          start 3 -> (3,2) + [2]   = (max(5, 2), min(2, 2)) = (5, 2) 3  => tie, `>=` keeps start 3
    # boundaries: (4,3) <- 3, (3,2) <- 2, (2,1) <- 0  =>  [1 4 | 2 | 2]. Minimizing the largest part alone
    # would give [1 | 4 | 2 2] (largest 4 < 5): DeepSpeed's answer is not the min-max split.
    assert bl.partition_balanced([1, 4, 2, 2], 3) == [0, 2, 3, 4]
    assert bl.partition_balanced([1, 1, 1, 1], 2) == [0, 2, 4]


def test_deepspeed_counts_a_tied_weight_in_every_layer_and_splits_gpt3_tiny():
    pg, gm, model = _planned("gpt3-tiny")
    units, order, weights = bl.deepspeed_layer_weights(pg, gm, model)
    w = dict(zip(order, weights))
    assert order == ["wte", "wpe", "drop", "h.0", "h.1", "ln_f", "lm_head"]
    vocab = model.wte.weight.numel()
    assert model.lm_head.weight is model.wte.weight  # tied: DeepSpeed's TiedLayerSpec builds it on both layers
    assert w["wte"] == w["lm_head"] == vocab  # the tied matrix counts on the embedding AND on the head
    assert w["h.0"] == sum(p.numel() for p in model.h[0].parameters()) and w["drop"] == 0
    assert sum(weights) == sum(p.numel() for p in model.parameters()) + vocab
    # Four stages over the layer weights [E + P, 0, B, B, L + E] (E = wte, P = wpe, B = a block, L = ln_f):
    # with this config E + P = 36864, B = 49984, L + E = 32896, so [wte wpe drop | h.0 | h.1 | ln_f lm_head]
    # has spread B - (L + E) = 17088, and every other split is worse (moving wpe to stage 1:
    # 54080 - 32768 = 21312; putting ln_f with h.1: 50112 - 32768 = 17344; two blocks together: a part of
    # 99968). drop (0) ties on stage 0 or 1: the DP keeps the later start of h.0's part, so drop stays on 0.
    assert [w["wte"] + w["wpe"], w["h.0"], w["ln_f"] + w["lm_head"]] == [36864, 49984, 32896]
    stage_of = bl.deepspeed_parameters(pg, gm, model, 4)
    stage_of_unit = {u: stage_of[i] for i, u in enumerate(units)}
    assert stage_of_unit == {"wte": 0, "wpe": 0, "drop": 0, "h.0": 1, "h.1": 2, "ln_f": 3, "lm_head": 3}


# --- PiPPy: split_into_equal_size / _split_on_size_threshold_with_max_stages (pippy/ModelSplit.py) -----------


def test_pippy_buckets_cut_before_the_node_that_overflows():
    # Tensors a=4, b=3, c=5, d=1, e=9 elements (total 22); 3 stages -> threshold 22 // 3 = 7.
    sizes = [
        {},  # 0: reads nothing (an input): never cuts
        {"a": 4},  # 1: bucket 0 + 4 = 4 <= 7
        {"b": 3},  # 2: 4 + 3 = 7 <= 7
        {"b": 3},  # 3: b is already in the bucket: adds 0, 7 <= 7
        {},  # 4: reads nothing
        {"c": 5},  # 5: 7 + 5 = 12 > 7 -> cut before 5; bucket {c} = 5
        {"a": 4, "d": 1},  # 6: a is not in this bucket: 5 + 5 = 10 > 7 -> cut before 6; bucket {a, d} = 5
        {"e": 9},  # 7: 5 + 9 > 7 -> cut before 7; bucket {e} = 9 (over the threshold: it opened the bucket)
        {"d": 1},  # 8: 9 + 1 > 7 -> cut before 8
    ]
    assert bl.split_on_size_threshold(sizes, 7, max_stages=10) == [5, 6, 7, 8]
    # split_into_equal_size(3) keeps the first 3 - 1 cuts: stages [0..4], [5], [6..8] (the rest on the last).
    assert bl.split_on_size_threshold(sizes, 22 // 3, max_stages=3) == [5, 6]


def test_pippy_a_node_bigger_than_an_empty_bucket_is_a_stage_of_its_own():
    # threshold 5: node 0 (10) cannot fit an empty bucket -> the cut goes after it and the bucket stays empty,
    # so node 1 (10) is alone too; then 2 + 2 <= 5 share the last bucket.
    assert bl.split_on_size_threshold([{"x": 10}, {"w": 10}, {"y": 2}, {"z": 2}], 5, max_stages=10) == [1, 2]
    # Too few cuts for the stage count: PiPPy's `assert rv_nstages == nstages` fails (pippy_equal_size raises).
    assert bl.split_on_size_threshold([{"x": 10}, {"y": 1}], 11 // 3, max_stages=3) == [1]


def test_pippy_sizes_on_our_graph_are_what_torch_export_gives_pipeline():
    """PiPPy runs on torch.export's graph (torch.distributed.pipelining's `pipeline(split_policy=...)`): its
    nodes read their tensors through get_attr. Count the same way there and on our planning graph: the
    stages hold the same tensors."""
    pg, gm, model = _planned("gpt3-tiny")
    sizes, total = bl.pippy_node_sizes(pg, gm, model)
    assert total == sum(p.numel() for p in model.parameters())  # the tied matrix once (no buffers here)
    assert sizes[pg.names.index("lm_head")] == {"wte.weight": model.wte.weight.numel()}  # read again at the head
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    first = {}
    for n, t in named:
        first.setdefault(id(t), n)
    canon = {n: first[id(t)] for n, t in named}

    egm = torch.export.export(model, tuple(zoo.example_inputs("gpt3-tiny", batch=2))).module()
    state = egm.state_dict(keep_vars=True)
    enodes = [n for n in egm.graph.nodes if n.op == "call_function"]
    esizes = [
        {a.target: state[a.target].numel() for a in n.all_input_nodes if a.op == "get_attr" and a.target in state}
        for n in enodes
    ]
    etotal = sum(p.numel() for p in egm.parameters()) + sum(b.numel() for b in egm.buffers())
    assert etotal == total
    for stages in (2, 3, 4):
        cuts = bl.split_on_size_threshold(esizes, etotal // stages, stages)
        theirs = [set() for _ in range(stages)]
        for i, s in enumerate(esizes):
            theirs[sum(c <= i for c in cuts)] |= {canon[p] for p in s}
        stage_of = bl.pippy_equal_size(pg, gm, model, stages)
        ours = [set() for _ in range(stages)]
        for i, ps in enumerate(pg.params):
            ours[stage_of[i]] |= {canon[p] for p in ps}
        assert ours == theirs, stages


# --- SageMaker (after the docs): D'Hondt down the module tree ------------------------------------------------


def test_dhondt_and_smp_seats():
    # D'Hondt, costs [6, 3, 3], 4 seats; quotient cost / (seats + 1), ties to the earlier:
    #   seat 1: 6/1 -> A;  seat 2: A 6/2 = 3, B 3, C 3 -> A (earliest);  seat 3: A 6/3 = 2, B 3 -> B;  seat 4: C 3.
    assert bl.dhondt([6.0, 3.0, 3.0], 4) == [2, 1, 1]
    assert bl.smp_seats([6.0, 3.0, 3.0], 4) == [(0, 1, 2), (1, 2, 1), (2, 3, 1)]
    # Five children, 3 devices: more children than devices -> contiguous groups with the smallest largest cost:
    # [1 1 | 20 | 1 1] (20 is the least any split can have as its largest group). D'Hondt over [2, 20, 2]:
    # 20/1, 20/2 = 10, 20/3 = 6.7 all beat 2 -> the 20 gets the 3 devices (and recurses into them); the
    # others join its first / last stage. (Before: one device per group, the 20 on one device.)
    assert bl.smp_seats([1.0, 1.0, 20.0, 1.0, 1.0], 3) == [(0, 2, 0), (2, 3, 3), (3, 5, 0)]
    # Six equal children, 3 devices: groups of two, one device each.
    assert bl.smp_seats([1.0] * 6, 3) == [(0, 2, 1), (2, 4, 1), (4, 6, 1)]


def test_smp_costs_mix_compute_and_memory_shares():
    pg, gm, model = _planned("gpt3-tiny")
    everything = list(range(pg.n))
    assert bl.smp_costs(pg, [everything], 0.8) == pytest.approx([1.0])
    head = [pg.names.index("lm_head")]
    time_share = float(pg.compute[head].sum() / pg.compute.sum())
    assert bl.smp_costs(pg, [head], 0.0) == pytest.approx([time_share])
    used = {p for ps in pg.params for p in ps}
    memory = float(sum(pg.param_static[p] for p in used)) + float(pg.saved_bytes.sum())
    head_memory = pg.param_static["wte.weight"] + float(pg.saved_bytes[head].sum())
    assert bl.smp_costs(pg, [head], 1.0) == pytest.approx([head_memory / memory])
    assert bl.smp_costs(pg, [head], 0.8) == pytest.approx([0.2 * time_share + 0.8 * head_memory / memory])


def test_smp_spreads_the_bert_layer_list_over_the_devices():
    # BERT's root has 10 children (embeddings, layers, MLM head pieces): more than 4 devices. The old rule gave
    # each contiguous group one device, so the whole layer list sat on one. Now the layer list wins all
    # the devices by D'Hondt and its 8 layers split 2 per device.
    pg, gm, model = _planned("bert-tiny", n_layer=8)
    paths = bl.node_module_paths(gm, pg)
    stage_of = bl.smp_dhondt(pg, gm, model, 4)
    for k in range(8):
        assert {stage_of[i] for i, p in enumerate(paths) if p == f"layers.{k}" or p.startswith(f"layers.{k}.")} == {
            k // 2
        }


# --- every baseline on a zoo model's planning graph ---------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt3-tiny", "bert-tiny"])
@pytest.mark.parametrize("stages", [2, 3, 4])
@pytest.mark.parametrize("label", list(bl.BASELINES))
def test_every_baseline_is_a_valid_non_decreasing_assignment(name, stages, label):
    pg, gm, model = _planned(name)
    try:
        stage_of = bl.BASELINES[label](pg, gm, model, stages)
    except bl.NotApplicable:
        assert label == "uniform layers" and stages > 2  # 2 blocks cannot fill 3 stages by layers
        return
    assert len(stage_of) == pg.n
    assert all(a <= b for a, b in zip(stage_of, stage_of[1:]))  # contiguous in graph order
    used = max(stage_of) + 1
    assert sorted(set(stage_of)) == list(range(used))  # every stage non-empty
    assert used == stages  # each fills the stages on these models
    evaluate(pg, stage_of, used, microbatches=4)  # raises on an invalid pipeline
