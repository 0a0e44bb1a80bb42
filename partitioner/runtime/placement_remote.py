"""runtime/placement_remote: a module-placement plan under torchrun, each rank running its stage's modules.

Rank 0, the driver, runs the model's real Python forward (its control flow takes the branches the real inputs
choose) with the stage-0 modules and the top-level code; every call of a module placed on stage s > 0 becomes a
remote call: the driver sends the call's arguments to rank s, which runs the module on them and sends the outputs
back (point-to-point, torch.distributed: gloo on the CPU, NCCL on GPUs). The remote call is an autograd Function on
the driver, so `loss.backward()` there reaches it in reverse order and sends the output gradients to rank s, which
back-propagates through the call it kept (its parameters' `.grad` accumulate there) and returns the input gradients.
Ranks other than the driver serve calls until the driver ends the step; ranks beyond the plan's stages only take part
in the loss broadcast. A step runs every microbatch's forward, then every backward (GPipe's order, what the plan's
simulation priced), each microbatch in its own driver thread, so that while one waits for a remote call another
runs the driver's code (one at a time: a driver lock, released while waiting); a lock per peer keeps each request and
its reply together.

Invariants: every rank builds the same model (the same script, seed or weights); rank s trains only the parameters
and buffers its stage holds (`Plan.stages[s].params`), so after each optimizer step the ranks' stages together are
the model trained in one process. A parameter code on several stages uses (`Plan.tied_stages`: a tied head reading
an embedding's weight in top-level code, a module a remote module calls inside its own call) is held by each of
them, its gradients summed over them after the backward, so the copies stay equal.

Protocol (rank 0 -> rank s, then back): a header object (op, unit path, call id, grad enabled) and the call's
argument structure with tensors replaced by `_Slot`s (shape, dtype, requires_grad) via `send_object_list`, then each
tensor with `dist.send`; the reply: the output structure, then its tensors. Backward: (BACKWARD, call id) and which
output gradients follow, then the input gradients back. STOP ends the step.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils import _pytree as pytree

from partitioner.plan.schema import Plan
from partitioner.runtime.device import init_process_group
from partitioner.runtime.placement import split_batch

__all__ = ["RemotePlacement"]

_FORWARD, _BACKWARD, _STOP, _FAILED = "forward", "backward", "stop", "failed"


@dataclass(frozen=True)
class _Slot:
    """Where a tensor was in a sent structure."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


def _send(header: Any, value: Any, dst: int, device: torch.device) -> None:
    leaves, spec = pytree.tree_flatten(value)
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    slots, k = [], 0
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            slots.append(_Slot(k, tuple(leaf.shape), leaf.dtype, leaf.requires_grad))
            k += 1
        else:
            slots.append(leaf)
    dist.send_object_list([header, pytree.tree_unflatten(slots, spec)], dst=dst, device=device)
    for t in tensors:
        dist.send(t.detach().to(device).contiguous(), dst=dst)


def _recv(src: int, device: torch.device) -> tuple[Any, Any]:
    """(header, value) from `src`; received float tensors require grad as the sent ones did (leaves here)."""
    box: list[Any] = [None, None]
    dist.recv_object_list(box, src=src, device=device)
    header, structure = box
    leaves, spec = pytree.tree_flatten(structure)
    values = []
    for leaf in leaves:
        if isinstance(leaf, _Slot):
            t = torch.empty(leaf.shape, dtype=leaf.dtype, device=device)
            dist.recv(t, src=src)
            values.append(t.requires_grad_(leaf.requires_grad and t.is_floating_point()))
        else:
            values.append(leaf)
    return header, pytree.tree_unflatten(values, spec)


class _RemoteCall(torch.autograd.Function):
    """One call of a module on another rank, as one autograd node on the driver (module docstring)."""

    @staticmethod
    def forward(ctx: Any, link: _Link, call: int, holder: list, structure: Any, *tensors: torch.Tensor) -> Any:
        leaves, spec = pytree.tree_flatten(structure)
        it = iter(tensors[1:])  # tensors[0]: the token that makes the outputs require grad (see _Link.call)
        args = pytree.tree_unflatten([next(it) if isinstance(x, _Slot) else x for x in leaves], spec)
        # grad mode is off inside an autograd Function's forward: the caller's is in the holder
        _, out = link.exchange((_FORWARD, link.path, call, holder.pop()), args)
        out_leaves, out_spec = pytree.tree_flatten(out)
        outputs = [t for t in out_leaves if isinstance(t, torch.Tensor)]
        holder.append((out_leaves, out_spec))
        ctx.link, ctx.call, ctx.inputs = link, call, [(t.shape, t.dtype, t.device) for t in tensors[1:]]
        returned = tuple(t.detach() for t in outputs)
        ctx.mark_non_differentiable(*[t for t in returned if not t.is_floating_point()])
        return returned

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> Any:
        link = ctx.link
        _, back = link.exchange((_BACKWARD, link.path, ctx.call, True), list(grads))
        # an empty reply: the call kept nothing to differentiate on its rank
        back = list(back) + [None] * (len(ctx.inputs) - len(back))
        back = [None if g is None else g.detach().to(dev) for g, (_, _, dev) in zip(back, ctx.inputs)]
        return (None, None, None, None, None, *back)


