"""Index width of the Triton kernels (issue #21 item 4): no address wraps at shapes past 2^31 elements.

How: the real launchers (partitioner/kernels/vq.py, slot_attention.py) run on meta tensors, i.e. shapes and
strides with no memory, whose largest element offset lies between 2^31 and 2^32 (past 2^31 elements, or a stride whose
product with an index passes 2^31). Each launch they make is run by Triton's interpreter, which does integer
arithmetic in the kernel's own types (int32 wraps there as it does on the GPU), but only for the extreme programs
of its grid (first and last along each axis, where the offsets are largest), on tensors that have a made-up
address and no memory: every load and store is intercepted, and its unmasked lanes must address elements of some
argument tensor; loads return ones. An offset below 2^32 that wraps in int32 turns negative, i.e. lands before
its tensor's first element (hence offsets below 2^32: one past it could wrap back inside). The kernels' whole
index path runs (program ids, masks, strides, loops), and the test allocates nothing. One way the interpreter
differs from compiled code: it runs ``for`` loops over Python ints, so a loop variable does not take the type of
int64 bounds there as it does in compiled code; the kernels widen explicitly instead, which both honour.

Why this and not another check: a run at such sizes needs tens of GiB and a GPU; a check of the source or the
IR for int64 types says nothing about the products left int32 or about masks; a model of the launcher's largest
offset in numpy checks the model, not the kernel. This runs the kernels' own code, so it fails on the int32
code this replaced (an offset such as ``offs_m * stride_zm`` wraps) and passes on the int64 one.

It uses interpreter internals of Triton 3.x (``interpreter_builder``, ``_patch_lang``, ``_implicit_cvt``,
``InterpretedFunction.rewrite``); ``test_harness_catches_a_planted_int32_wrap`` shows that the harness sees
loads and stores and catches a wrap, so a Triton upgrade that changes them fails there, not silently.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from partitioner.kernels._dispatch import INTERPRET, tl, triton

pytestmark = pytest.mark.skipif(not INTERPRET, reason="CPU Triton needs TRITON_INTERPRET=1 (tests/conftest.py)")

if INTERPRET:
    from triton.runtime import interpreter as _interp
    from triton.runtime.autotuner import Autotuner

_SPACING = 1 << 44  # bytes between the made-up base addresses: far more than any test tensor spans


# ----------------------------------------------------------------------------------------------------------
# Virtual tensors and the interception of loads and stores
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Virtual:
    """A tensor argument with an address and no memory: what the interpreter needs (dtype, data_ptr)."""

    dtype: torch.dtype
    ptr: int  # address of the first element
    span: int  # bytes from ptr to the end of the last element

    def data_ptr(self) -> int:
        return self.ptr


@dataclass
class _Memory:
    """The virtual tensors of the current launch and what the kernels did with them."""

    tensors: list[_Virtual] = field(default_factory=list)
    loads: int = 0
    stores: int = 0
    bad: list[str] = field(default_factory=list)

    def virtual(self, t: torch.Tensor) -> _Virtual:
        elem = t.element_size()
        extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
        base = (len(self.tensors) + 1) * _SPACING
        v = _Virtual(t.dtype, base + t.storage_offset() * elem, extent * elem)
        assert v.ptr + v.span < base + _SPACING, "test tensor spans more than the spacing"
        self.tensors.append(v)
        return v

    def check(self, kind: str, ptrs: np.ndarray, mask: np.ndarray, elem: int) -> None:
        live = np.broadcast_to(mask, ptrs.shape)
        addr = ptrs[live].astype(np.uint64)
        if addr.size == 0:
            return
        inside = np.zeros(addr.shape, dtype=bool)
        for v in self.tensors:
            lo, hi = np.uint64(v.ptr), np.uint64(v.ptr + v.span - elem + 1)
            inside |= (addr >= lo) & (addr < hi)
        if not inside.all():
            wild = [hex(a) for a in addr[~inside][:3].tolist()]
            self.bad.append(f"{kind} of {int((~inside).sum())} lanes outside every tensor, e.g. {wild}")


@contextlib.contextmanager
def _intercepted_memory(memory: _Memory) -> Iterator[None]:
    """Loads return ones (``other`` on masked lanes) and stores write nothing; both are checked by ``memory``."""
    builder = _interp.interpreter_builder

    def masked_load(ptrs: Any, mask: Any, other: Any, cache_policy: Any, is_volatile: Any) -> Any:
        dtype_tt = ptrs.get_element_ty()
        dtype_np = _interp._get_np_dtype(dtype_tt)
        memory.loads += 1
        memory.check("load", ptrs.data, mask.data, max(1, dtype_tt.primitive_bitwidth // 8))
        ones = np.ones(ptrs.data.shape, dtype=dtype_np)
        data = ones if other is None else np.where(mask.data, ones, other.data).astype(dtype_np)
        return _interp.TensorHandle(data, dtype_tt)

    def masked_store(ptrs: Any, value: Any, mask: Any, cache_policy: Any) -> None:
        memory.stores += 1
        memory.check("store", ptrs.data, mask.data, max(1, ptrs.get_element_ty().primitive_bitwidth // 8))

    names = ("create_masked_load", "create_masked_store")
    assert not set(names) & set(vars(builder)), "interpreter builder already patched"
    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    try:
        yield
    finally:
        for name in names:
            del vars(builder)[name]  # the class's methods again


# ----------------------------------------------------------------------------------------------------------
# Running a launch's extreme programs
# ----------------------------------------------------------------------------------------------------------


def _run_extreme_programs(kernel: Any, grid: Any, args: tuple, kwargs: dict, memory: _Memory) -> int:
    """Run `kernel[grid](*args, **kwargs)` (meta tensors in args / kwargs) for the first and last program along
    each grid axis, on virtual tensors; returns the number of programs run."""
    if isinstance(kernel, Autotuner):
        (config,) = kernel.configs  # the interpreter's single config (kernels/*.py `_configs`)
        kwargs = {**kwargs, **config.all_kwargs()}
        kernel = kernel.fn
    fn = kernel.rewrite()
    kwargs = {k: v for k, v in kwargs.items() if k in kernel.arg_names}
    convert = lambda a: memory.virtual(a) if isinstance(a, torch.Tensor) else a  # noqa: E731
    call = inspect.getcallargs(fn, *map(convert, args), **{k: convert(v) for k, v in kwargs.items()})
    constexprs = _interp.GridExecutor(fn, kernel.arg_names, grid).constexprs
    call = {name: a if name in constexprs else _interp._implicit_cvt(a) for name, a in call.items()}
    dims = grid(call) if callable(grid) else grid
    dims = tuple(dims) + (1,) * (3 - len(dims))
    programs = sorted(set(itertools.product(*({0, n - 1} for n in dims))))
    scope = _interp._patch_lang(fn)
    try:
        _interp.interpreter_builder.set_grid_dim(*dims)
        with _intercepted_memory(memory):
            for pid in programs:
                _interp.interpreter_builder.set_grid_idx(*pid)
                fn(**call)
    finally:
        scope.restore()
    return len(programs)


class _Launch:
    """Stands in for a kernel in its module: `kernel[grid](*args, **kwargs)` runs the extreme programs (if `run`)
    or does nothing (kernels whose loops are too long for the interpreter at the test's shape)."""

    def __init__(self, kernel: Any, run: bool, memory: _Memory, ran: list[str], name: str) -> None:
        self.kernel, self.run, self.memory, self.ran, self.name = kernel, run, memory, ran, name

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            if self.run:
                assert _run_extreme_programs(self.kernel, grid, args, kwargs, self.memory) > 0
                self.ran.append(self.name)

        return launch


@contextlib.contextmanager
def _virtual_launches(monkeypatch: pytest.MonkeyPatch, module: Any, run: set[str], skip: set[str]) -> Iterator[list]:
    """Replace the kernels `run | skip` of `module`; yields the names of the launches that ran. Fails at exit if
    an unmasked lane addressed memory outside every argument, or if nothing was stored."""
    memory, ran = _Memory(), []
    for name in run | skip:
        monkeypatch.setattr(module, name, _Launch(getattr(module, name), name in run, memory, ran, name))
    yield ran
    assert not memory.bad, "\n".join(memory.bad)
    assert memory.stores > 0, "the harness saw no stores"  # every kernel stores (the noise table loads nothing)
    assert set(ran) == run, (ran, run)


def _meta(shape: tuple[int, ...], strides: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float32):
    """A meta tensor: contiguous, or with the given strides (any: nothing is allocated)."""
    if strides is None:
        return torch.empty(shape, device="meta", dtype=dtype)
    return torch.empty_strided(shape, strides, device="meta", dtype=dtype)


def _last_offset(t: torch.Tensor) -> int:
    """The element offset of t's last element from its first."""
    return sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


class _Ctx:
    """The autograd ctx _SoftStraightThrough.backward reads."""


# ----------------------------------------------------------------------------------------------------------
# The harness itself: it must catch a wrap, and pass the same kernel with int64 offsets
# ----------------------------------------------------------------------------------------------------------

if INTERPRET:

    @triton.jit
    def _toy_gather(X, Y, N, stride, WIDE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        rows = offs.to(tl.int64) if WIDE else offs
        tl.store(Y + offs, tl.load(X + rows * stride, mask=offs < N), mask=offs < N)


@pytest.mark.parametrize("wide", [False, True], ids=["int32", "int64"])
def test_harness_catches_a_planted_int32_wrap(wide: bool) -> None:
    """24 rows at a stride of 2^27 elements: rows 16..23 are at 2^31 and past, which wraps in int32."""
    memory = _Memory()
    x, y = _meta((24,), (2**27,)), _meta((24,))
    _run_extreme_programs(_toy_gather, (2,), (x, y, 24, 2**27), {"WIDE": wide, "BLOCK": 16}, memory)
    assert memory.loads == memory.stores == 2  # programs 0 and 1
    assert bool(memory.bad) != wide, memory.bad
    if not wide:
        assert memory.bad[0].startswith("load of 8 lanes outside"), memory.bad  # rows 16..23 (24 and up: masked)


# ----------------------------------------------------------------------------------------------------------
# partitioner/kernels/vq.py
# ----------------------------------------------------------------------------------------------------------

_VQ_KERNELS = {"_vq_fwd_kernel", "_vq_st_bwd_dz_kernel", "_vq_st_bwd_dc_kernel"}


def _vq_forward_backward(z2: torch.Tensor, codebook: torch.Tensor, dq: torch.Tensor) -> None:
    """The launches of a sampling straight-through vq_lookup, forward and backward (as bench/kernels_sm90.py)."""
    import partitioner.kernels.vq as vq

    _, row_max, row_sum = vq._vq_fwd(z2, codebook, True, 0.5, 12345, stats=True)
    ctx = _Ctx()
    ctx.saved_tensors, ctx.args = (z2, codebook, row_max, row_sum), (True, 0.5, 12345)
    vq._SoftStraightThrough.backward(ctx, dq)


@pytest.mark.parametrize(
    ("rows", "codes", "dim", "z_strides", "c_strides", "run"),
    [
        # M * D past 2^31 (z 4 GiB in bf16): the row-tiled kernels' loads of z, dq and stores of dz
        (2**22 + 5, 40, 512, None, None, {"_vq_fwd_kernel", "_vq_st_bwd_dz_kernel"}),
        # K * D past 2^31: the code-tiled kernel's loads of the codebook and its dC stores
        (20, 2**22 + 3, 512, None, None, {"_vq_st_bwd_dc_kernel"}),
        # strided views: index * stride past 2^31 along rows / codes, then along features
        (20, 40, 40, (2**27, 1), (2**26, 1), _VQ_KERNELS),
        (20, 40, 40, (1, 2**26), (1, 2**26), _VQ_KERNELS),
        # the first row stride the dC kernel's loop needs int64 for: (17 - 1) * 2^27 = 2^31
        (17, 20, 40, (2**27, 1), None, _VQ_KERNELS),
    ],
    ids=["rows", "codes", "row-strides", "feature-strides", "row-stride-edge"],
)
def test_vq_offsets_do_not_wrap(
    monkeypatch: pytest.MonkeyPatch,
    rows: int,
    codes: int,
    dim: int,
    z_strides: tuple[int, int] | None,
    c_strides: tuple[int, int] | None,
    run: set[str],
) -> None:
    import partitioner.kernels.vq as vq

    z2 = _meta((rows, dim), z_strides, torch.bfloat16)
    codebook = _meta((codes, dim), c_strides, torch.bfloat16)
    dq = _meta((rows, dim), z_strides, torch.bfloat16)
    assert 2**31 <= max(_last_offset(t) for t in (z2, codebook)) < 2**32  # see the module docstring
    assert vq._kernel_objection(z2, codebook) is None  # the launchers would be used at this shape
    with _virtual_launches(monkeypatch, vq, run, _VQ_KERNELS - run):
        _vq_forward_backward(z2, codebook, dq)
    assert vq._wide_rows(rows, z2.stride(0)) == ((rows - 1) * z2.stride(0) >= 2**31)  # the dC kernel's int64 rows


def test_vq_gumbel_table_offsets_do_not_wrap(monkeypatch: pytest.MonkeyPatch) -> None:
    """The noise table the tests hand to the reference: (M, K) with M * K past 2^31."""
    import partitioner.kernels.vq as vq

    with _virtual_launches(monkeypatch, vq, {"_gumbel_table_kernel"}, set()):
        vq.gumbel_noise_like_kernel(2**20 + 1, 2**11 + 3, 7, device="meta")


# ----------------------------------------------------------------------------------------------------------
# partitioner/kernels/slot_attention.py
# ----------------------------------------------------------------------------------------------------------

_SA_KERNELS = {"_slot_attention_fwd_kernel", "_slot_attention_bwd_kernel"}
# Big strides per axis: the largest index along the axis (batch 2, slot 4, token 39, feature 23 / 19) times it
# lies in [2^31, 2^32)
_SA_BIG_STRIDE = {"batch": 2**30 + 2**20, "slot": 2**29 + 2**20, "token": 2**26, "feature": 2**27}


@pytest.mark.parametrize("layout", ["batch-size", "row-length", "batch", "slot", "token", "feature"])
def test_slot_attention_offsets_do_not_wrap(monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """batch-size: B * N * D and the partial sums' B * P * S * Dv pass 2^31 (contiguous; k, v 5 GiB each in bf16),
    token offsets within a row stay int32. row-length: one batch row of 2^22 + 1 tokens, where (N - 1) * D = 2^31 is
    the first token offset that needs int64 (WIDE_TOKENS). The others: small tensors whose stride along that axis
    times the axis' largest index passes 2^31 (a strided view), for every caller's tensor with such an axis (q, k,
    v, slot_mask, the updates and their gradients)."""
    sa = importlib.import_module("partitioner.kernels.slot_attention")  # the package exports a function so named

    dt = torch.bfloat16
    if layout == "batch-size":
        b, s, n, d, dv = 2**17, 17, 40, 512, 512
    elif layout == "row-length":
        b, s, n, d, dv = 1, 7, 2**22 + 1, 512, 512
    else:
        b, s, n, d, dv = 3, 5, 40, 24, 20
    axes = {"q": ("batch", "slot", "feature"), "k": ("batch", "token", "feature"), "v": ("batch", "token", "feature"),
            "mask": ("batch", "slot"), "u": ("batch", "slot", "feature"), "du": ("batch", "slot", "feature"),
            "da": ("batch", "slot", "token")}  # fmt: skip
    shapes = {"q": (b, s, d), "k": (b, n, d), "v": (b, n, dv), "mask": (b, s), "u": (b, s, dv), "du": (b, s, dv),
              "da": (b, s, n)}  # fmt: skip
    t = {}
    for name, shape in shapes.items():
        strides = list(torch.empty(shape, device="meta").stride())
        if layout in axes[name]:
            strides[axes[name].index(layout)] = _SA_BIG_STRIDE[layout]
        t[name] = _meta(shape, tuple(strides), torch.bool if name == "mask" else dt)
    assert 2**31 <= max(_last_offset(x) for x in t.values()) < 2**32  # see the module docstring
    assert sa._kernel_objection(t["q"], t["k"], t["v"]) is None
    with _virtual_launches(monkeypatch, sa, _SA_KERNELS, set()):
        _, den, _ = sa._slot_attention_fwd(t["q"], t["k"], t["v"], t["mask"], 1e-5, True)
        sa._slot_attention_bwd(t["q"], t["k"], t["v"], t["mask"], den, t["u"], t["du"], t["da"])
    assert sa._wide_tokens(n, t["k"].stride(1), t["da"].stride(2)) == (layout in ("row-length", "token"))
