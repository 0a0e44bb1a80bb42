"""materialize: real tensors for exactly the parameters a rank holds, from a meta-device model.

Two sources, one interface (``WeightSource.tensors(names, device) -> {name: tensor}``):

* ``StateDictSource(state)``: a full or partial state dict keyed by the original names (it may be lazy, e.g.
  ``torch.load(path, mmap=True)``, so only the entries asked for are read).
* ``ReplayInit``: deferred initialization. ``record_init(build)`` runs ``build()`` on the meta device under a
  ``TorchDispatchMode`` that records every ATen op (factories, the module's own ``reset_parameters`` and
  ``nn.init`` calls, custom re-inits, views such as ``weight[pad].zero_()``). ``tensors(names)`` replays the log
  on the CPU under ``torch.manual_seed(seed)``:

  - ops writing a *needed* storage (the requested tensors and, transitively, whatever those ops read) run on
    real tensors;
  - every other op that draws random numbers (its schema takes a ``Generator``) runs on a scratch tensor of
    the same size and strides, only to advance the generator exactly as the full build does;
  - all other ops are skipped.

  Guarantee: each returned tensor is bit-identical to the same tensor of ``torch.manual_seed(seed); build()``
  run on the CPU with the default generator, while peak memory is the requested tensors (plus what they were
  computed from) and one scratch tensor at a time. Time is that of the whole build's random draws. The
  guarantee needs every random draw of ``build`` to go through ATen ops on the default generator (all of
  ``torch.nn.init`` does); Python's ``random``/NumPy draws, reseeding inside ``build`` or values read from
  outside are not replayed. ``tests/test_distributed.py`` checks it on GPT-3 and BERT shards.

``materialize_modules(modules, source, device)`` swaps every meta parameter/buffer of the given modules for its
real tensor in place (one Parameter per meta Parameter, so a tensor tied within a rank stays one Parameter).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["ReplayInit", "StateDictSource", "WeightSource", "materialize_modules", "record_init"]


@runtime_checkable
class WeightSource(Protocol):
    """Where a rank's real tensors come from: original names in, tensors (on `device`) out."""

    def tensors(self, names: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        """The real tensor of each of `names` (the original model's names), on `device`."""
        ...


@dataclass
class StateDictSource:
    """Tensors from a (possibly lazy) state dict keyed by the original model's names."""

    state: Mapping[str, torch.Tensor]

    def tensors(self, names: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
        """A detached copy of each named entry on `device`; only those entries are read (a lazy dict stays lazy).
        Raises KeyError naming the entries the state dict lacks."""
        missing = [n for n in names if n not in self.state]
        if missing:
            raise KeyError(f"the state dict has no entries for {missing[:5]}{'...' if len(missing) > 5 else ''}")
        return {n: self.state[n].detach().to(device).clone() for n in names}


# --------------------------------------------------------------------------------------------------------------
# Deferred init: record on meta, replay a shard
# --------------------------------------------------------------------------------------------------------------


def _key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (views and Parameters share their base's)."""
    return t.untyped_storage()._cdata


def _tensors_in(tree: Any) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _draws_random(func: Any) -> bool:
    return any("Generator" in str(a.type) for a in func._schema.arguments)


def _written_args(func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    out = []
    schema_args = func._schema.arguments
    for i, a in enumerate(schema_args):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(a.name)
        out.extend(_tensors_in(value))
    return out


@dataclass
class _Op:
    func: Any
    args: tuple
    kwargs: dict
    out: Any


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[_Op] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append(_Op(func, args, kwargs, out))
        return out


@dataclass
class ReplayInit:
    """The recorded construction of a model; `tensors(names)` replays it for those names only (see module doc)."""

    ops: list[_Op]
    names: dict[str, torch.Tensor]  # original name -> the meta tensor (parameter or buffer) of the built model
    seed: int = 0
    stats: dict[str, int] = field(default_factory=dict)

    def tensors(self, names: Sequence[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Replay the recorded construction for `names` only and return their tensors on `device`, each
        bit-identical to the same tensor of ``torch.manual_seed(seed); build()`` (see the module docstring).

        The caller's random generator state is left as it was; `stats` counts the ops recorded, run and run only to
        advance the generator. Raises KeyError for names the recorded model does not have.
        """
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise KeyError(f"the recorded model has no tensors named {unknown[:5]}")
        # Phase 1: storages needed, closed backwards over the ops that write them.
        needed = {_key(self.names[n]) for n in names}
        for op in reversed(self.ops):
            written = {_key(t) for t in _tensors_in(op.out) + _written_args(op.func, op.args, op.kwargs)}
            if written & needed:
                needed |= {_key(t) for t in _tensors_in((op.args, op.kwargs)) if t.is_meta}

        # Phase 2: replay on the CPU under the seed (the caller's generator state is restored afterwards).
        real: dict[int, torch.Tensor] = {}  # id(meta tensor) -> its real counterpart
        base: dict[int, torch.Tensor] = {}  # storage key -> a real tensor on that storage
        ran = drawn = 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for op in self.ops:
                outs = _tensors_in(op.out)
                written = outs + _written_args(op.func, op.args, op.kwargs)
                if any(_key(t) in needed for t in written):
                    args, kwargs = self._realize(op, real, base, scratch=False)
                    result = op.func(*args, **kwargs)
                    for m, r in zip(outs, _tensors_in(result)):
                        real[id(m)] = r
                        base.setdefault(_key(m), r)
                    ran += 1
                elif _draws_random(op.func):
                    args, kwargs = self._realize(op, real, base, scratch=True)
                    op.func(*args, **kwargs)  # advances the generator as the full build does; result dropped
                    drawn += 1
        self.stats = {"ops": len(self.ops), "ran": ran, "random_only": drawn}

        # Phase 3: each name's tensor, with its own geometry on the real storage.
        out = {}
        for n in names:
            m = self.names[n]
            r = real.get(id(m))
            if r is None:
                b = base.get(_key(m))
                if b is None:
                    raise RuntimeError(f"replay produced no storage for {n!r}: its construction was not recorded")
                r = torch.as_strided(b, m.shape, m.stride(), m.storage_offset())
            out[n] = r.detach().to(device)
        return out

    @staticmethod
    def _realize(
        op: _Op, real: dict[int, torch.Tensor], base: dict[int, torch.Tensor], *, scratch: bool
    ) -> tuple[tuple, dict]:
        def convert(x: Any) -> Any:
            if isinstance(x, torch.device) and x.type == "meta":
                return torch.device("cpu")
            if not isinstance(x, torch.Tensor) or not x.is_meta:
                return x
            r = real.get(id(x))
            if r is not None:
                return r
            b = base.get(_key(x))  # another object on a real storage (a Parameter wrapping it, a view)
            if b is not None:
                return torch.as_strided(b, x.shape, x.stride(), x.storage_offset())
            if scratch:
                return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
            raise RuntimeError(f"replaying {op.func}: an input was not produced by a recorded op")

        return pytree.tree_map(convert, op.args), pytree.tree_map(convert, op.kwargs)


def record_init(build: Callable[[], nn.Module], seed: int = 0) -> tuple[nn.Module, ReplayInit]:
    """Build the model on meta, recording its construction: (meta model, replayable init with `seed`)."""
    recorder = _Recorder()
    with torch.device("meta"), recorder:
        model = build()
    names = dict(model.named_parameters(remove_duplicate=False))
    names.update(dict(model.named_buffers(remove_duplicate=False)))
    return model, ReplayInit(recorder.ops, names, seed)


# --------------------------------------------------------------------------------------------------------------
# Swapping meta tensors for real ones
# --------------------------------------------------------------------------------------------------------------


def materialize_modules(
    modules: Sequence[nn.Module],
    source: WeightSource | Mapping[str, torch.Tensor] | None,
    device: torch.device | str = "cpu",
    *,
    aliases: Mapping[str, Sequence[str]] | None = None,
) -> int:
    """Replace every meta parameter/buffer of `modules` (in place) with its tensor from `source`.

    Names are the qualified names inside each module (the original model's names for fx stage modules). A
    name missing from a state dict is looked up under its `aliases` (tied names). Real tensors already present
    are moved to `device`. Returns the number of tensors materialized. Raises ValueError when a meta tensor
    remains and there is no source.
    """
    device = torch.device(device)
    aliases = aliases or {}
    if isinstance(source, Mapping):
        source = StateDictSource(source)

    # Phase 1: the meta tensors, each once, under the first name it is reachable by.
    slots: list[tuple[dict, str, torch.Tensor]] = []
    wanted: dict[int, str] = {}
    for module in modules:
        for prefix, sub in module.named_modules(remove_duplicate=False):
            for table in (sub._parameters, sub._buffers):
                for key, t in table.items():
                    if t is None:
                        continue
                    slots.append((table, key, t))
                    if t.is_meta:
                        wanted.setdefault(id(t), f"{prefix}.{key}" if prefix else key)
    if wanted and source is None:
        raise ValueError(
            f"{len(wanted)} tensors are on the meta device (e.g. {next(iter(wanted.values()))!r}) and no weights were "
            "given: pass a state dict or a ReplayInit (record_init) as weights"
        )

    # Phase 2: fetch them (one call, so a replay makes one pass), resolving tied aliases for state dicts.
    fetched: dict[int, torch.Tensor] = {}
    if wanted:
        names = list(wanted.values())
        if isinstance(source, StateDictSource):
            names = [next((a for a in aliases.get(n, [n]) if a in source.state), n) for n in names]
        got = source.tensors(names, device)
        for (tid, _), name in zip(wanted.items(), names):
            fetched[tid] = got[name]

    # Phase 3: swap in place; one new Parameter per meta Parameter.
    made: dict[int, torch.Tensor] = {}
    for table, key, t in slots:
        if id(t) not in made:
            if t.is_meta:
                value = fetched[id(t)]
                if value.shape != t.shape:
                    raise ValueError(
                        f"{wanted[id(t)]!r}: got shape {tuple(value.shape)}, the model has {tuple(t.shape)}"
                    )
                value = value.to(t.dtype)
            else:
                value = t.data.to(device) if t.device != device else t
            if isinstance(t, nn.Parameter) and not isinstance(value, nn.Parameter):
                value = nn.Parameter(value, requires_grad=t.requires_grad)
            made[id(t)] = value
        table[key] = made[id(t)]
    return len(wanted)