@dataclass
class _Link:
    path: str
    rank: int
    device: torch.device
    grad: bool  # the module has trainable parameters: its outputs need a backward even for inputs without grads
    calls: Iterator[int]  # call ids, shared by all links (next() is atomic under the GIL)
    lock: threading.Lock  # the peer's: one exchange with it at a time
    driver: threading.Lock  # the driver's own compute: one microbatch thread at a time runs it

    def exchange(self, header: Any, value: Any) -> tuple[Any, Any]:
        """Send a request to the peer and wait for its reply, letting another microbatch thread run the driver's code
        meanwhile (the driver lock is released first, so no thread waits for a peer while holding it)."""
        self.driver.release()
        try:
            with self.lock:  # a request and its reply, atomic per peer
                _send(header, value, self.rank, self.device)
                reply, value = _recv(self.rank, self.device)
        finally:
            self.driver.acquire()
        if reply[0] == _FAILED:
            raise RuntimeError(f"module {self.path!r} failed on rank {self.rank} (its stage): {value}")
        return reply, value

    def call(self, *args: Any, **kwargs: Any) -> Any:
        """What the driver's patched forward does: one remote call; the outputs rebuilt in the module's structure."""
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        structure = pytree.tree_unflatten(
            [_Slot(0, (), t.dtype, False) if isinstance(t, torch.Tensor) else t for t in leaves], spec
        )
        grad = torch.is_grad_enabled()  # the owner builds an autograd graph (and keeps the call) only then
        token = torch.zeros((), device=self.device, requires_grad=self.grad and grad)
        holder: list = [grad]
        outputs = iter(_RemoteCall.apply(self, next(self.calls), holder, structure, token, *tensors))
        out_leaves, out_spec = holder[0]
        return pytree.tree_unflatten(
            [next(outputs) if isinstance(x, torch.Tensor) else x for x in out_leaves], out_spec
        )


