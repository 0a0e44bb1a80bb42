"""Property tests: random modules that write in place (activations, views, setitem, buffers), pass bool and int
tensors and Python ints between stages, reuse modules and return lists, dicts and Nones; compiled for 2-5
devices with the pipeline forced or searched, training on and off.

For every drawn model:
- the planner's plan runs equal to the original: outputs, gradients and buffers, with stages sharing memory
  (the local runtime) and on separate "devices" (tests/stage_runs.py: per-stage copies of state and of every
  value received);
- soundness of the mutation order (partitioner.plan.ordering): random stage assignments that keep every data
  edge forward are either refused by plan validation or run equal to the original in both ways.
A model the original itself cannot run (autograd refuses an in-place write of a saved tensor) is discarded.
The "ci" profile runs 150 examples (deterministic); HYPOTHESIS_PROFILE=dev runs 2000.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from torch import nn

import partitioner
from partitioner.passes.split import split_stages
from partitioner.plan.graph import evaluate
from partitioner.plan.ordering import OrderViolation
from partitioner.runtime.local import LocalPipeline
from tests.stage_runs import run_on_devices

EXAMPLES = max(150, settings().max_examples)  # ci: 150, dev: 2000
WIDTH = 4
LINEARS = 3
BUFFERS = 2

# op kinds by what they read and make: "f" a float (batch, WIDTH) value, "b" bool, "i" int64 (batch, 1)
MAKE_FLOAT = ("linear", "tanh", "add", "scale_by_width", "reshape", "where", "gather", "read_buffer")
WRITE = ("add_", "relu_", "view_mul_", "slice_add_", "setitem", "masked_setitem", "buffer_add_", "buffer_ema_")
MAKE_OTHER = ("mask", "argmax")


@dataclass(frozen=True)
class Op:
    kind: str
    args: tuple[int, ...]  # value indices (0 = the input)
    k: int = 0  # which Linear / buffer


@dataclass(frozen=True)
class Program:
    ops: tuple[Op, ...]
    outputs: tuple[int, ...]
    structure: str  # "tuple" | "list" | "dict" | "nested"
    devices: int
    forced: bool  # pipeline forced to `devices` stages, else the search chooses
    training: bool
    batch: int


@st.composite
def programs(draw: st.DrawFn) -> Program:
    kinds = ["f"]  # kind of every value; value 0 is the input
    ops: list[Op] = []
    for _ in range(draw(st.integers(3, 9))):
        floats = [i for i, k in enumerate(kinds) if k == "f"]
        written = [i for i in floats if i > 0]  # never write the input in place (a leaf that needs grad)
        choice = draw(st.sampled_from(MAKE_FLOAT * 2 + WRITE + MAKE_OTHER))
        src = draw(st.sampled_from(floats))
        if choice in WRITE and choice.startswith("buffer"):
            ops.append(Op(choice, (src,), draw(st.integers(0, BUFFERS - 1))))
            continue
        if choice in WRITE:
            if written:
                ops.append(Op(choice, (draw(st.sampled_from(written)), src)))
            continue
        if choice == "where":
            masks = [i for i, k in enumerate(kinds) if k == "b"]
            if not masks:
                continue
            ops.append(Op(choice, (draw(st.sampled_from(masks)), src, draw(st.sampled_from(floats)))))
        elif choice == "gather":
            idx = [i for i, k in enumerate(kinds) if k == "i"]
            if not idx:
                continue
            ops.append(Op(choice, (src, draw(st.sampled_from(idx)))))
        elif choice == "add":
            ops.append(Op(choice, (src, draw(st.sampled_from(floats)))))
        else:
            ops.append(Op(choice, (src,), draw(st.integers(0, max(LINEARS, BUFFERS) - 1))))
        kinds.append("b" if choice == "mask" else "i" if choice == "argmax" else "f")
    floats = [i for i, k in enumerate(kinds) if k == "f" and i > 0] or [0]
    outputs = draw(st.lists(st.sampled_from(floats), min_size=1, max_size=3, unique=True))
    others = [i for i, k in enumerate(kinds) if k != "f"]
    if others and draw(st.booleans()):
        outputs.append(draw(st.sampled_from(others)))
    return Program(
        ops=tuple(ops),
        outputs=tuple(outputs),
        structure=draw(st.sampled_from(["tuple", "list", "dict", "nested"])),
        devices=draw(st.integers(2, 5)),
        forced=draw(st.booleans()),
        training=draw(st.booleans()),
        batch=draw(st.integers(1, 3)),
    )


class ProgramModule(nn.Module):
    """The program as a module (plain data, so fx unrolls it; setitem sends it through torch.export)."""

    def __init__(self, program: Program):
        super().__init__()
        self.program = program
        self.linears = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(LINEARS))
        for b in range(BUFFERS):
            self.register_buffer(f"buf{b}", torch.full((WIDTH,), 0.5 * b))

    def forward(self, x: torch.Tensor) -> Any:
        v: list[Any] = [x]
        for op in self.program.ops:
            a = v[op.args[0]]
            if op.kind == "linear":
                v.append(self.linears[op.k % LINEARS](a))
            elif op.kind == "tanh":
                v.append(torch.tanh(a))
            elif op.kind == "add":
                v.append(a + v[op.args[1]])
            elif op.kind == "scale_by_width":
                v.append(a * a.shape[-1] ** -0.5)
            elif op.kind == "reshape":
                v.append(a.view(a.shape[0] * a.shape[1] // WIDTH, -1) * 1.0)
            elif op.kind == "where":
                v.append(torch.where(a, v[op.args[1]], v[op.args[2]]))
            elif op.kind == "gather":
                v.append(a + a.gather(-1, v[op.args[1]]))
            elif op.kind == "read_buffer":
                v.append(a + getattr(self, f"buf{op.k % BUFFERS}"))
            elif op.kind == "mask":
                v.append(a > 0)
            elif op.kind == "argmax":
                v.append(a.argmax(-1, keepdim=True))
            elif op.kind == "add_":
                a.add_(v[op.args[1]])
            elif op.kind == "relu_":
                torch.relu_(a)
            elif op.kind == "view_mul_":
                a.view(-1).mul_(0.5)
            elif op.kind == "slice_add_":
                a[:, : WIDTH // 2].add_(1.0)
            elif op.kind == "setitem":
                a[:, 0] = 0.25
            elif op.kind == "masked_setitem":
                a[a > 1.0] = 1.0
            elif op.kind == "buffer_add_":
                getattr(self, f"buf{op.k}").add_(1.0)
            elif op.kind == "buffer_ema_":
                getattr(self, f"buf{op.k}").mul_(0.9).add_(a.detach().mean(0) * 0.1)
        outs = [v[i] for i in self.program.outputs]
        if self.program.structure == "tuple":
            return tuple(outs)
        if self.program.structure == "list":
            return outs
        if self.program.structure == "dict":
            return {f"out{i}": o for i, o in enumerate(outs)}
        return (outs[0], [*outs[1:], None], {"none": None})


def _floats(out: Any) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_leaves(out)
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _reference(model: nn.Module, x: torch.Tensor, training: bool) -> tuple[Any, torch.Tensor | None]:
    """The original's output and input gradient; discards programs the original cannot run."""
    x = x.clone().requires_grad_(training)
    try:
        out = model(x)
        if training:
            sum(t.square().sum() for t in _floats(out) if t.requires_grad).backward()
    except RuntimeError as e:  # autograd: a tensor saved for backward was written in place
        assume("inplace operation" not in str(e) and "in-place" not in str(e))
        raise
    return out, x.grad


