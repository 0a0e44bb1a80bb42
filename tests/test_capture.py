"""capture: the fallback chain (fx -> torch.export -> module-level leaves), its normal form, and the
guarantees around it (no silently baked branch or in-place update, the model left untouched)."""

from __future__ import annotations

import collections
import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import partitioner
from partitioner.capture import CaptureError, DynamicDim, capture, flat_arguments
from partitioner.plan.search import default_microbatches


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


def _run(captured: Any, *args: Any, **kwargs: Any) -> Any:
    flat = captured.graph_module(*captured.flatten_inputs(args, kwargs))
    return captured.unflatten_output(list(flat))


# ---------------------------------------------------------------------------------------------------
# normal form


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 2.0, *, bias: torch.Tensor
    ) -> dict[str, Any]:
        h = self.lin(x) * scale + bias
        if mask is not None:
            h = h * mask
        return {"h": h, "pair": (h.sum(), x)}


def test_fx_normal_form() -> None:
    m, x, b = Plain(), torch.randn(2, 4), torch.randn(4)
    c = capture(m, (x,), {"bias": b})
    assert c.method == "fx" and c.fallbacks == [] and c.input_shapes is None
    assert c.input_names == ["x", "bias"]
    assert c.constants == {"mask": None, "scale": 2.0}
    assert [p.target for p in c.graph_module.graph.nodes if p.op == "placeholder"] == ["x", "bias"]
    assert dict(c.graph_module.named_parameters()).keys() == dict(m.named_parameters()).keys()
    torch.testing.assert_close(_run(c, x, bias=b), m(x, bias=b))
    torch.testing.assert_close(_run(c, torch.randn(5, 4), bias=b)["h"].shape, torch.Size([5, 4]))  # dynamic batch
    with pytest.raises(ValueError, match="'scale' was 2.0 .* compile again"):
        c.flatten_inputs((x,), {"bias": b, "scale": 3.0})
    with pytest.raises(ValueError, match="'mask' was None"):
        c.flatten_inputs((x, x), {"bias": b})


class VarArgs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor, *rest: torch.Tensor, **extra: Any) -> torch.Tensor:
        h = self.lin(x)
        for r in rest:
            h = h + r
        if extra.get("flip", False):
            h = -h
        return h * extra["gain"]


def test_var_positional_and_keyword_arguments_are_named_inputs() -> None:
    m = VarArgs()
    x, r0, r1, gain = (torch.randn(2, 3) for _ in range(4))
    c = capture(m, (x, r0, r1), {"gain": gain, "flip": True})
    assert c.input_names == ["x", "rest_0", "rest_1", "gain"]
    assert c.constants == {"flip": True}
    torch.testing.assert_close(_run(c, x, r0, r1, gain=gain, flip=True), m(x, r0, r1, gain=gain, flip=True))
    with pytest.raises(ValueError, match=r"\['other'\] were not passed"):
        c.flatten_inputs((x, r0, r1), {"gain": gain, "flip": True, "other": 1})
    sig = c.signature
    assert list(flat_arguments(sig, sig.bind(x, gain=gain))) == ["x", "gain"]


def test_tensors_inside_containers_are_refused() -> None:
    class TakesList(nn.Module):
        def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
            return xs[0] + xs[1]

    with pytest.raises(ValueError, match="'xs' is a list holding tensors.*separate arguments"):
        capture(TakesList(), ([torch.randn(2), torch.randn(2)],))


# ---------------------------------------------------------------------------------------------------
# the fallback chain


class Branch(nn.Module):
    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent: fx and export both refuse it
            return self.lin(x)
        return x * 0.5


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.branch = Branch()
        self.post = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.branch(self.pre(x)))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.block = Block()
        self.last = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.block(self.first(x)))


def test_smallest_untraceable_module_becomes_the_leaf() -> None:
    m, x = Net(), torch.randn(3, 4)
    c = capture(m, (x,))
    assert c.method == "module-level"
    assert c.leaves == ["block.branch"]  # not "block": its other children are still traced
    targets = [n.target for n in c.graph_module.graph.nodes if n.op == "call_module"]
    assert targets == ["first", "block.pre", "block.branch", "block.post", "last"]
    paths = [(f.what, f.path) for f in c.fallbacks]
    assert paths == [("", "torch.export"), ("", "module-level"), ("block.branch", "leaf")]
    assert "TraceError" in c.fallbacks[0].reason and "torch.export failed" in c.fallbacks[1].reason
    assert "symbolically traced variables cannot be used as inputs to control flow" in c.fallbacks[2].reason
    for sign in (1.0, -1.0):  # both branches, as the original takes them
        xs = torch.randn(3, 4).abs() * sign
        torch.testing.assert_close(_run(c, xs), m(xs))


