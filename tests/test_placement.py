"""Module placement (issue #20): models whose own forward branches or loops on tensor values compile by running
their forward and placing whole modules on stages; they run and train equal to the original model, in one process
and under torchrun (gloo)."""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import partitioner
from partitioner.capture.placement import METHOD, record_calls
from partitioner.devices import get_device_spec
from partitioner.launch import spawn
from partitioner.plan.placement import _Pricer, _splits, choose_units, units_of
from partitioner.plan.schema import Plan

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests import control_flow_models  # noqa: E402
from tests._dist_worker import reference_placement  # noqa: E402

CPU = get_device_spec("cpu")


def _compile(name: str, **kw: object) -> tuple[nn.Module, partitioner.CompiledModel]:
    net = control_flow_models.build(name)
    x, _ = control_flow_models.batch()
    kw = {"devices": 4, "device_type": "cpu", "verbose": False, **kw}
    return net, partitioner.compile(net, example_inputs=(x,), **kw)


@pytest.mark.parametrize("name", sorted(control_flow_models.MODELS))
def test_a_forward_that_branches_on_data_compiles_by_placement_and_runs_equal(name: str) -> None:
    net, cm = _compile(name)
    assert cm.plan.capture == METHOD
    assert cm.plan.fallbacks[0]["path"] == METHOD and "own code" in cm.plan.fallbacks[0]["reason"]
    for rows in (8, 3, 1):  # any batch: the model's own forward runs, branches and all
        x, _ = control_flow_models.batch(rows, seed=rows)
        torch.testing.assert_close(cm(x), net(x), rtol=0, atol=0)
    assert "captured with module-placement" in cm.plan.summary()
    assert Plan.from_json(cm.plan.to_json()) == cm.plan


@pytest.mark.parametrize(("name", "microbatches"), [("branch", 2), ("loop", 2), ("early-return", 2), ("loop", 4)])
def test_a_placement_step_trains_like_the_original_model(name: str, microbatches: int) -> None:
    """Three SGD steps through cm.step equal the original model's on the same microbatches (whose branches differ:
    tests.control_flow_models picks its thresholds so that they do)."""
    _, cm = _compile(name, microbatches=microbatches)
    x, y = control_flow_models.batch()
    opt = cm.make_optimizer(torch.optim.SGD, lr=0.1)
    losses = []
    for _ in range(3):
        losses.append(float(cm.step((x,), y, nn.functional.mse_loss)))
        opt.step()
        cm.zero_grad()
    ref_losses, ref_state = reference_placement(name, microbatches=microbatches)
    assert losses == pytest.approx(ref_losses, abs=1e-6, rel=0)
    for k, v in ref_state.items():
        torch.testing.assert_close(cm.model.state_dict()[k], v, atol=1e-6, rtol=0)


def test_a_placement_step_refuses_a_batch_that_does_not_split_evenly() -> None:
    _, cm = _compile("branch", microbatches=4)
    x, y = control_flow_models.batch(rows=6)
    with pytest.raises(ValueError, match="batch 6 does not split into 4 equal chunks"):
        cm.step((x,), y, nn.functional.mse_loss)


def test_the_recording_is_the_call_tree_of_the_branch_taken() -> None:
    net = control_flow_models.build("early-return")
    x, _ = control_flow_models.batch()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    record = record_calls(net, (x,), {}, training=True)
    assert [c.path for c in record.calls] == ["", "a", "b", "long_head"]  # 8 rows go the long way
    assert all(c.parent == 0 for c in record.calls[1:])
    assert [c.flops for c in record.calls[1:]] == [2 * 8 * 16 * 16] * 3  # a Linear's FLOPs, counted
    assert record.calls[0].flops == sum(c.flops for c in record.calls[1:])
    assert record.calls[1].in_bytes == x.numel() * 4 and record.calls[1].out_bytes == x.numel() * 4
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    assert all(p.grad is None for p in net.parameters())
    _, cm = _compile("early-return")
    never = [f for f in cm.plan.fallbacks if f["what"] == "short_head"]
    assert never and "not called in the recorded run" in never[0]["reason"]
    assert "short_head.weight" in cm.plan.stages[0].params