def _restore(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(state[name])


def _run_assignment(
    cm: partitioner.CompiledModel, stage_of: list[int], x: torch.Tensor, initial: dict[str, torch.Tensor]
) -> tuple[Any, Any]:
    """Outputs of the stages for `stage_of` (planned node order), sharing memory and on separate devices, each
    from the buffers' `initial` values."""
    names = cm.planning_graph.names
    stages = split_stages(cm.captured.graph_module, dict(zip(names, stage_of)), max(stage_of) + 1)
    shared = copy.copy(cm)
    shared.stages = stages
    shared._runner = LocalPipeline(cm.captured, stages)
    with torch.no_grad():
        _restore(cm.model, initial)
        sharing = shared._runner(x.clone())
        _restore(cm.model, initial)
        return sharing, run_on_devices(shared, x.clone())[0]


def check_program(program: Program) -> list[str]:
    """Run every check of the module docstring; returns what happened, for hypothesis' statistics."""
    torch.manual_seed(0)
    model = ProgramModule(program)
    initial = {k: v.clone() for k, v in model.named_buffers()}
    reference = copy.deepcopy(model)
    x = torch.randn(program.batch, WIDTH)
    ref, ref_grad = _reference(reference, x, program.training)
    layout = {"pipeline": program.devices, "tensor_parallel": 1, "schedule": "gpipe"} if program.forced else {}
    try:
        cm = partitioner.compile(
            model, devices=program.devices, example_inputs=(x,), device_type="cpu", training=program.training,
            **layout,
        )  # fmt: skip
    except ValueError as e:  # a clear refusal: too few places to cut a small graph into this many stages
        assert any(m in str(e) for m in ("places to put a stage", "no parallel layout", "use fewer devices")), e
        return ["refused: too many devices for the graph"]
    happened = [f"captured by {cm.plan.capture}, {cm.plan.num_stages} stages"]

    # The planner's plan, sharing memory: outputs, gradients, buffers.
    x1 = x.clone().requires_grad_(program.training)
    out = cm(x1)
    torch.testing.assert_close(out, ref)
    assert type(out) is type(ref)
    if program.training:
        sum(t.square().sum() for t in _floats(out) if t.requires_grad).backward()
        torch.testing.assert_close(x1.grad, ref_grad)
        for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=f"gradient of {name}")
    final = {k: v.clone() for k, v in reference.named_buffers()}
    for name, b in model.named_buffers():
        torch.testing.assert_close(b, final[name], msg=f"buffer {name}")

    # ... and on separate devices.
    _restore(model, initial)
    with torch.no_grad():
        on_devices, _ = run_on_devices(cm, x.clone())
    torch.testing.assert_close(on_devices, ref)

    # Soundness: any assignment plan validation accepts runs equal to the original, both ways.
    pg, num_stages = cm.planning_graph, cm.plan.num_stages
    rng = random.Random(repr(program))
    ran = refused = 0
    for _ in range(6):
        stage_of = [0] * pg.n
        for i in range(pg.num_inputs, pg.n):
            lowest = max((stage_of[p] for p in pg.preds[i]), default=0)
            stage_of[i] = rng.randint(lowest, num_stages - 1)
        if len(set(stage_of)) != num_stages:
            continue
        try:
            evaluate(pg, stage_of, num_stages)
        except OrderViolation:
            refused += 1
            continue
        ran += 1
        shared, separate = _run_assignment(cm, stage_of, x, initial)
        where = f"stages {stage_of}"
        torch.testing.assert_close(shared, ref, msg=lambda m, where=where: f"sharing memory, {where}: {m}")
        torch.testing.assert_close(separate, ref, msg=lambda m, where=where: f"separate devices, {where}: {m}")
    happened.append(f"random assignments: {'some' if ran else 'none'} run, {'some' if refused else 'none'} refused")
    return happened