def test_leaf_output_that_breaks_its_parent_makes_the_parent_the_leaf() -> None:
    class Parent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Branch()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inner(x)
            return self.lin(h) if h.mean() > 0 else h  # a branch on the leaf's output

    class Top(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.parent = Parent()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.parent(self.a(x))

    m = Top()
    c = capture(m, (torch.randn(2, 4),))
    assert c.leaves == ["parent"]  # "parent.inner" is subsumed
    for x in (torch.full((2, 4), 5.0), torch.full((2, 4), -5.0)):
        torch.testing.assert_close(_run(c, x), m(x))


def test_capture_leaves_the_models_attributes_the_objects_they_were() -> None:
    """torch.export (non-strict) swaps a module's list attributes for copies; capture puts the user's objects back, so
    a model that appends to a list it holds appends to that list after compile."""

    class Logs(nn.Module):
        def __init__(self, log: list) -> None:
            super().__init__()
            self.lin, self.log = nn.Linear(4, 4), log

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.log.append(x.shape[0])
            return self.lin(x)

    class Root(nn.Module):
        def __init__(self, log: list) -> None:
            super().__init__()
            self.inner = Logs(log)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inner(x)
            return h if h.sum() > 0 else -h  # fx and export fail here: export ran (and swapped) first

    log: list = []
    model = Root(log)
    with pytest.raises(CaptureError):
        capture(model, (torch.randn(2, 4),))
    assert model.inner.log is log


def test_a_failed_export_does_not_flood_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    """torch.export prints the partial graph of a failed attempt to stderr (tens of lines, each attempt): capture
    holds that back, the reason being in its error in a line."""

    class TopBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.lin(x)
            return h if h.sum() > 0 else -h

    with pytest.raises(CaptureError, match="torch.export failed"):
        capture(TopBranch(), (torch.randn(2, 4),))
    err = capfd.readouterr().err
    assert "def forward" not in err and "Unable to find user code" not in err, err[:500]


def test_failure_in_the_models_own_forward_is_a_clear_error() -> None:
    class TopBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) if x.sum() > 0 else x

    m = TopBranch()
    before = _state(m)
    with pytest.raises(CaptureError, match="TopBranch.forward's own code.*submodule.*torch.cond") as info:
        capture(m, (torch.randn(2, 4),))
    assert "torch.fx.symbolic_trace failed" in str(info.value) and "torch.export failed" in str(info.value)
    _assert_same_state(m, before)


class Cond(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda t: self.lin(t), lambda t: t - 1.0, (x,))


def test_export_path_keeps_the_batch_dynamic_and_fixes_what_the_model_fixes() -> None:
    m, x = Cond(), torch.randn(3, 4)
    c = capture(m, (x,))
    assert c.method == "export" and [f.path for f in c.fallbacks] == ["torch.export"]
    (batch, features) = c.input_shapes["x"]
    assert isinstance(batch, DynamicDim) and (batch.min, batch.max) == (1, None)
    assert features == 4  # the weight fixes it
    assert c.graph_module.get_parameter("lin.weight") is m.lin.weight  # shares the model's parameters
    for xs in (x.abs(), -x.abs(), torch.randn(1, 4).abs(), -torch.randn(7, 4).abs()):  # any batch, both branches
        torch.testing.assert_close(_run(c, xs), m(xs))
    with pytest.raises(ValueError, match=r"'x' has size 5 in dim 1.*torch.export for 4 there.*pass inputs with 4"):
        c.flatten_inputs((torch.randn(3, 5),), {})
    with pytest.raises(ValueError, match=r"'x' has 3 dims.*for 2"):
        c.flatten_inputs((torch.randn(3, 4, 1),), {})


