"""plan.batch: does splitting the batch into microbatches (and data-parallel replicas) keep rows independent?

A training step splits every tensor input along its batch dim and runs each chunk through the model alone. That
equals the model on the whole batch only if row i of every output depends on row i of the inputs alone. This
pass proves it, or names the node that breaks it, by propagating the batch dim through the captured graph: the
graph runs once on meta tensors (no weights touched) under a TorchDispatchMode that follows the batch dim of
every tensor through every ATen op (`_RULES`), so fx graphs (whose modules decompose into ATen ops) and export
graphs are read by one table.

The state of a tensor is `None` (independent of the batch: weights, constants), `Rows(dim, outer)` (dim `dim`
is `outer` x batch x inner: sample i owns the slices with batch index i; outer is 1 unless a reshape merged the
batch behind another dim, as (seq, batch, d) -> (seq * batch, d) does), `UNKNOWN` (depends on the batch in a
way no rule follows) or `REDUCED` (a reduction over the batch: every sample contributes, e.g. a mean). A sort over
the batch's rows (mixture-of-experts dispatch) is followed too (`SortOf`, `Rows.key`): rows gathered in its order,
row-wise ops and grouped matrix products by its sorted keys' group offsets keep each row its sample's, and gathering
them back by its inverse (or adding them back at its indices) returns the batch's order. Anything else done with
them is mixing, never UNKNOWN: rows in a data-dependent order reaching an op no rule follows, or the output. Per op:

    op family                         batch dim                   result
    pointwise (Tag.pointwise)         aligned under broadcasting  the aligned dim; two different dims: mixing
    view / reshape                    inside one dim              that dim (with its outer factor); split: UNKNOWN
    permute / transpose / unsqueeze   moved                       moved
    select / slice / split / unbind   on the batch dim            mixing (picks rows by position)
    sum / mean / amax / var ...       reduced over                REDUCED (mixing once combined with rows)
    softmax / cumsum / sort / flip    along the batch dim         mixing
    mm / bmm / addmm / conv           contracted                  mixing, else the row dim
    layer / group norm                normalized over             mixing
    batch norm in training            statistics over the batch   kept, with a note (per-microbatch statistics,
                                                                  as GPipe and DDP compute them)
    attention (SDPA kernels)          sequence or feature dim     mixing, batch or heads: kept
    embedding / gather / index        indices' dim / not dim      kept / mixing; indexing the batch: UNKNOWN
    anything else                     -                           UNKNOWN, with a note

Mixing is a finding (`BatchFlow.mixing`, node and reason): compile then refuses to split the batch. UNKNOWN
values and REDUCED outputs are notes: not proven, or (a loss that means over the batch) equal to the whole
batch's only when every microbatch counts the same elements. Example: for nn.MultiheadAttention with its
default (seq, batch, d) layout called on an input whose dim 0 is taken as the batch, the attention's bmm
contracts dim 0 of the keys: mixing at that node; `batch_dim=1` says where the batch really is.

A node whose call repeats an earlier one's exactly (partitioner.annotate_reuse.signature) on inputs of the same
states is not run again: it gets that call's output states and findings (a transformer's layers are followed once;
gpt3-175b's flow 1.0 s -> 0.2 s), the same verdicts as following every call (tests/test_batch.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch.nn.utils import stateless
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakTensorKeyDictionary

from partitioner.annotate_reuse import Outputs, outputs_of, signature
from partitioner.checks import CHECK_ATTENTION_MASK
from partitioner.meta import meta_device, storage_key, to_meta

__all__ = ["REDUCED", "UNKNOWN", "BatchFlow", "Rows", "batch_flow"]

aten = torch.ops.aten


class Rows(NamedTuple):
    """Dim `dim` holds the batch: its size is outer x batch x inner, sample i owns batch index i.

    `positions`: the values are the batch positions themselves (an arange over the batch, as HF's mask functions
    build to index the batch with): fine as an index of the batch dim, a finding when used as values.
    `key`: the rows are in the order of the sort `key` over the batch (`SortOf`), not the batch's: each row still
    belongs to one sample, but which one depends on the values (a mixture of experts groups tokens by expert).
    """

    dim: int
    outer: int = 1
    positions: bool = False
    key: int | None = None


class SortOf(NamedTuple):
    """A value derived from a sort over the rows of a batched 1-D tensor (`key` names the sort): what MoE dispatch
    sorts tokens by expert with, then undoes. `role`:

    - "index": positions into a batched dim with `inner` rows per sample, in the sort's order (its indices, or those
      floor-divided to coarser rows: token k of top-k slot j); `whole` while they are the sort's own indices, a
      permutation of every position;
    - "keys": the sorted values where they are indices of another op (expert ids: topk's, so >= 0), "values" where
      not; "counts": a histogram of keys from 0; "offsets": its cumulative sum (group boundaries);
    - "inverse": each row's position in the sort's order, for a batched dim with `inner` rows per sample (an arange
      written at the sort's indices).
    """

    key: int
    role: str
    inner: int = 1
    whole: bool = False


class _Marker:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


UNKNOWN = _Marker("UNKNOWN")
REDUCED = _Marker("REDUCED")
State = Any  # None | Rows | UNKNOWN | REDUCED


class _Mixing(Exception):
    """An op combines values of different samples."""


class _Note(Exception):
    """Splitting stays allowed, with this recorded; `state` is the op's result."""

    def __init__(self, reason: str, state: State):
        super().__init__(reason)
        self.state = state


@dataclass
class BatchFlow:
    """Where the batch goes: mixing findings (the batch may not be split) and notes (recorded, splitting allowed)."""

    batch_dims: dict[str, int | None]  # input name -> its batch dim (None: not batched)
    mixing: list[tuple[str, str]] = field(default_factory=list)  # (node, reason)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (node, reason)
    outputs: list[State] = field(default_factory=list)  # state of every flat output

    @property
    def splittable(self) -> bool:
        return not self.mixing

    def refusal(self) -> str:
        """Why the batch may not be split, naming the first mixing node and the fix."""
        node, reason = self.mixing[0]
        more = f" (and {len(self.mixing) - 1} more)" if len(self.mixing) > 1 else ""
        dims = ", ".join(f"{k}: {v}" for k, v in self.batch_dims.items())
        return (
            f"the batch cannot be split into microbatches or data-parallel replicas: node {node!r} {reason}{more}, "
            f"so samples meet (batch dim of each input: {dims}). If the batch is another dim, compile with "
            f"batch_dim=...; otherwise train with microbatches=1 and no data parallelism"
        )


# ----------------------------------------------------------------------------------------------------------------
# rules: rule(func, args, kwargs, out, state) -> the state of every tensor output. `state(t)` reads a tensor's
# state, `state.batch` is the number of samples.


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def _norm(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _arg(func: Any, args: tuple, kwargs: dict, name: str, default: Any = None) -> Any:
    """An argument of an ATen op by its schema name."""
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            return kwargs.get(name, default) if a.kwarg_only or i >= len(args) else args[i]
    return default


def _dims(value: Any, ndim: int) -> list[int]:
    """A `dim` argument as a list of non-negative dims; None or [] mean every dim."""
    if value is None:
        return list(range(ndim))
    dims = [value] if isinstance(value, int) else list(value)
    return [_norm(d, ndim) for d in dims] or list(range(ndim))


def _combine(states: Sequence[State], what: str) -> State:
    """One state from several operands meeting on the same output positions."""
    if any(isinstance(s, Rows) and s.positions for s in states):
        raise _Mixing("uses batch positions (an arange over the batch) as values: a microbatch counts its own")
    rows = {s for s in states if isinstance(s, Rows)}
    if len(rows) > 1:
        raise _Mixing(f"{what} batched differently ({', '.join(f'dim {r.dim}' for r in sorted(rows))})")
    if rows and REDUCED in states:
        raise _Mixing("combines a reduction over the batch with per-sample values")
    if UNKNOWN in states:
        return UNKNOWN
    if rows:
        return rows.pop()
    return REDUCED if REDUCED in states else None


def _pointwise(inputs: Sequence[torch.Tensor], out: torch.Tensor, state: Callable) -> State:
    """Broadcasting: each batched operand's dim, right-aligned to the output."""
    states = []
    for t in inputs:
        s = state(t)
        if isinstance(s, Rows):
            aligned = out.dim() - t.dim() + s.dim
            s = s._replace(dim=aligned) if t.shape[s.dim] == out.shape[aligned] else UNKNOWN  # a batch of 1 broadcast
        states.append(s)
    return _combine(states, "combines operands")


def _rule_pointwise(func, args, kwargs, out, state):
    return _pointwise(_tensors((args, kwargs)), _tensors(out)[0], state)


def _rule_same(func, args, kwargs, out, state):
    """Copies, aliases, per-element randomness and fills: the input's layout."""
    return state(args[0])


def _rule_pad(func, args, kwargs, out, state):
    """constant_pad_nd(x, pad): pairs of (before, after) from the last dim backwards."""
    s = state(args[0])
    if isinstance(s, Rows):
        pad = list(args[1])
        k = args[0].dim() - 1 - s.dim  # pairs index of the batch dim
        if 2 * k + 1 < len(pad) and (pad[2 * k] or pad[2 * k + 1]):
            raise _Mixing("pads the batch dim (rows that belong to no sample)")
    return _combine([s], "pads")


def _rule_uniform(func, args, kwargs, out, state):
    """*_like factories: the input's shape, values the same for every sample (so per-sample rows where it has some)."""
    s = state(args[0])
    return s._replace(positions=False) if isinstance(s, Rows) else None


_FACTORY_NAMES = ("empty", "zeros", "ones", "full", "empty_strided", "rand", "randn", "new_empty", "new_zeros",
                  "new_ones", "new_full")  # fmt: skip
_FACTORIES = {getattr(aten, n) for n in _FACTORY_NAMES if hasattr(aten, n)}
_BROADCASTS = _FACTORIES | {aten.expand, aten.repeat}


def _rule_copy(func, args, kwargs, out, state):
    """copy_(dst, src): src broadcast into dst."""
    return _pointwise([args[0], args[1]], args[0], state)


def _rule_view(func, args, kwargs, out, state):
    """Reshapes: the batch must stay inside one output dim.

    `before` elements precede the batch in the flat layout (the dims ahead of it, times its outer factor); the
    output dim k whose span starts at or before that point and ends after the whole batch holds it, with outer
    factor before / (elements ahead of dim k). (B, T, C) -> (B*T, C) keeps Rows(0); (T, B, C) -> (T*B, C) gives
    Rows(0, outer=T); (B, C) -> (2, B/2, C) splits the batch over two dims (not followed).
    """
    x, s = args[0], state(args[0])
    if not isinstance(s, Rows):
        return s
    if s.key is not None:  # rows in a sort's order: the dims up to theirs must stay as they are
        o = _tensors(out)[0]
        if o.dim() > s.dim and tuple(o.shape[: s.dim + 1]) == tuple(x.shape[: s.dim + 1]):
            return s
        raise _Mixing("reshapes rows held in the order of a sort over the batch (it regroups samples' rows)")
    before = math.prod(x.shape[: s.dim]) * s.outer
    acc = 1
    for k, size in enumerate(_tensors(out)[0].shape):
        if acc * size > before:  # dim k spans the start of the batch
            outer, rem = divmod(before, acc)
            if rem == 0 and size % (outer * state.batch) == 0:
                return s._replace(dim=k, outer=outer)
            return UNKNOWN
        acc *= size
    return UNKNOWN


def _rule_expand(func, args, kwargs, out, state):
    s = state(args[0])
    if not isinstance(s, Rows):
        return s
    o = _tensors(out)[0]
    k = o.dim() - args[0].dim() + s.dim
    return s._replace(dim=k) if o.shape[k] == args[0].shape[s.dim] else UNKNOWN


def _moved(s: State, new_dim: int) -> State:
    return s._replace(dim=new_dim) if isinstance(s, Rows) else s


def _rule_permute(func, args, kwargs, out, state):
    s = state(args[0])
    if not isinstance(s, Rows):
        return s
    return _moved(s, [_norm(d, args[0].dim()) for d in args[1]].index(s.dim))


def _rule_transpose(func, args, kwargs, out, state):
    s = state(args[0])
    if not isinstance(s, Rows):
        return s
    nd = args[0].dim()
    a, b = (_norm(args[1], nd), _norm(args[2], nd)) if len(args) > 2 else (0, 1)  # t(): 0 <-> 1
    return _moved(s, b if s.dim == a else a if s.dim == b else s.dim)


def _rule_unsqueeze(func, args, kwargs, out, state):
    s = state(args[0])
    if not isinstance(s, Rows):
        return s
    return _moved(s, s.dim + 1 if _norm(args[1], args[0].dim() + 1) <= s.dim else s.dim)


def _rule_squeeze(func, args, kwargs, out, state):
    s = state(args[0])
    if not isinstance(s, Rows):
        return s
    x = args[0]
    gone = [d for d in _dims(args[1] if len(args) > 1 else None, x.dim()) if x.shape[d] == 1]
    if s.dim in gone:
        return UNKNOWN  # a batch of one squeezed away
    return _moved(s, s.dim - sum(d < s.dim for d in gone))


def _rule_picks(what: str) -> Callable:
    """select / slice / split / unbind / narrow / index_select: on the batch dim they take rows by position."""

    def rule(func, args, kwargs, out, state):
        s = state(args[0])
        if not isinstance(s, Rows):
            return s
        x = args[0]
        d = _norm(_arg(func, args, kwargs, "dim", 0), x.dim())
        if d == s.dim:
            if func.overloadpacket is aten.slice:
                start, end = _arg(func, args, kwargs, "start"), _arg(func, args, kwargs, "end")
                if (
                    start in (None, 0)
                    and (end is None or end >= x.shape[d])
                    and _arg(func, args, kwargs, "step", 1) == 1
                ):
                    return s  # the whole dim
            raise _Mixing(f"{what} on the batch dim (positions decide which samples it takes)")
        if func.overloadpacket is aten.index_select and state(args[2]) is not None:
            raise _Mixing("selects with indices that depend on the batch")
        removes = func.overloadpacket in (aten.select, aten.unbind)
        return _moved(s, s.dim - 1 if removes and d < s.dim else s.dim)

    return rule


def _rule_reduce(func, args, kwargs, out, state):
    s = state(args[0])
    if not isinstance(s, Rows):
        return s
    dims = _dims(_arg(func, args, kwargs, "dim"), args[0].dim())
    if s.dim in dims:
        return REDUCED
    return _moved(s, s.dim if _arg(func, args, kwargs, "keepdim", False) else s.dim - sum(d < s.dim for d in dims))


def _rule_along(what: str) -> Callable:
    """Ops working along one `dim` (softmax, cumsum, sort, flip, ...): along the batch they mix samples."""

    def rule(func, args, kwargs, out, state):
        s = state(args[0])
        named = "dims" if func.overloadpacket in (aten.flip, aten.roll) else "dim"
        dims = _arg(func, args, kwargs, named, -1 if named == "dim" else None)  # roll(dims=[]): the flattened tensor
        if isinstance(s, Rows) and s.dim in _dims(dims, args[0].dim()):
            raise _Mixing(f"takes {what} along the batch dim")
        return s

    return rule


def _rule_mm(func, args, kwargs, out, state):
    """mm / addmm / bmm / baddbmm: the left operand's rows, the right one's columns and bmm's batch survive."""
    with_bias = func.overloadpacket in (aten.addmm, aten.baddbmm)
    a, b = args[1:3] if with_bias else args[:2]
    o = _tensors(out)[0]
    states = []
    for t, contracted, last in ((a, a.dim() - 1, None), (b, b.dim() - 2, b.dim() - 1)):
        s = state(t)
        if isinstance(s, Rows):
            if s.dim == contracted:
                raise _Mixing("contracts the batch dim in a matrix product (sums over samples)")
            s = s._replace(dim=o.dim() - 1 if s.dim == last else s.dim)
        states.append(s)
    if with_bias:
        states.append(_pointwise([args[0]], o, state))
    return _combine(states, "multiplies operands")


def _rule_conv(func, args, kwargs, out, state):
    if state(args[1]) is not None:
        raise _Mixing("convolves with a kernel that depends on the batch")
    s = state(args[0])
    if isinstance(s, Rows) and s != Rows(0):
        raise _Mixing("convolves over the batch dim" if s.dim >= 2 else "mixes the channels of samples")
    return _combine([s, *(state(t) for t in args[2:3] if isinstance(t, torch.Tensor))], "adds a bias")


def _rule_spatial(k: int) -> Callable:
    """Pooling and resizing over the last `k` dims (N, C, *spatial): rows stay apart unless the batch is spatial."""

    def rule(func, args, kwargs, out, state):
        s = state(args[0])
        if isinstance(s, Rows) and s.dim >= args[0].dim() - k:
            raise _Mixing("pools or resizes over the batch dim")
        return s

    return rule


def _rule_layer_norm(func, args, kwargs, out, state):
    s = state(args[0])
    if isinstance(s, Rows) and s.dim >= args[0].dim() - len(args[1]):
        raise _Mixing("normalizes over the batch dim")
    return s


def _rule_group_norm(func, args, kwargs, out, state):
    s = state(args[0])
    if isinstance(s, Rows) and s != Rows(0):
        raise _Mixing("normalizes groups that span the batch dim")
    return s


def _rule_batch_norm(func, args, kwargs, out, state):
    s = state(args[0])
    training = func.overloadpacket is not aten._native_batch_norm_legit_no_training and _arg(
        func, args, kwargs, "training", False
    )
    if not isinstance(s, Rows):
        return s
    if s.dim == 1:
        raise _Mixing("normalizes per channel with the batch on the channel dim")
    if training:
        raise _Note(
            "batch norm in training: each microbatch normalizes with its own statistics (as GPipe, PiPPy and DDP "
            "do), which differs from the whole batch's",
            s,
        )
    return s


def _rule_attention(func, args, kwargs, out, state):
    """SDPA kernels, q/k/v of shape (batch, heads, seq, dim): the batch and head dims are independent."""
    s = _combine([state(t) for t in args[:3]], "attends with query, key and value")
    if isinstance(s, Rows) and s.dim >= args[0].dim() - 2:
        raise _Mixing("attends across the batch dim (it is the sequence or feature dim of the attention)")
    return s


def _rule_embedding(func, args, kwargs, out, state):
    if state(args[0]) is not None:
        raise _Mixing("looks rows up in a table that depends on the batch")
    return state(args[1])


def _rule_cat(func, args, kwargs, out, state):
    tensors = [t for t in args[0] if t.dim() > 0 or func.overloadpacket is aten.stack]
    d = _norm(_arg(func, args, kwargs, "dim", 0), tensors[0].dim() + (func.overloadpacket is aten.stack))
    s = _combine([state(t) for t in tensors], "joins tensors")
    if not isinstance(s, Rows):
        return s
    if func.overloadpacket is aten.stack:
        return _moved(s, s.dim + 1 if d <= s.dim else s.dim)
    if d == s.dim:
        raise _Mixing("concatenates along the batch dim (rows of several tensors become one batch)")
    return s


def _rule_gather(func, args, kwargs, out, state):
    x, d, index = args[0], _norm(args[1], args[0].dim()), args[2]
    if isinstance(state(x), Rows) and state(x).dim == d:
        raise _Mixing("gathers along the batch dim")
    return _combine([state(x), state(index)], "gathers with operand and indices")


def _rule_scatter(func, args, kwargs, out, state):
    s = state(args[0])
    if isinstance(s, Rows) and s.dim == _norm(args[1], args[0].dim()):
        raise _Mixing("scatters along the batch dim")
    return _combine([s, *(state(t) for t in _tensors(args[2:]))], "scatters operand, indices and values")


def _rule_index(func, args, kwargs, out, state):
    """x[i0, i1, ...] (aten.index, advanced indexing) and its writes (index_put).

    The batch dim of x indexed by the batch positions (an arange over the batch, broadcast) stays a batch dim;
    indexed by anything else it is not followed (which samples it takes depends on the values).
    """
    x, indices = args[0], list(args[1])
    s = state(x)
    used = [k for k, i in enumerate(indices) if i is not None]
    index_states = [state(i) for i in indices if i is not None]
    if _sorted(s) or any(_sorted(st) for st in index_states) or any(_sorted(state(t)) for t in _tensors(args[2:])):
        return _index_sorted(func, args, kwargs, out, state)
    if func.overloadpacket in (aten.index_put, aten.index_put_):
        if isinstance(s, Rows) and s.dim in used:
            return UNKNOWN
        return _combine([s, *index_states, *(state(t) for t in _tensors(args[2:]))], "writes")
    if not used:
        return s
    index_shape = torch.broadcast_shapes(*(i.shape for i in indices if i is not None))
    adjacent = used == list(range(used[0], used[-1] + 1))
    first = used[0] if adjacent else 0  # where the broadcast index dims land in the output

    def out_dim_of_index(i: torch.Tensor, d: int) -> int:
        return first + len(index_shape) - i.dim() + d

    if isinstance(s, Rows) and s.dim in used:
        position = state(indices[s.dim])
        others = [st for k, st in zip(used, index_states) if k != s.dim]
        if isinstance(position, Rows) and position.positions and all(o is None for o in others):
            return Rows(out_dim_of_index(indices[s.dim], position.dim), s.outer)
        return UNKNOWN
    if isinstance(s, Rows):
        if any(st is not None for st in index_states):
            return UNKNOWN
        if not adjacent:  # the index dims go first, then x's other dims in order
            return _moved(s, len(index_shape) + s.dim - sum(u < s.dim for u in used))
        return _moved(s, s.dim if s.dim < used[0] else s.dim - len(used) + len(index_shape))
    batched = [(i, st) for i, st in zip((i for i in indices if i is not None), index_states) if st is not None]
    if any(isinstance(st, Rows) and st.positions for _, st in batched):
        raise _Mixing("indexes a tensor that does not depend on the batch with batch positions")
    rows = {st for _, st in batched}
    if len(rows) == 1 and isinstance(r := next(iter(rows)), Rows):
        index = next(i for i, st in batched if st == r)
        return _moved(r, out_dim_of_index(index, r.dim))
    return UNKNOWN if rows else None


def _rule_loss(func, args, kwargs, out, state):
    """nll_loss & co.: a mean or sum over the batch unless reduction is 'none' (0)."""
    s = _combine([state(t) for t in args[:2] if isinstance(t, torch.Tensor)], "compares input and target")
    if s is None or _arg(func, args, kwargs, "reduction", 1) == 0:
        return s
    return REDUCED


def _rule_item(func, args, kwargs, out, state):
    if state(args[0]) is not None:
        raise _Mixing("reads a value of the batch into Python (.item())")
    return None


def _rule_no_output(func, args, kwargs, out, state):
    """Checks and asserts (aten._assert_tensor_metadata): nothing flows on."""
    return None


class _PerOutput(tuple):
    """A rule's states for an op with several tensor outputs, one per output in order."""


def _sorted(s: State) -> bool:
    """Whether a state comes from a sort over the batch's rows (SortOf) or holds rows in its order."""
    return isinstance(s, SortOf) or (isinstance(s, Rows) and s.key is not None)


def _rule_sort(func, args, kwargs, out, state):
    """sort / argsort. Along a batched 1-D tensor whose batch is outermost (a mixture of experts' expert id per token
    and slot): a permutation of the rows, followed (SortOf: its sorted keys and its indices); along the batch
    otherwise, mixing; along another dim, the input's rows."""
    x, s = args[0], state(args[0])
    if isinstance(s, SortOf):  # argsort of a sort's indices is its inverse, but not one this proof follows
        raise _Mixing("sorts what a sort over the batch made")
    if not isinstance(s, Rows) or s.dim != _norm(_arg(func, args, kwargs, "dim", -1), x.dim()):
        return s
    if x.dim() == 1 and s.outer == 1 and not s.positions and s.key is None:
        key = state.new_key()
        index = SortOf(key, "index", x.shape[0] // state.batch, whole=True)
        # sorted indices of another op (expert ids: topk's) are keys >= 0, what a histogram from 0 groups them by
        keys = SortOf(key, "keys" if state.is_index(x) else "values")
        return index if func.overloadpacket is aten.argsort else _PerOutput((keys, index))
    raise _Mixing("takes a sort along the batch dim")


def _rule_floor_divide(func, args, kwargs, out, state):
    """A sort's indices // k (k dividing its rows per sample): positions of the coarser rows each came from (token k
    of its top-k slot), every one still its sample's; otherwise pointwise."""
    s = state(args[0])
    if isinstance(s, SortOf):
        k = args[1]
        if s.role == "index" and isinstance(k, int) and k > 0 and s.inner % k == 0 and state(k) is None:
            return s._replace(inner=s.inner // k, whole=False)
        raise _Mixing("divides a sort's indices by what does not split its rows per sample")
    if isinstance(state(args[1]), SortOf):
        raise _Mixing("divides by a sort's indices")
    return _rule_pointwise(func, args, kwargs, out, state)


def _index_sorted(func, args, kwargs, out, state):
    """aten.index / index_put with a sort over the batch involved (rule_index hands them over). Gathering a batched
    dim (batch outermost, `inner` rows per sample) by the sort's indices: its rows in the sort's order (Rows.key);
    gathering a tensor that depends on no sample by the sorted keys: a row per sorted position, in that order;
    writing an arange at the sort's own indices: its inverse; gathering rows in the sort's order by that inverse:
    the batch's order again. Anything else with them is mixing."""
    x, indices = args[0], list(args[1])
    s = state(x)
    if [k for k, i in enumerate(indices) if i is not None] != [0] or indices[0].dim() != 1:
        raise _Mixing("indexes with a sort over the batch other than along one dim")
    i, n = state(indices[0]), indices[0].numel()
    if func.overloadpacket in (aten.index_put, aten.index_put_):
        values = args[2]
        accumulate = _arg(func, args, kwargs, "accumulate", False)
        if (
            isinstance(i, SortOf) and i.role == "index" and i.whole and not accumulate and s is None and x.dim() == 1
            and state(values) is None and state.is_iota(values) and values.numel() == x.shape[0] == n
        ):  # fmt: skip
            return SortOf(i.key, "inverse", i.inner)
        raise _Mixing("writes at positions a sort over the batch decides, other than its inverse")
    if isinstance(i, SortOf) and i.role == "index":
        if isinstance(s, Rows) and (s.dim, s.outer, s.positions, s.key) == (0, 1, False, None):
            if x.shape[0] == state.batch * i.inner:
                return Rows(0, key=i.key)
    elif isinstance(i, SortOf) and i.role in ("keys", "values") and s is None:
        return Rows(0, key=i.key)
    elif isinstance(i, SortOf) and i.role == "inverse" and isinstance(s, Rows) and s.key == i.key and s.dim == 0:
        if x.shape[0] == n == state.batch * i.inner:
            return Rows(0)
    raise _Mixing("gathers by a sort over the batch other than its rows in its order and back")


def _rule_index_add(func, args, kwargs, out, state):
    """index_add(x, 0, a sort's indices, rows in its order): each row added back to the row it came from (torchtitan's
    and HF 4's mixture-of-experts combine); without a sort involved, not followed."""
    x, dim, index, source = args[:4]
    s, i, v = state(x), state(index), state(source)
    if not (_sorted(s) or _sorted(i) or _sorted(v)):
        return UNKNOWN
    if (
        isinstance(i, SortOf) and i.role == "index" and _norm(dim, x.dim()) == 0 and s in (None, Rows(0))
        and isinstance(v, Rows) and v.key == i.key and v.dim == 0 and x.shape[0] == state.batch * i.inner
    ):  # fmt: skip
        return Rows(0)
    raise _Mixing("adds rows at positions a sort over the batch decides, other than back where they came from")


def _rule_histc(func, args, kwargs, out, state):
    """A histogram from 0 (an explicit range) of a sort's keys (indices, so >= 0): its group sizes, each key's rows
    one segment of the sorted order, keys past the range after them all; of anything else batched, not followed."""
    s = state(args[0])
    if isinstance(s, SortOf):
        lo, hi = _arg(func, args, kwargs, "min", 0), _arg(func, args, kwargs, "max", 0)
        if s.role == "keys" and lo == 0 and hi > lo:
            return s._replace(role="counts")
        raise _Mixing("counts a sort's values other than index keys over a range from 0")
    return UNKNOWN


def _rule_cumulative(func, args, kwargs, out, state):
    """cumsum & co.: of a sort's group sizes (1-D), its group offsets; along the batch, mixing."""
    s = state(args[0])
    if isinstance(s, SortOf):
        if s.role == "counts" and args[0].dim() == 1 and func.overloadpacket is aten.cumsum:
            return s._replace(role="offsets")
        raise _Mixing("accumulates a sort's values other than its group sizes")
    return _rule_along("a cumulative op")(func, args, kwargs, out, state)


def _rule_grouped_mm(func, args, kwargs, out, state):
    """A grouped matrix product (transformers' grouped_mm_fallback, aten._grouped_mm): rows [offs[g-1], offs[g]) times
    weight g. Row-wise for rows in a sort's order grouped by the offsets of its own sorted keys (each row meets its own
    key's weight); any other offsets over batched rows decide by position which weight a row meets."""
    a, w = args[0], args[1]
    offs, bias = _arg(func, args, kwargs, "offs"), _arg(func, args, kwargs, "bias")
    sa, so = state(a), state(offs)
    if (
        state(w) is None and state(bias) is None and isinstance(sa, Rows) and sa.key is not None and sa.dim == 0
        and isinstance(so, SortOf) and so.role == "offsets" and so.key == sa.key
    ):  # fmt: skip
        return sa
    raise _Mixing("multiplies groups of rows whose boundaries depend on the batch")


_SORT_AWARE = {aten.sort, aten.argsort, aten.floor_divide, aten.index, aten.index_put, aten.index_put_, aten.histc,
               aten.cumsum, aten.to, aten._to_copy, aten.clone, aten.detach, aten.alias, aten.contiguous,
               aten.lift_fresh_copy, aten._assert_tensor_metadata, aten.empty_like}  # fmt: skip
_SORT_AWARE |= {getattr(aten, n) for n in ("index_add", "index_add_") if hasattr(aten, n)}
# Ops outside aten, by schema name (their packets exist only once their library is loaded)
_RULES_BY_NAME: dict[str, Callable] = {"transformers::grouped_mm_fallback": _rule_grouped_mm,
                                       "aten::_grouped_mm": _rule_grouped_mm}  # fmt: skip


_RULES: dict[Any, Callable] = {}


def _register(rule: Callable, *names: str) -> None:
    for name in names:
        if hasattr(aten, name):  # some kernels exist only in some torch versions or builds
            _RULES[getattr(aten, name)] = rule


_register(_rule_view, "view", "_unsafe_view", "reshape", "flatten", "unflatten")
_register(_rule_pad, "constant_pad_nd")
_register(_rule_same, "clone", "detach", "alias", "_to_copy", "lift_fresh_copy", "contiguous", "to", "native_dropout",
          "bernoulli", "bernoulli_", "dropout", "fill_", "zero_", "normal_", "uniform_", "random_")  # fmt: skip
_register(_rule_uniform, "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like")
_register(_rule_copy, "copy_", "copy")
_register(_rule_expand, "expand")
_register(_rule_permute, "permute")
_register(_rule_transpose, "transpose", "t")
_register(_rule_unsqueeze, "unsqueeze")
_register(_rule_squeeze, "squeeze")
_register(_rule_picks("selects a row"), "select")
_register(_rule_picks("slices rows"), "slice")
_register(_rule_picks("splits or picks rows"), "split", "split_with_sizes", "unsafe_split", "unsafe_split_with_sizes",
          "unbind", "chunk", "unsafe_chunk", "narrow",
          "index_select", "tensor_split")  # fmt: skip
_register(_rule_reduce, "sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "var", "std", "var_mean",
          "std_mean", "logsumexp", "prod", "any", "all", "norm", "linalg_vector_norm", "count_nonzero", "nansum",
          "nanmean")  # fmt: skip
for _what, _names in (
    ("a softmax", ("_softmax", "_safe_softmax", "softmax", "_log_softmax", "log_softmax")),
    ("a cumulative op", ("cumprod", "cummax", "cummin", "logcumsumexp")),
    ("a sort", ("topk", "kthvalue")),
    ("a flip or roll", ("flip", "roll")),
):
    _register(_rule_along(_what), *_names)
_register(_rule_sort, "sort", "argsort")
_register(_rule_cumulative, "cumsum")
_register(_rule_floor_divide, "floor_divide")
_register(_rule_index_add, "index_add", "index_add_")
_register(_rule_histc, "histc")
_register(_rule_mm, "mm", "addmm", "bmm", "baddbmm")
_register(_rule_conv, "convolution")
for _k in (1, 2, 3):
    _register(_rule_spatial(_k), f"max_pool{_k}d", f"max_pool{_k}d_with_indices", f"avg_pool{_k}d",
              f"adaptive_max_pool{_k}d", f"_adaptive_avg_pool{_k}d", f"adaptive_avg_pool{_k}d")  # fmt: skip
_register(_rule_spatial(1), "upsample_nearest1d", "upsample_linear1d")
_register(_rule_spatial(2), "upsample_nearest2d", "upsample_bilinear2d", "upsample_bicubic2d")
_register(_rule_spatial(3), "upsample_nearest3d", "upsample_trilinear3d")
_register(_rule_layer_norm, "native_layer_norm")
_register(_rule_group_norm, "native_group_norm")
_register(_rule_batch_norm, "native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional",
          "_native_batch_norm_legit_no_training")  # fmt: skip
_register(_rule_attention, "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
          "_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
          "_scaled_dot_product_attention_math", "scaled_dot_product_attention")  # fmt: skip
_register(_rule_embedding, "embedding")
_register(_rule_cat, "cat", "stack")
_register(_rule_gather, "gather")
_register(_rule_scatter, "scatter", "scatter_add", "scatter_reduce", "scatter_", "scatter_add_")
_register(_rule_index, "index", "index_put", "index_put_")
_register(_rule_loss, "nll_loss_forward", "nll_loss2d_forward", "mse_loss", "l1_loss", "smooth_l1_loss",
          "huber_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits", "soft_margin_loss")  # fmt: skip
_register(_rule_item, "_local_scalar_dense", "item")
_register(_rule_no_output, "_assert_tensor_metadata")
_RULES[CHECK_ATTENTION_MASK.overloadpacket] = _rule_no_output


# ----------------------------------------------------------------------------------------------------------------
# the propagation


class _StateOf:
    """tensor -> state, as handed to the rules; `batch` is the number of samples."""

    def __init__(self, states: WeakTensorKeyDictionary, batch: int):
        self.states, self.batch = states, batch
        self.iotas = WeakTensorKeyDictionary()  # aranges from 0 by 1 (an inverse permutation is written with one)
        self.indices = WeakTensorKeyDictionary()  # indices an op returned (topk's, argmax's...) and views of them
        self._keys = itertools.count()

    def __call__(self, t: Any) -> State:
        return self.states.get(t) if isinstance(t, torch.Tensor) else None

    def is_iota(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t in self.iotas

    def is_index(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t in self.indices

    def new_key(self) -> int:
        """A name for a new sort over the batch (SortOf.key)."""
        return next(self._keys)


class _Tracker(TorchDispatchMode):
    """Follows the batch through the ATen ops run under it, recording mixing and notes against `node`."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.states = WeakTensorKeyDictionary()
        self.state = _StateOf(self.states, batch)
        self.node = ""
        self.mixing: list[tuple[str, str]] = []
        self.notes: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self._mark(func, args, kwargs, out)
        before = [self.state(t) for t in _tensors((args, kwargs))]
        if func.overloadpacket is aten.arange and out.dim() == 1 and out.numel() == self.state.batch > 1:
            # 0, 1, ..., B-1: batch positions (the batch size is drawn distinct from every other dim, see batch_flow)
            start, step = _arg(func, args, kwargs, "start", 0), _arg(func, args, kwargs, "step", 1)
            if len(args) == 1 or (start == 0 and step == 1):
                self.states[out] = Rows(0, positions=True)
            return out
        if func.overloadpacket in _BROADCASTS and isinstance(out, torch.Tensor) and all(s is None for s in before):
            # ones(B, S), x.expand(B, -1) & co. on what depends on no sample: the same values in every sample's rows
            grown = [d for d, size in enumerate(out.shape) if size == self.state.batch]
            if func.overloadpacket not in _FACTORIES:
                src = args[0]
                grown = [d for d in grown if d < out.dim() - src.dim() or src.shape[d - out.dim() + src.dim()] == 1]
            if len(grown) == 1 and self.state.batch > 1:
                self.states[out] = Rows(grown[0])
            return out
        if all(s is None for s in before):
            return out  # nothing batched in: nothing batched out (an in-place op keeps its tensor's state)
        rule = _RULES.get(func.overloadpacket) or _RULES_BY_NAME.get(func._schema.name)
        if rule is None and torch.Tag.pointwise in func.tags:
            rule = _rule_pointwise
        op = f"aten.{func.overloadpacket.__name__}"
        # What a sort over the batch makes is followed only by the rules that know it, and rows in its order never
        # become UNKNOWN (which splitting tolerates): a step no rule follows with them is mixing
        sort_made = any(isinstance(b, SortOf) for b in before)
        keyed = any(isinstance(b, Rows) and b.key is not None for b in before)
        if sort_made and func.overloadpacket not in _SORT_AWARE and rule is not _rule_grouped_mm:
            self.mixing.append((self.node, f"uses a sort over the batch in a way no rule follows ({op})"))
            result = UNKNOWN
        elif rule is None and keyed:
            self.mixing.append((self.node, f"takes rows held in the order of a sort over the batch ({op})"))
            result = UNKNOWN
        elif rule is None:
            self.notes.append((self.node, f"has no batch rule for {op}: samples assumed independent"))
            result = UNKNOWN
        else:
            try:
                result = rule(func, args, kwargs, out, self.state)
            except _Mixing as e:
                self.mixing.append((self.node, f"{e} ({op})"))
                result = UNKNOWN
            except _Note as e:
                self.notes.append((self.node, str(e)))
                result = e.state
            else:
                if result is UNKNOWN and keyed:
                    self.mixing.append((self.node, f"loses track of rows held in the order of a sort ({op})"))
                elif result is UNKNOWN and UNKNOWN not in before:
                    self.notes.append((self.node, f"{op} moves the batch where no rule follows it"))
        outs = _tensors(out)
        for t, state in zip(outs, result if isinstance(result, _PerOutput) else [result] * len(outs)):
            if state is None:
                self.states.pop(t, None)
            else:
                self.states[t] = state
        return out

    def _mark(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        """Keep `state.iotas` and `state.indices` true: aranges from 0 by 1; the indices topk, sort, max & co. return,
        and views and integer copies of them. A tensor written in place is neither any more."""
        for a, arg in zip(func._schema.arguments, args):
            if a.alias_info is not None and a.alias_info.is_write and isinstance(arg, torch.Tensor):
                self.state.iotas.pop(arg, None)
                self.state.indices.pop(arg, None)
        packet = func.overloadpacket
        if packet is aten.arange and out.dim() == 1 and _arg(func, args, kwargs, "step", 1) == 1:
            if _arg(func, args, kwargs, "start", 0) == 0:
                self.state.iotas[out] = True
        elif packet in _INDEX_PAIRS and isinstance(out, tuple) and len(out) == 2:
            self.state.indices[out[1]] = True
        elif packet in _INDEX_OPS:
            self.state.indices[out] = True
        elif packet in _INDEX_VIEWS and args and self.state.is_index(args[0]) and isinstance(out, torch.Tensor):
            if not out.is_floating_point() and not out.is_complex():
                self.state.indices[out] = True


_INDEX_PAIRS = {aten.topk, aten.sort, aten.max, aten.min, aten.kthvalue, aten.mode, aten.cummax, aten.cummin}
_INDEX_OPS = {aten.argmax, aten.argmin, aten.argsort}
_INDEX_VIEWS = {aten.view, aten._unsafe_view, aten.reshape, aten.flatten, aten.clone, aten._to_copy, aten.to,
                aten.detach, aten.alias, aten.contiguous, aten.squeeze, aten.unsqueeze, aten.permute, aten.transpose,
                aten.t, aten.expand, aten.select, aten.slice}  # fmt: skip


class _Interpreter(fx.Interpreter):
    """Runs the graph under the tracker. A node whose call repeats an earlier one's exactly, on inputs of the same
    states, gets that call's output states and findings without running (partitioner.annotate_reuse: its outputs
    made from the recorded recipe): a transformer's layers are followed once."""

    def __init__(self, gm: fx.GraphModule, tracker: _Tracker, state: Any = (), reuse: bool = True):
        super().__init__(gm)
        self.tracker = tracker
        self.reuse = reuse
        self.records: dict[tuple, tuple[Outputs, tuple[State, ...], tuple, tuple]] = {}
        # Storages of the weights (`state`) and of every value so far: a call's output outside them is fresh
        self.known: set[int] = {storage_key(t) for t in state}

    def run_node(self, n: fx.Node) -> Any:
        self.tracker.node = n.name
        if "capture_leaf" in n.meta or isinstance(n.target, torch._ops.HigherOrderOperator):
            return self._remember(self._opaque(n))  # leaves cannot run on meta; torch.cond & co. take no dispatch mode
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        if n.op == "call_function":
            args, kwargs = pytree.tree_map(meta_device, (args, kwargs))
        inputs = _tensors((args, kwargs))
        key = signature(n, self.module, args, kwargs, set()) if self.reuse else None
        if key is not None:
            key = (key, tuple(self.tracker.state(t) for t in inputs))
            if any(_sorted(st) for st in key[1]):
                key = None  # a sort's states name it: a later layer's sort is another one, followed afresh
        if key is not None:
            if key in self.records:
                return self._remember(self._replay(n, inputs, *self.records[key]))
        versions = [t._version for t in inputs]
        mixing, notes = len(self.tracker.mixing), len(self.tracker.notes)
        with self.tracker:
            result = super().run_node(n)
        if key is not None and all(t._version == v for t, v in zip(inputs, versions)):  # no in-place write
            made = outputs_of(inputs, result, lambda storage: storage not in self.known)
            states = tuple(self.tracker.state(t) for t in _tensors(result))
            # a replay is not dispatched: what a sort made, an arange (an inverse's iota) and an op's indices (the
            # keys a sort may sort) are not recorded
            state = self.tracker.state
            marked = any(state.is_iota(t) or state.is_index(t) for t in _tensors(result))
            if made is not None and not marked and not any(_sorted(st) for st in states):
                found = (
                    tuple(m for _, m in self.tracker.mixing[mixing:]),
                    tuple(m for _, m in self.tracker.notes[notes:]),
                )
                self.records[key] = (made, states, *found)
        return self._remember(result)

    def _replay(self, n: fx.Node, inputs: list[torch.Tensor], made: Outputs, states: tuple, mixing: tuple,
                notes: tuple) -> Any:  # fmt: skip
        """What the recorded call gave, for node n: its outputs, their states, its findings under n's name."""
        result = made.make(inputs)
        for t, state in zip(_tensors(result), states):
            if state is not None:
                self.tracker.states[t] = state
        self.tracker.mixing += [(n.name, m) for m in mixing]
        self.tracker.notes += [(n.name, m) for m in notes]
        return result

    def _remember(self, result: Any) -> Any:
        self.known.update(storage_key(t) for t in _tensors(result))
        return result

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        # export graphs bake the capture device (aten.to(x, device=cpu)): stay on meta
        args, kwargs = pytree.tree_map(meta_device, (args, kwargs))
        return super().call_function(target, args, kwargs)

    def _opaque(self, n: fx.Node) -> Any:
        """An opaque leaf or a higher-order op (torch.cond): its output, UNKNOWN if it reads the batch."""
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        val = to_meta(n.meta.get("val"))  # what annotate derived (torch.cond's predicate cannot run on meta alone)
        if any(self.tracker.state(t) is not None for t in _tensors((args, kwargs))):
            what = "an opaque module" if "capture_leaf" in n.meta else f"{n.target}, which no rule looks into"
            self.tracker.notes.append((n.name, f"is {what}: samples assumed independent"))
            for t in _tensors(val):
                self.tracker.states[t] = UNKNOWN
        return val


def batch_flow(
    gm: fx.GraphModule, inputs: Sequence[Any], names: Sequence[str], batch_dims: dict[str, int | None],
    *, reuse: bool = True,
) -> BatchFlow:  # fmt: skip
    """Propagate the inputs' batch dims (`batch_dims[name]`; None or absent: not batched) through `gm` on meta.
    `reuse`: a call repeating an earlier one's on inputs of the same states is not run again (_Interpreter).

    `gm` must be annotated (partitioner.annotate: opaque leaves carry their output there). Weights are swapped for
    meta copies while it runs; nothing is allocated. The run uses a batch size no other dim of the graph has (where
    the graph takes it), so that a dim of that size is the batch: an arange of it is the batch positions.
    """
    meta_state: dict[str, torch.Tensor] = {}
    by_tensor: dict[int, torch.Tensor] = {}
    for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        meta_state[name] = by_tensor.setdefault(id(t), to_meta(t.detach()))
    meta_inputs = to_meta(list(inputs))
    seeds = {
        name: _norm(batch_dims[name], t.dim())
        for name, t in zip(names, meta_inputs)
        if isinstance(t, torch.Tensor) and batch_dims.get(name) is not None
    }
    sizes = {int(t.shape[seeds[n]]) for n, t in zip(names, meta_inputs) if n in seeds}
    flow = BatchFlow(dict(batch_dims))
    if len(sizes) > 1:
        flow.mixing.append(("<inputs>", f"has inputs with different batch sizes {sorted(sizes)} on their batch dims"))
        return flow
    if not seeds:
        return flow
    distinct = _distinct_size(gm, meta_state.values())
    with stateless._reparametrize_module(gm, meta_state, tie_weights=True), torch.no_grad():
        for batch in (distinct, sizes.pop()):
            resized = [_resized(t, seeds.get(n), batch) for n, t in zip(names, meta_inputs)]
            tracker = _Tracker(batch)
            for name, t in zip(names, resized):
                if name in seeds:
                    tracker.states[t] = Rows(seeds[name])
            try:
                out = _Interpreter(gm, tracker, meta_state.values(), reuse).run(*resized)
                break
            except Exception:  # the graph is specialized to the example's batch size: use that one
                if batch != distinct:
                    raise
    flow.mixing, flow.notes = tracker.mixing, tracker.notes
    flow.outputs = [tracker.state(t) for t in pytree.tree_leaves(out)]
    for i, s in enumerate(flow.outputs):
        if _sorted(s):
            flow.mixing.append((f"output {i}", "holds rows in the order of a sort over the batch, not the batch's"))
    for i, s in enumerate(flow.outputs):
        if s is REDUCED:
            flow.notes.append((
                f"output {i}",
                "is a reduction over the batch (a mean or sum): the step's loss is the mean of the microbatches' "
                "values, equal to the whole batch's for plain means over equal microbatches",
            ))  # fmt: skip
    return flow


def _distinct_size(gm: fx.GraphModule, weights: Any) -> int:
    """The smallest prime >= 5 that no tensor of the annotated graph (or weight) has as a dim."""
    seen = {d for w in weights for d in w.shape}
    for n in gm.graph.nodes:
        seen.update(d for t in _tensors(n.meta.get("val")) for d in t.shape if isinstance(d, int))
    candidate = 5
    while candidate in seen or any(candidate % p == 0 for p in range(2, int(candidate**0.5) + 1)):
        candidate += 1
    return candidate


def _resized(t: Any, dim: int | None, size: int) -> Any:
    if dim is None or not isinstance(t, torch.Tensor):
        return t
    shape = list(t.shape)
    shape[dim] = size
    return torch.empty(shape, dtype=t.dtype, device="meta")