@settings(max_examples=EXAMPLES)
@given(programs())
def test_random_mutating_programs_run_exactly(program: Program) -> None:
    for what in check_program(program):
        event(what)


@pytest.mark.parametrize(
    "ops",
    [
        # the pattern: a read, then a write of the same activation
        (Op("linear", (0,)), Op("tanh", (1,)), Op("relu_", (1, 0)), Op("linear", (1,), 1), Op("add", (3, 2))),
        # a write through a view, the base read afterwards
        (Op("linear", (0,)), Op("linear", (0,), 1), Op("view_mul_", (1, 0)), Op("linear", (1,), 2), Op("add", (3, 2))),
        # a buffer written twice with reads in between
        (Op("linear", (0,)), Op("buffer_add_", (1,)), Op("read_buffer", (1,)), Op("linear", (2,), 1),
         Op("buffer_add_", (2,)), Op("read_buffer", (3,))),
    ],
    ids=["read-then-write", "write-through-view", "buffer-twice"],
)  # fmt: skip
def test_known_mutation_patterns_on_every_assignment(ops: tuple[Op, ...]) -> None:
    values = 1 + sum(op.kind not in WRITE for op in ops)
    check_program(Program(ops, (values - 1,), "tuple", devices=3, forced=True, training=True, batch=2))