class _Wide(nn.Module):
    """A small head, then one large block of four layers: a fair split needs the block's layers placed apart."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 64)
        self.block = nn.Sequential(*(nn.Linear(64, 64) for _ in range(4)))
        self.tail = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        h = self.block(h) if h.mean() > -100 else h
        return self.tail(h)


def test_a_unit_larger_than_a_devices_share_is_split_into_the_modules_it_calls() -> None:
    net = _Wide()
    record = record_calls(net, (torch.randn(32, 8),), {}, training=True)
    assert [u.path for u in choose_units(record, CPU, devices=1)] == ["head", "block", "tail"]
    split = [u.path for u in choose_units(record, CPU, devices=4)]
    assert split == ["head", "block.0", "block.1", "block.2", "block.3", "tail"]
    cm = partitioner.compile(net, devices=4, example_inputs=(torch.randn(32, 8),), device_type="cpu", pipeline=4,
                             microbatches=4, verbose=False)  # fmt: skip
    assert cm.plan.num_stages == 4 and sorted(cm.plan.node_stage) == sorted(split)
    x = torch.randn(32, 8)
    torch.testing.assert_close(cm(x), net(x), rtol=0, atol=0)


def test_a_module_that_writes_its_input_in_place_is_never_placed() -> None:
    net = control_flow_models.build("in-place")
    x, _ = control_flow_models.batch()
    record = record_calls(net, (x,), {}, training=True)
    assert [c.path for c in record.calls if c.writes_inputs] == ["act", "block.1"]
    units = [u.path for u in choose_units(record, CPU, devices=2)]
    assert units == ["a", "block", "b"]
    cm = partitioner.compile(net, devices=2, example_inputs=(x,), device_type="cpu", pipeline=2, microbatches=2,
                             verbose=False)  # fmt: skip
    assert "act" not in cm.plan.node_stage
    notes = [f for f in cm.plan.fallbacks if f["what"] == "act"]
    assert notes and "in place" in notes[0]["reason"]
    assert not [f for f in cm.plan.fallbacks if f["what"] == "block.1"]  # it runs inside its placed block
    torch.testing.assert_close(cm(x), net(x), rtol=0, atol=0)


def test_the_split_is_the_best_contiguous_one_within_memory() -> None:
    """The DP's split against every contiguous split into the same number of stages, over random call trees."""
    rng = random.Random(0)
    for trial in range(30):
        widths = [rng.choice([4, 8, 16, 32]) for _ in range(rng.randint(2, 6))]
        layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip([8, *widths], widths))
        net = nn.Module()
        net.layers = layers
        record = record_calls(_Seq(layers), (torch.randn(4, 8),), {}, training=True)
        units = units_of(record, {f"layers.{i}" for i in range(len(widths))})
        pricer = _Pricer(record, units, CPU, microbatches=2)
        stages = rng.randint(1, len(units))
        limit = rng.choice([float("inf"), 2.0 * max(pricer.memory(pricer.stage(1, i, i + 1)) for i in
                                                   range(len(units)))])  # fmt: skip
        best = float("inf")
        for cuts in itertools.combinations(range(1, len(units)), stages - 1):
            bounds = [0, *cuts, len(units)]
            costs = [pricer.stage(s, bounds[s], bounds[s + 1]) for s in range(stages)]
            if all(pricer.memory(c) <= limit for c in costs):
                best = min(best, max(c.forward + c.backward for c in costs))
        bounds = _splits(pricer, stages, limit)
        if best == float("inf"):
            assert bounds is None, trial
            continue
        costs = [pricer.stage(s, bounds[s], bounds[s + 1]) for s in range(stages)]
        assert all(pricer.memory(c) <= limit for c in costs)
        assert max(c.forward + c.backward for c in costs) == pytest.approx(best, rel=1e-12), trial


class _Seq(nn.Module):
    def __init__(self, layers: nn.ModuleList) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x)) if x.sum() > -1e9 else x
        return x


def test_one_microbatch_keeps_one_stage_and_memory_forces_more() -> None:
    """With one microbatch the calls run one after another: a second stage only adds transfers, so the plan keeps one
    stage while it fits, and as few more as the memory limit needs."""
    _, cm = _compile("branch")
    assert cm.plan.num_stages == 1 and cm.plan.microbatches == 1
    weights = sum(p.numel() * 4 for p in control_flow_models.build("branch").parameters())
    _, tight = _compile("branch", memory_limit=weights * 4 * 0.6)  # 16 B of training state per fp32 weight
    assert tight.plan.num_stages == 2
    assert all(s.peak_memory <= tight.plan.memory_limit for s in tight.plan.stages)
    with pytest.raises(ValueError, match="no placement of the model's modules over 4 devices fits"):
        _compile("branch", memory_limit=weights)


def test_placement_refuses_what_it_cannot_do_and_can_be_forced() -> None:
    net = control_flow_models.build("branch")
    x, _ = control_flow_models.batch()
    with pytest.raises(ValueError, match=r"module placement.*\['tensor_parallel'\] do not apply"):
        partitioner.compile(net, devices=4, example_inputs=(x,), tensor_parallel=2, verbose=False)
    with pytest.raises(ValueError, match="capture='fx'"):
        partitioner.compile(net, devices=4, example_inputs=(x,), capture="fx", verbose=False)
    meta = control_flow_models.build("branch").to("meta")
    with pytest.raises(ValueError, match="build the model with real weights"):
        partitioner.compile(meta, devices=4, example_inputs=(x.to("meta"),), verbose=False)
    plain = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))  # fx captures it; placement when asked
    cm = partitioner.compile(plain, devices=2, example_inputs=(x,), capture=METHOD, pipeline=2, verbose=False)
    assert cm.plan.capture == METHOD and cm.plan.num_stages == 2
    torch.testing.assert_close(cm(x), plain(x), rtol=0, atol=0)