def test_export_ranges_and_equal_dims_are_checked() -> None:
    class Sized(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            h = torch.cond(x.sum() > 0, lambda t: t * 2.0, lambda t: t - 1.0, (self.lin(x) + y,))
            return h * 2.0 if x.shape[0] > 4 else h  # a branch on the batch size: a range, not a baked branch

    m, x, y = Sized(), torch.randn(6, 4), torch.randn(6, 4)
    c = capture(m, (x, y))
    assert c.method == "export"
    bx, by = c.input_shapes["x"][0], c.input_shapes["y"][0]
    assert bx.symbol == by.symbol and bx.min == 5  # added together: one symbol; the branch: 5 or more
    assert [f.path for f in c.fallbacks] == ["torch.export", "batch > 1"]
    assert "dim 0 of 'x' must be 5 or more" in c.fallbacks[-1].reason
    for rows in (5, 9):
        xs, ys = torch.randn(rows, 4), torch.randn(rows, 4)
        torch.testing.assert_close(_run(c, xs, ys), m(xs, ys))
    with pytest.raises(ValueError, match=r"'x' has size 3 in dim 0.*sizes 5 to any"):
        c.flatten_inputs((torch.randn(3, 4), torch.randn(3, 4)), {})
    with pytest.raises(ValueError, match=r"'y' has size 7 in dim 0 and 'x' has 6 in dim 0.*equal"):
        c.flatten_inputs((x, torch.randn(7, 4)), {})


class OneRowApart(nn.Module):
    """Computes something else for one row: torch's default export (2+ rows assumed to hold for 1) would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cond(x.sum() > 0, lambda t: t * 2.0, lambda t: t - 1.0, (self.lin(x),))
        return h * 3.0 if x.shape[0] == 1 else h


class OneRowAlike(nn.Module):
    """HF's position-ids pattern: expands only when the batch is not 1, which computes the same for one row."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("pos", torch.arange(4.0)[None])  # (1, 4)

    def positions(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos.expand(x.shape[0], -1) if x.shape[0] != self.pos.shape[0] else self.pos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda t: t * 2.0, lambda t: t - 1.0, (self.lin(x) + self.positions(x),))


def test_one_row_batches_are_taken_where_the_graph_is_shown_to_hold_for_them() -> None:
    x = torch.randn(8, 4)
    alike = OneRowAlike()
    c = capture(alike, (x,))
    assert [f.path for f in c.fallbacks] == ["torch.export"] and c.input_shapes["x"][0].min == 1
    for rows in (1, 2, 5):
        torch.testing.assert_close(_run(c, x[:rows]), alike(x[:rows]))

    apart = OneRowApart()
    c = capture(apart, (x,))
    assert [f.path for f in c.fallbacks] == ["torch.export", "batch > 1"]
    assert "computes something else" in c.fallbacks[-1].reason and "assumed 2 rows or more" in c.fallbacks[-1].reason
    assert c.input_shapes["x"][0].min == 2
    torch.testing.assert_close(_run(c, x[:2]), apart(x[:2]))
    with pytest.raises(ValueError, match=r"'x' has size 1 in dim 0.*sizes 2 to any"):
        c.flatten_inputs((x[:1],), {})


class SizeBranchAlike(OneRowAlike):
    """OneRowAlike without torch.cond (its branch on the batch size alone defeats fx): nothing data-dependent, so it
    runs on meta tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x) + self.positions(x))


class SizeBranchApart(SizeBranchAlike):
    """The same calls at one row and at more, with another constant at one row: a different computation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * (3.0 if x.shape[0] == 1 else 2.0)


def test_on_meta_one_row_is_taken_where_the_graph_makes_the_calls_of_the_model_s_own_one_row_trace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No weights on meta to run the export that assumes one row computes like two: its ATen calls at one row are
    compared with those of the model exported at one row (capture.one_row), an expand to the size it has being no
    call. Alike: taken (the graph the real weights' run check takes, code for code); apart: refused, naming why."""
    exports = []
    real = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: exports.append(k) or real(*a, **k))
    x = torch.randn(8, 4)
    for cls in (SizeBranchAlike, SizeBranchApart):
        with torch.device("meta"):
            on_meta = cls()
        c = capture(on_meta, (torch.empty(8, 4, device="meta"),))
        checked = capture(cls(), (x,))  # real weights: the run on one row decides
        if cls is SizeBranchAlike:
            assert [f.path for f in c.fallbacks] == [f.path for f in checked.fallbacks] == ["torch.export"]
            assert c.input_shapes["x"][0].min == 1 and c.graph_module.code == checked.graph_module.code
        else:
            assert [f.path for f in c.fallbacks] == [f.path for f in checked.fallbacks] == ["torch.export", "batch > 1"]
            assert "call 1 differs at one row" in c.fallbacks[-1].reason and "3.0" in c.fallbacks[-1].reason
    assert len(exports) == 2 * (2 + 1)  # per model: assumed and one row (meta) / assumed, checked by a run


def test_a_view_given_as_example_is_captured_as_a_plain_tensor() -> None:
    """`tokens[:, :-1]` as the example: export, not size-oblivious, guards on the view's base
    (`x._base.size()[1] != x.size()[1]`), which a plain tensor breaks; capture traces a copy, so the one-row check
    holds (no "batch > 1") and calls with plain tensors of any batch run."""
    model, base = OneRowAlike(), torch.randn(8, 5)
    c = capture(model, (base[:, :-1],))
    assert [f.path for f in c.fallbacks] == ["torch.export"] and c.input_shapes["x"][0].min == 1
    for rows in (1, 3):
        x = torch.randn(rows, 4)
        torch.testing.assert_close(_run(c, x), model(x))


def test_default_microbatches_keep_two_rows_where_the_graph_refuses_one() -> None:
    """A graph that refuses one-row batches (the model computes something else at one row, so the batch's range
    stays from 2, where torch's default export put it): the default microbatch count leaves every chunk 2 rows or
    more (the search may then take fewer), and the step runs."""
    torch.manual_seed(0)
    model, x, y = OneRowApart(), torch.randn(4, 4), torch.randn(4, 4)
    assert default_microbatches(4, 1, 1, None, min_chunk=2) == 2  # 4 (= 4 x pipeline) would cut one-row chunks
    cm = partitioner.compile(model, devices=1, example_inputs=(x,), device_type="cpu")
    assert "batch > 1" in [f["path"] for f in cm.plan.fallbacks]
    rows = 4 // cm.plan.microbatches
    assert rows >= 2
    mse, reference = torch.nn.functional.mse_loss, copy.deepcopy(model)
    expected = torch.stack([mse(reference(a), b) for a, b in zip(x.split(rows), y.split(rows))]).mean()
    torch.testing.assert_close(cm.step((x,), y, mse), expected)


def test_pinned_batch_dim_is_a_static_shapes_fallback_with_a_clear_error() -> None:
    class Pinned(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.register_buffer("table", torch.randn(6, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cond(x.sum() > 0, lambda t: t * 2.0, lambda t: t - 1.0, (self.lin(x) + self.table,))

    m, x = Pinned(), torch.randn(6, 4)
    c = capture(m, (x,))
    assert c.input_shapes == {"x": (6, 4)}
    (static,) = [f for f in c.fallbacks if f.path == "static shapes"]
    assert static.what == "" and "dim 0 of 'x' to 6" in static.reason
    torch.testing.assert_close(_run(c, x), m(x))
    with pytest.raises(ValueError, match=r"'x' has size 2 in dim 0.*batch dim could not be made dynamic.*microbatches"):
        c.flatten_inputs((x[:2],), {})
    (whole,) = c.flatten_inputs((torch.cat([x, x]),), {}, shapes=False)  # a runtime checks its microbatches instead
    c.check_shapes({"x": whole[:6]})


# ---------------------------------------------------------------------------------------------------
# nothing is baked, nothing is changed


def test_buffer_updates_are_recorded_not_run_at_trace_time() -> None:
    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("count", torch.zeros((), dtype=torch.long))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.count.add_(1)
            return self.lin(x)

    m = Counter()
    c = capture(m, (torch.randn(1, 2),))
    assert m.count.item() == 0  # capture did not run the update
    _run(c, torch.randn(1, 2))
    _run(c, torch.randn(1, 2))
    assert m.count.item() == 2  # the graph does


def test_in_place_ops_get_data_edges() -> None:
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            h.mul_(2.0)  # nobody uses its result: without the rewrite it could be planned after self.b
            h = self.act(h)
            return self.b(h) + h

    m = InPlace()
    c = capture(m, (torch.randn(2, 3),))
    nodes = {n.name: n for n in c.graph_module.graph.nodes}
    assert nodes["act"].args[0] is nodes["mul_"]
    assert nodes["b"].args[0] is nodes["act"]
    x = torch.randn(2, 3)
    torch.testing.assert_close(_run(c, x), m(x))


def test_leaf_profiling_leaves_model_and_rng_untouched() -> None:
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(4)
            self.drop = nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.drop(self.bn(x))
            return h if h.sum() > 0 else -h

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.noisy = Noisy()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.noisy(self.lin(x)) + self.noisy(x)  # the leaf is called twice

    m, x = Outer(), torch.randn(6, 4)
    x_before, state, rng = x.clone(), _state(m), torch.get_rng_state()
    c = capture(m, (x,))
    _assert_same_state(m, state)
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(x, x_before)
    leaves = [n for n in c.graph_module.graph.nodes if n.op == "call_module" and n.target == "noisy"]
    assert len(leaves) == 2 and all(n.meta["leaf_profile"].source == "measured" for n in leaves)
    reference = copy.deepcopy(m)
    torch.manual_seed(3)
    out = _run(c, x)
    torch.manual_seed(3)
    torch.testing.assert_close(out, reference(x))
    torch.testing.assert_close(m.noisy.bn.running_mean, reference.noisy.bn.running_mean)


def test_fallbacks_reach_the_plan_and_its_summary(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="partitioner"):
        cm = partitioner.compile(Net(), devices=2, example_inputs=(torch.randn(3, 4),), device_type="cpu", pipeline=2)
    assert cm.plan.capture == "module-level"
    warned = [r.getMessage() for r in caplog.records if "opaque leaves" in r.getMessage()]
    assert len(warned) == 1 and "block.branch" in warned[0] and "torch.export failed" in warned[0]
    assert any({"what": "block.branch", "path": "leaf"}.items() <= f.items() for f in cm.plan.fallbacks)
    summary = cm.plan.summary()
    assert "block.branch" in summary and "leaf" in summary
    again = partitioner.Plan.from_json(cm.plan.to_json())
    assert again.fallbacks == cm.plan.fallbacks


def test_python_state_updated_in_forward_makes_the_module_a_leaf() -> None:
    class Stepper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.steps = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.steps += 1  # fx and export would run this once, at trace time
            return self.lin(x) * self.steps

    class Host(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(2, 2)
            self.stepper = Stepper()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.stepper(self.inp(x))

    m, ref = Host(), Host()
    ref.load_state_dict(m.state_dict())
    c = capture(m, (torch.randn(1, 2),))
    assert c.method == "module-level" and c.leaves == ["stepper"]
    assert "Python attribute 'steps'" in c.fallbacks[-1].reason
    assert m.stepper.steps == 0  # capture put it back
    for _ in range(3):
        x = torch.randn(1, 2)
        torch.testing.assert_close(_run(c, x), ref(x))
    assert m.stepper.steps == 3


def test_module_level_plan_is_deterministic_and_reapplies() -> None:
    def make() -> partitioner.CompiledModel:
        torch.manual_seed(0)
        return partitioner.compile(Net(), devices=2, example_inputs=(torch.randn(3, 4),), device_type="cpu", pipeline=2)

    first, second = make(), make()
    assert first.plan.to_json() == second.plan.to_json()
    model = Net()
    again = partitioner.compile(
        model, devices=2, example_inputs=(torch.randn(3, 4),), device_type="cpu", plan=first.plan.to_json()
    )
    assert again.plan.node_stage == first.plan.node_stage
    x = torch.randn(3, 4)
    torch.testing.assert_close(again(x), model(x))


# ---------------------------------------------------------------------------------------------------
# outputs keep their types (not fx's immutable_list / immutable_dict)

Pair = collections.namedtuple("Pair", ["first", "second"])

OUTPUTS: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {
    "tensor": lambda h, x: h,
    "list": lambda h, x: [h, x],
    "tuple": lambda h, x: (h, (x, h)),
    "namedtuple": lambda h, x: Pair(h, x),
    "dict": lambda h, x: {"h": h, "rest": [x, {"pair": Pair(h, x)}]},
    "ordered_dict": lambda h, x: collections.OrderedDict(h=h, x=x),
    "nested_none": lambda h, x: (h, None, {"none": None, "x": [x, None]}),
}


class Returns(nn.Module):
    """Returns OUTPUTS[kind]; `path` picks the capture path: fx, export (a branch on a size), module-level (a leaf)."""

    def __init__(self, kind: str, path: str) -> None:
        super().__init__()
        self.kind, self.path = kind, path
        self.lin = nn.Linear(4, 4)
        self.branch = Branch()

    def forward(self, x: torch.Tensor) -> Any:
        h = self.lin(x)
        if self.path == "export" and h.shape[-1] != 4:  # fx cannot branch on a traced size; export reads it
            raise ValueError("expected 4 features")
        elif self.path == "module-level":
            h = self.branch(h)
        return OUTPUTS[self.kind](h, x)


def _same_structure(out: Any, ref: Any) -> None:
    """Same container types all the way down (pytree specs compare types), same tensors."""
    assert pytree.tree_structure(out) == pytree.tree_structure(ref)
    assert type(out) is type(ref)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("kind", list(OUTPUTS))
@pytest.mark.parametrize("path", ["fx", "export", "module-level"])
def test_outputs_keep_their_types(kind: str, path: str) -> None:
    m, x = Returns(kind, path), torch.randn(3, 4).abs()
    c = capture(m, (x,))
    assert c.method == path
    out = _run(c, x)
    _same_structure(out, m(x))
    if isinstance(out, list):
        out.append(x)  # fx's immutable_list refused this
    if isinstance(out, dict):
        out["new"] = x


def test_compiled_model_returns_the_models_own_containers() -> None:
    m, x = Returns("dict", "module-level"), torch.randn(3, 4).abs()
    cm = partitioner.compile(m, devices=2, example_inputs=(x,), device_type="cpu", pipeline=2)
    out = cm(x)
    _same_structure(out, m(x))
    out["rest"].append(x)


@pytest.mark.parametrize("path", ["export", "module-level"])
def test_huggingface_model_output_on_export_and_module_level(path: str) -> None:
    outputs = pytest.importorskip("transformers.modeling_outputs")

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Returns("tensor", path)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> Any:
            h = self.inner(x)
            return outputs.SequenceClassifierOutput(logits=self.head(h), hidden_states=(x, h))  # loss: None

    m, x = Encoder(), torch.randn(3, 4).abs()
    cm = partitioner.compile(m, devices=2, example_inputs=(x,), device_type="cpu", pipeline=2)
    assert cm.plan.capture == path
    out = cm(x)
    ref = m(x)
    _same_structure(out, ref)
    assert isinstance(out, outputs.SequenceClassifierOutput) and out.loss is None
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out["hidden_states"], ref.hidden_states)


def test_kernel_calls_are_graph_nodes_however_they_are_imported() -> None:
    """Every `kernels` function is an fx leaf (kernels._dispatch.fx_leaf): a model that neither wraps it with
    torch.fx.wrap nor imports it by name is captured by fx with the call as one node, and runs equal."""
    from partitioner import kernels
    from partitioner.kernels import slot_attention

    class Slots(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            out, attn = slot_attention(self.q(x), k, k, return_attn=True)
            again, _ = kernels.slot_attention(out, k, k)  # through the package
            return again + attn.sum(-1, keepdim=True)

    torch.manual_seed(0)
    model, x, k = Slots(), torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    c = capture(model, (x, k))
    assert [f.path for f in c.fallbacks] == []  # fx, no export fallback
    calls = [n for n in c.graph_module.graph.nodes if n.target is kernels.slot_attention]
    assert len(calls) == 2 and all(n.op == "call_function" for n in calls)
    torch.testing.assert_close(_run(c, x, k), model(x, k))


def test_an_input_named_like_a_builtin_is_bound_by_its_own_name() -> None:
    """nn.GRUCell.forward(input, hx=None) goes to torch.export (fx cannot trace its branch on input.dim()), whose
    placeholder for `input` fx names `input_1`: inputs and export's guards are bound by the argument's name."""
    torch.manual_seed(0)
    cell, x = nn.GRUCell(4, 6), torch.randn(4, 4)
    c = capture(cell, (x,))
    assert c.method == "export" and c.input_names == ["input"]
    for rows in (1, 3):
        h = torch.randn(rows, 4)
        torch.testing.assert_close(_run(c, h), cell(h))


class _Carrier:
    """A plain class holding a tensor: not a pytree node, so torch.export cannot return it."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


class _ShapeBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[-1] > 2 else x  # a branch on a shape: torch.fx refuses it, torch.export takes it


class _ReturnsCarrier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.branch = _ShapeBranch()

    def forward(self, x: torch.Tensor) -> Any:
        h = self.branch(self.lin(x))
        return h, _Carrier(h)


def test_an_output_export_cannot_return_is_named_with_the_fix() -> None:
    """torch.export refuses an output type that is no pytree node (and fx a branch, so no path captures the model):
    the error says what to register."""
    with pytest.raises(CaptureError, match=r"returns a _Carrier: register it as a pytree node"):
        capture(_ReturnsCarrier(), (torch.randn(3, 4),))


def test_an_hf_causal_lm_with_its_cache_on_is_told_to_turn_it_off() -> None:
    """A causal LM returns a DynamicCache unless use_cache=False, which torch.export refuses: capture falls back to
    the whole model as one leaf, and the reason says to turn the cache off (with it off, export captures HF causal
    LMs: tests/test_hf_training.py)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    captured = capture(model, (torch.zeros(2, 8, dtype=torch.long, device="meta"),))
    reasons = [f.reason for f in captured.fallbacks if f.path == "module-level"]
    assert captured.leaves == ["model"] and "pass example_kwargs={'use_cache': False}" in reasons[0]


class _IndexesByAConstant(nn.Module):
    """fx cannot iterate over a traced size; torch.export can, and lifts the index list [-1] into a tensor constant."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.register_buffer("scale", torch.ones(6), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = [self.lin(x[i : i + 1]) for i in range(len(x))]
        return torch.cat(rows).view(-1, 3, 2)[:, [-1]] * self.scale.view(3, 2)[:1]


def test_constants_export_lifts_and_non_persistent_buffers_are_not_model_state() -> None:
    """`transient`: tensors the graph reads that the model's state_dict() does not hold (a distributed
    full_state_dict leaves them out, so it loads into the model with strict=True)."""
    model = _IndexesByAConstant()
    cg = capture(model, (torch.randn(2, 4),))
    assert cg.method == "export"
    lifted = {str(n.target) for n in cg.graph_module.graph.nodes if n.op == "get_attr"} - set(model.state_dict())
    assert lifted and cg.transient == lifted
    assert "scale" in cg.transient and not cg.transient & set(model.state_dict())


def test_one_row_call_lists_drop_views_that_return_their_input_and_catch_every_other_difference() -> None:
    """capture.one_row on graphs made by make_fx: an expand to the shape a tensor has is no call; another constant,
    another op or another output is a difference, named."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from partitioner.capture.one_row import graphs_differ_at_one_row

    x = torch.empty(1, 4, device="meta")

    def trace(fn):
        gm = make_fx(fn)(x)
        (ph,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
        ph.target = "x"
        return gm

    base = trace(lambda t: torch.relu(t + 1))
    same = trace(lambda t: torch.relu(t.expand(1, 4) + 1))
    assert len(same.graph.nodes) > len(base.graph.nodes)  # the expand is in its graph
    assert graphs_differ_at_one_row(same, base, {"x": x}, ["x"]) is None
    other = graphs_differ_at_one_row(trace(lambda t: torch.relu(t + 2)), base, {"x": x}, ["x"])
    assert other is not None and "call 0 differs" in other and "2" in other
    assert "call 1 differs" in graphs_differ_at_one_row(trace(lambda t: torch.sigmoid(t + 1)), base, {"x": x}, ["x"])
    assert "calls against" in graphs_differ_at_one_row(trace(lambda t: torch.relu(t + 1) * 1), base, {"x": x}, ["x"])

    def relu_of_the_sum_returned_is_the_sum(t: torch.Tensor) -> torch.Tensor:
        a = t + 1
        torch.relu(a)  # the same two calls, the other value returned
        return a

    returned = graphs_differ_at_one_row(trace(relu_of_the_sum_returned_is_the_sum), base, {"x": x}, ["x"])
    assert returned == "the outputs differ at one row"

    def sum_doubled_in_place(t: torch.Tensor) -> torch.Tensor:
        a = t + 1
        a.mul_(2.0)  # returns `a` itself: a write, listed although its result is named already
        return torch.relu(a)

    written = graphs_differ_at_one_row(trace(sum_doubled_in_place), base, {"x": x}, ["x"])
    assert written is not None and "call 1 differs" in written and "mul_" in written
