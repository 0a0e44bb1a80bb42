"""Mutation order (partitioner.plan.ordering): in-place writes keep their order on every plan, or the plan is
refused naming the two nodes. Each model is run three ways: the original, the compiled model (stages share
memory, as the local runtime does) and the stages on separate "devices" (tests/stage_runs.py: copies).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import partitioner
from partitioner.plan.ordering import OrderViolation
from tests.stage_runs import assert_buffers_kept, run_on_devices


class IssueRepro(nn.Module):
    """Issue #14's repro: `repeat` reads h before `h.mul_(2)`; no data edge orders the two."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.A, self.B, self.C1 = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(1, d)
        self.C = nn.Sequential(*[nn.Linear(d, d) for _ in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, o = self.A(x), self.B(x)
        r = h.repeat(1, 4)
        h.mul_(2)
        z = self.C(self.C1((h + o).sum(-1, keepdim=True)))
        return z.repeat(1, 4) * r


class CountedTwice(nn.Module):
    """A buffer updated twice with work in between: the read of the first update must not see the second."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.register_buffer("n", torch.zeros(()))
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(6))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in self.layers[:3]:
            x = layer(x)
        self.n.add_(1)
        y1 = x + self.n
        for layer in self.layers[3:]:
            x = layer(x)
        self.n.add_(1)
        return y1, x + self.n


class ViewWrite(nn.Module):
    """A write through a view: later readers of h read it by name, with no edge to the write."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        v = h.view(-1)
        g = self.b(torch.tanh(x))  # independent work the planner may place anywhere
        v.mul_(2)
        return self.d(self.c(h) + g)


class TwoAliases(nn.Module):
    """h and a view of it are both needed after work that lets the planner cut between them and the write."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.mid = nn.Sequential(*[nn.Linear(d, d) for _ in range(4)])
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        left = h[:, : h.shape[1] // 2]
        m = self.mid(x)
        left.add_(m[:, : m.shape[1] // 2])
        return self.out(h) + m


class InPlaceResidual(nn.Module):
    """A residual stream updated in place, `x.add_(block(x))`: must still pipeline at every block."""

    def __init__(self, d: int = 32, layers: int = 6):
        super().__init__()
        self.inp = nn.Linear(d, d)
        # ReLU first: the stream is not saved for backward, so autograd allows writing it in place.
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Linear(d, d), nn.ReLU(inplace=True)) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x.add_(block(x))  # (`x += ...` would trace to an out-of-place add: fx proxies have no __iadd__)
        return x


class ReusedNorm(nn.Module):
    """One BatchNorm called twice in train mode: its running statistics are updated twice, in order, on the
    device that holds them, so both calls and what lies between share a stage."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.bn = nn.BatchNorm1d(d)
        self.pre = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)
        self.post = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(self.bn(self.pre(x)))
        h = self.b(torch.relu(h))
        return self.post(self.bn(h))


class SetItem(nn.Module):
    """setitem and masked setitem on an activation (torch.fx cannot record them: captured by export)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        keep = h.clone()
        h[:, 0] = 0.0
        h[h < -0.5] = -0.5
        return self.c(self.b(h) + keep)


CASES = [IssueRepro, CountedTwice, ViewWrite, TwoAliases, InPlaceResidual, ReusedNorm, SetItem]


def _check(model: nn.Module, x: torch.Tensor, pipeline: int) -> partitioner.CompiledModel:
    reference, copies = copy.deepcopy(model), copy.deepcopy(model)
    cm = partitioner.compile(
        model, devices=pipeline, pipeline=pipeline, tensor_parallel=1, example_inputs=(x,), device_type="cpu"
    )
    assert cm.plan.num_stages == pipeline
    before = {k: v.clone() for k, v in model.named_buffers()}
    # Stages sharing memory (the local runtime) ...
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = cm(x1), reference(x2)
    torch.testing.assert_close(out, ref)
    sum(t.sum() for t in (out if isinstance(out, tuple) else (out,))).backward()
    sum(t.sum() for t in (ref if isinstance(ref, tuple) else (ref,))).backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=f"gradient of {name}")
    for (name, b), (_, rb) in zip(model.named_buffers(), reference.named_buffers()):
        torch.testing.assert_close(b, rb, msg=f"buffer {name}")
    # ... and on separate devices (copies of state and of every value received).
    cm_copies = partitioner.compile(
        copies, devices=pipeline, example_inputs=(x,), device_type="cpu", plan=cm.plan.to_json()
    )
    with torch.no_grad():
        out, modules = run_on_devices(cm_copies, x.clone())
    torch.testing.assert_close(out, ref)
    assert_buffers_kept(cm_copies, modules, reference, before)
    return cm


@pytest.mark.parametrize("pipeline", [2, 3, 5])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__)
def test_mutations_keep_their_order(case: type[nn.Module], pipeline: int) -> None:
    torch.manual_seed(0)
    model = case()
    d = next(model.parameters()).shape[-1]
    _check(model, torch.randn(8, d), pipeline)


def test_issue_repro_orders_the_read_before_the_write() -> None:
    torch.manual_seed(0)
    cm = _check(IssueRepro(), torch.randn(8, 64), 3)
    stage = cm.plan.node_stage
    assert stage["repeat"] <= stage["mul_"] <= stage["add"]
    assert cm.captured.method == "fx"


def test_in_place_residual_is_not_over_constrained() -> None:
    """The stream written in place by every block can still be cut anywhere between its writes."""
    torch.manual_seed(0)
    cm = _check(InPlaceResidual(layers=6), torch.randn(8, 32), 4)
    pg = cm.planning_graph
    writers = [i for i, name in enumerate(pg.names) if name.startswith("add_")]
    assert len(writers) == 6 and pg.order is not None
    assert pg.order.allowed_cuts().all()  # no boundary is forbidden ...
    limits = pg.order.segment_limits(pg.last_use())
    assert all(limits[w + 1] == pg.n for w in writers)  # ... and the cut right after each write is free


def test_too_many_stages_for_a_written_buffer_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"only \d+ places to put a stage .*in-place writes keep some nodes together"):
        partitioner.compile(
            ReusedNorm(), devices=9, pipeline=9, example_inputs=(torch.randn(8, 16),), device_type="cpu"
        )


def test_written_buffer_stays_on_one_stage() -> None:
    torch.manual_seed(0)
    cm = _check(CountedTwice(), torch.randn(8, 32), 5)
    stage = cm.plan.node_stage
    assert stage["add_"] == stage["add__1"]
    holders = [st.index for st in cm.plan.stages if "n" in st.params]
    assert holders == [stage["add_"]]


def _move(plan_json: str, moves: dict[str, int]) -> str:
    """A hand-edited plan: nodes moved to other stages, the stage lists kept consistent."""
    d = json.loads(plan_json)
    d["node_stage"].update(moves)
    for st in d["stages"]:
        st["nodes"] = [n for n, s in d["node_stage"].items() if s == st["index"]]
    return json.dumps(d)


def _compile_edited(model: nn.Module, x: torch.Tensor, pipeline: int, moves: dict[str, int]) -> None:
    # microbatches fixed: the moves name where the other nodes of this plan are (a search at fewer would cut elsewhere)
    cm = partitioner.compile(model, devices=pipeline, pipeline=pipeline, microbatches=8, example_inputs=(x,),
                             device_type="cpu")  # fmt: skip
    partitioner.compile(
        model, devices=pipeline, example_inputs=(x,), device_type="cpu", plan=_move(cm.plan.to_json(), moves)
    )


def test_saved_plan_breaking_a_write_after_read_is_refused() -> None:
    x = torch.randn(8, 64)
    with pytest.raises(OrderViolation, match=r"'repeat' reads the output of 'a' before 'mul_' writes it"):
        # the write and what it feeds on stage 1, the read it must follow on stage 2 with the rest of the model
        rest = {n: 2 for n in ("sum_1", "c1", "c_0", "c_1", "c_2", "c_3", "repeat_1", "mul")}
        _compile_edited(IssueRepro(), x, 3, {"a": 1, "b": 1, "mul_": 1, "add": 1, "repeat": 2} | rest)


def test_saved_plan_breaking_a_write_through_a_view_is_refused() -> None:
    """Every data edge of the edited plan goes forward; only the write through the view is out of order."""
    x = torch.randn(8, 32)
    with pytest.raises(OrderViolation, match=r"'c' reads the output of 'a' after 'mul_' writes it"):
        _compile_edited(ViewWrite(), x, 3, {"a": 0, "view": 0, "c": 1, "tanh": 0, "b": 0, "mul_": 2, "add": 2, "d": 2})


def test_saved_plan_splitting_a_buffers_writes_is_refused() -> None:
    x = torch.randn(8, 32)
    with pytest.raises(OrderViolation, match=r"'n' is a parameter or buffer written in place"):
        _compile_edited(
            CountedTwice(), x, 2,
            {"layers_0": 0, "layers_1": 0, "layers_2": 0, "add_": 0, "add": 0, "layers_3": 1, "layers_4": 1,
             "layers_5": 1, "add__1": 1, "add_1": 1},
        )  # fmt: skip


def test_saved_plan_sending_two_aliases_to_the_writing_stage_is_refused() -> None:
    x = torch.randn(8, 32)
    model = TwoAliases()
    cm = partitioner.compile(model, devices=2, pipeline=2, example_inputs=(x,), device_type="cpu")
    names = list(cm.plan.node_stage)
    writer = names.index("add_")
    moves = {n: (0 if i <= names.index("getitem_1") else 1) for i, n in enumerate(names)}  # h[:, :k] on stage 0
    moves.update({n: 1 for n in names[writer:]})
    with pytest.raises(OrderViolation, match=r"alias one storage .* reach stage 1"):
        partitioner.compile(
            model, devices=2, example_inputs=(x,), device_type="cpu", plan=_move(cm.plan.to_json(), moves)
        )


def test_annotate_records_reads_and_writes() -> None:
    cm = partitioner.compile(IssueRepro(), devices=1, example_inputs=(torch.randn(4, 64),), device_type="cpu")
    nodes = {n.name: n for n in cm.captured.graph_module.graph.nodes}
    assert nodes["mul_"].meta["writes"] == ["a"]
    assert nodes["repeat"].meta["reads"] == ["a"] and nodes["repeat"].meta["storages"] == ["repeat"]
    assert nodes["a"].meta["writes"] == []