def test_a_saved_placement_plan_applies_to_the_same_model_only() -> None:
    _, cm = _compile("loop", pipeline=2, microbatches=2)
    x, _ = control_flow_models.batch()
    again = partitioner.compile(control_flow_models.build("loop"), devices=4, example_inputs=(x,),
                                plan=cm.plan.to_json(), verbose=False)  # fmt: skip
    assert again.plan == cm.plan
    with pytest.raises(ValueError, match="made for another model"):
        partitioner.compile(control_flow_models.build("branch"), devices=4, example_inputs=(x,), plan=cm.plan,
                            verbose=False)  # fmt: skip


@pytest.mark.parametrize(("name", "tied"), [("tied-head", ["proj.weight"]), ("nested", ["inner.bias", "inner.weight"])])
def test_a_parameter_used_on_two_stages_is_held_by_both(name: str, tied: list[str]) -> None:
    """A weight read by top-level code while its module is placed elsewhere, or a module called again inside another
    placed module: both stages hold it (their gradients summed under torchrun, checked below)."""
    _, cm = _compile(name, devices=2, pipeline=2, microbatches=2)
    assert cm.plan.tied_stages == dict.fromkeys(tied, [0, 1])
    assert all(name in s.params for s in cm.plan.stages for name in tied)
    assert "held by stages [0, 1]" in cm.plan.summary()
    assert cm.plan.predicted["tied_weight_sync"] > 0
    assert cm.plan.predicted["step_time"] == cm.plan.predicted["pipeline_time"] + cm.plan.predicted["tied_weight_sync"]
    # every stage's memory holds the training state (fp32 + Adam: 4x the weights) of all it holds, the copies too
    assert all(s.peak_memory >= 4 * s.param_bytes for s in cm.plan.stages)


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_placement_trains_under_torchrun_equal_to_one_process(tmp_path: Path) -> None:
    """Two gloo ranks, two stages, two microbatches whose branches differ: rank 0 runs the forward and sends stage 1's
    calls to rank 1; for every model of tests.control_flow_models (one world for all), 3 SGD steps equal the original
    model's in one process, and the merged state is the model's."""
    out = tmp_path / "out.pt"
    names = sorted(control_flow_models.MODELS)
    kw = {"models": names, "devices": 2, "pipeline": 2, "microbatches": 2, "out": str(out)}
    results = spawn("tests._dist_worker:train_placement", 2, kw, timeout=200, pg_timeout=30)
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} exited {r.returncode}:\n{r.stderr[-4000:]}"
    runs = torch.load(out)
    assert sorted(runs) == names
    for name, got in runs.items():
        assert got["stages"] == 2, name
        losses, state = reference_placement(name, microbatches=2)
        assert got["losses"] == pytest.approx(losses, abs=1e-5, rel=0), name
        assert set(got["state"]) == set(state), name
        for k, v in state.items():
            where = f"{name} {k}"
            torch.testing.assert_close(got["state"][k], v, atol=1e-5, rtol=0, msg=lambda m, w=where: f"{w}: {m}")


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_placement_overlaps_microbatches_across_ranks(tmp_path: Path) -> None:
    """Each call of two placed modules takes 0.2 s and a process runs one call at a time: rank 1 works on a
    microbatch while rank 0 works on the next one (GPipe's overlap), which one microbatch at a time never does."""
    out = tmp_path / "out.pt"
    results = spawn("tests._dist_worker:placement_overlap", 2, {"out": str(out)}, timeout=90, pg_timeout=30)
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} exited {r.returncode}:\n{r.stderr[-4000:]}"
    got = torch.load(out)
    assert got["stages"] == {"first": 0, "second": 1}
    local, remote = ([(s, e) for _, s, e in log] for log in got["logs"])
    assert len(local) == len(remote) == 4
    overlapping = [(a, b) for a in local for b in remote if max(a[0], b[0]) < min(a[1], b[1]) - 0.05]
    assert overlapping, f"no call of rank 1 overlaps one of rank 0: {local} {remote}"


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_a_module_failing_on_its_rank_is_named_by_the_driver() -> None:
    results = spawn("tests._dist_worker:placement_remote_failure", 2, {}, timeout=90, pg_timeout=30)
    assert all(r.returncode != 0 for r in results)
    assert "module 'd' failed on rank 1 (its stage): ValueError: broken on purpose" in results[0].stderr