class RemotePlacement:
    """This rank's part of a module-placement plan under torchrun (module docstring): `step`, `parameters`,
    `make_optimizer`, `full_state_dict`."""

    def __init__(self, model: nn.Module, plan: Plan, *, timeout_s: float = 60.0):
        self.model, self.plan = model, plan
        self.device = init_process_group(timeout_s)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.world != plan.devices:
            raise ValueError(f"the plan is for {plan.devices} devices and torchrun started {self.world} ranks")
        self.stage = self.rank if self.rank < plan.num_stages else None
        mine = set(plan.stages[self.stage].params) if self.stage is not None else set()
        named = dict(model.named_parameters(remove_duplicate=False))
        self._params = list({id(p): p for n, p in named.items() if n in mine}.values())
        self._owned = mine
        for name, t in [*named.items(), *model.named_buffers(remove_duplicate=False)]:
            if name in mine and t.device != self.device:  # only what this rank computes with moves to its device
                t.data = t.data.to(self.device)
        # Parameters several stages use (plan.placement.shared_parameters): one group per set of stages, made by every
        # rank in the same order, as new_group requires.
        self._tied: list[tuple[nn.Parameter, dist.ProcessGroup]] = []
        for name, stages in sorted(plan.tied_stages.items()):
            group = dist.new_group(stages)
            if self.rank in stages:
                self._tied.append((named[name], group))

    def parameters(self) -> list[nn.Parameter]:
        """The parameters this rank trains: those of its stage (none beyond the plan's stages)."""
        return list(self._params)

    def make_optimizer(self, optimizer_class: type[torch.optim.Optimizer], **kwargs: Any) -> torch.optim.Optimizer:
        """An `optimizer_class` over this rank's parameters (one that does nothing where it holds none)."""
        from partitioner.runtime.data_parallel import make_optimizer

        return make_optimizer(self._params, optimizer_class, "", None, **kwargs)

    def step(self, inputs: tuple, targets: Any, loss_fn: Callable[[Any, Any], torch.Tensor], microbatches: int,
             kwargs: dict[str, Any] | None = None) -> torch.Tensor:  # fmt: skip
        """One training step over `microbatches` (every rank calls it with the same global batch); returns the mean
        microbatch loss on every rank."""
        loss = torch.zeros((), device=self.device)
        if self.rank == 0:
            calls = split_batch((tuple(inputs), dict(kwargs or {})), microbatches)
            chunks = split_batch(targets, microbatches)

            driver = threading.Lock()

            def forward(i: int) -> torch.Tensor:
                (a, kw), t = calls[i], chunks[i]
                with driver:
                    return loss_fn(self.model(*a, **kw), t)

            def backward(each: torch.Tensor) -> None:
                with driver:
                    (each / microbatches).backward()

            # One thread per microbatch: while one waits for a remote call, another runs the driver's code (GPipe's
            # overlap, as far as each microbatch's control flow allows); every forward, then every backward. The
            # driver's own code runs one thread at a time, as a device runs one kernel stream: a module updating state
            # (BatchNorm's running statistics) is never run by two threads at once.
            try:
                with self._remote_units(driver), ThreadPoolExecutor(microbatches) as pool:
                    losses = list(pool.map(forward, range(microbatches)))
                    list(pool.map(backward, losses))
            finally:
                for s in range(1, self.plan.num_stages):
                    try:
                        _send((_STOP, "", 0, False), None, s, self.device)
                    except Exception:  # a rank that failed has stopped already: the error raised names it
                        pass
            loss = torch.stack([each.detach().float() for each in losses]).mean().to(self.device)
        elif self.stage is not None:
            self._serve()
        for p, group in self._tied:  # every copy's gradient summed: the copies take the same optimizer step
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad, group=group)
            p.grad = grad
        dist.broadcast(loss, src=0)
        return loss.cpu()

    @contextmanager
    def _remote_units(self, driver: threading.Lock) -> Iterator[None]:
        """Each module placed on another stage: its forward a remote call (the driver's model only, for the step)."""
        calls = itertools.count()
        locks = {s: threading.Lock() for s in range(1, self.plan.num_stages)}
        patched = []
        for path, stage in self.plan.node_stage.items():
            if stage == 0:
                continue
            module = self.model.get_submodule(path)
            grad = any(p.requires_grad for p in module.parameters())
            link = _Link(path, stage, self.device, grad, calls, locks[stage], driver)
            patched.append((module, module.__dict__.get("forward")))
            module.forward = link.call
        try:
            yield
        finally:
            for module, before in patched:
                if before is None:
                    del module.forward
                else:
                    module.forward = before

    def _serve(self) -> None:
        """Run the driver's calls of this stage's modules until it ends the step."""
        kept: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        while True:
            (op, path, call, grad), value = _recv(0, self.device)
            if op == _STOP:
                return
            try:
                if op == _FORWARD:
                    reply = self._forward(kept, path, call, grad, value)
                else:
                    reply = self._backward(kept, call, value)
            except Exception as e:  # the driver raises it, naming the module; then this rank stops
                _send((_FAILED, path, call, grad), f"{type(e).__name__}: {e}", 0, self.device)
                raise
            _send((op, path, call, grad), reply, 0, self.device)

    def _forward(self, kept: dict, path: str, call: int, grad: bool, value: Any) -> Any:
        args, kwargs = value
        with torch.set_grad_enabled(grad):
            out = self.model.get_submodule(path)(*args, **kwargs)
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        if grad and any(t.requires_grad for t in outs):
            kept[call] = ([t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)], outs)
        return out

    def _backward(self, kept: dict, call: int, grads: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """The input gradients of a kept call (none where its outputs needed no backward here)."""
        ins, outs = kept.pop(call, ([], []))
        pairs = [(o, g) for o, g in zip(outs, grads) if o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return [t.grad if t.requires_grad else None for t in ins]

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The model's state by original names on rank 0 (each stage's tensors from its rank; collective), None
        elsewhere."""
        state = self.model.state_dict(keep_vars=False)
        mine = {k: v.detach().cpu().clone() for k, v in state.items() if k in self._owned}
        gathered: list[Any] = [None] * self.world if self.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if self.rank != 0:
            return None
        merged = {k: v.detach().cpu().clone() for k, v in state.items()}
        for part in gathered:
            merged.update(part)
        return merged

    def close(self) -> None:
        """Nothing to release: the process group belongs to the script (kept for the pipelines' interface)."""
