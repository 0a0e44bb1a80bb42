"""annotate: run the captured graph once on meta tensors and record what every node costs.

Writes into `node.meta` (consumers check `"flops" in node.meta` rather than re-deriving):
- "val"          the output with meta tensors (shapes, dtypes), detached
- "flops"        forward FLOPs, from torch.utils.flop_counter.FlopCounterMode
- "bwd_flops"    backward FLOPs (rule below; 0 when not training)
- "mem_bytes"    bytes the forward kernel(s) read and write; 0 for views (output aliases an input)
- "bwd_bytes"    bytes the backward kernel(s) read and write (rule below; 0 for views and when not training)
- "out_bytes"    bytes of the tensor outputs (what crosses a stage boundary if this value does)
- "saved_bytes"  activation bytes autograd keeps for backward, first saver of a storage pays for it
- "saves"        every activation storage the node saves for backward, by name (see "storages"; a storage the
                 node creates and saves but does not return is named `node#k`) -> bytes, the ones an earlier node
                 saved too included: what activation recomputation (plan.recompute) needs to know which storages a
                 checkpointed region can drop. Fused kernels save what they save on a GPU, not what the meta
                 path's decomposition would: SDPA its inputs, output and softmax statistics, dropout a bool mask,
                 RMSNorm (nn.RMSNorm, F.rms_norm: torch's `_fused_rms_norm`, a CUDA kernel since torch 2.8) its
                 input and one fp32 rstd per row (the meta and CPU paths decompose it and save fp32 copies: 4x a
                 bf16 input). Hand-written norms (HF's LlamaRMSNorm) run as the ops they are, on a GPU too. A gated
                 activation `act(gate) * up` (SwiGLU, GeGLU) saves gate and up but not act(gate): the runtime runs it
                 as partitioner.gated's fused op (passes.fuse_gated), whose backward computes the activation again
                 (its read and write added to the product's "bwd_bytes"); the product's meta names the activation
                 ("gated_activation")
- "params"       qualified names of the parameters and buffers the node reads
- "dtype"        the floating dtype the node computes in (for the FLOP rate)
- "is_tensor"    whether the output holds any tensor
- "storages"     the storages the output's tensors live in, by name: a storage is named after what first
                 held it (a parameter or buffer by its qualified name, otherwise the node that created it), so
                 a view or an in-place op's result carries the name of the tensor it aliases
- "reads"        storages of the node's tensor inputs (and, for call_module, of the module's own state)
- "writes"       storages the node wrote in place: the version counter of an input (or of the module's
                 state) moved while it ran, which covers in-place ops, `out=`, setitem and writes through
                 views; plus the running statistics of batch/instance norm in training, which ATen updates
                 without a version bump (`_hidden_writes`). Consumers: partitioner.plan.ordering.

A node whose call repeats an earlier node's exactly (a transformer's layers) is annotated from that node's record
instead of being run (partitioner.annotate_reuse): the same figures, a sixth of gpt3-175b's annotation time.

Invariant: no real memory is allocated for weights or activations: real parameters are swapped for
meta tensors while the graph runs (and restored after), so gpt3-175b annotates in a few hundred MB.

Backward FLOPs rule: a FLOP-bearing op (matmul, conv, attention) needs one product of the forward's
size per operand that requires grad (grad wrt input, grad wrt weight), capped at two; the forward
count of other ops is ~0 and their backward is priced by bytes in the cost model.

Backward bytes rule: a node's backward reads the gradient of its outputs (once per operand gradient of a
FLOP-bearing op, each a product of its own, as above; once otherwise: one elementwise kernel computes every input's
gradient), what it saved for backward and, when an input needs a gradient, the parameters it holds, and writes the
gradient of every input and parameter that requires one. Softmax: dy, y in, dx out, 1.5x its forward's bytes;
dropout: dy and the bool mask in, dx out, as its forward; a matmul A B: dC twice, A and B in, dA and dB out, about
twice its forward's.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
import torch.fx as fx
from torch.autograd.graph import saved_tensors_hooks
from torch.nn.utils import stateless
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from partitioner.annotate_reuse import Record, record, signature
from partitioner.gated import gated_pair, runs_fused
from partitioner.meta import meta_device, storage_key, to_meta
from partitioner.plan.tensor_ops import GROUPED_MM

__all__ = ["AnnotationError", "annotate", "is_attention"]


class AnnotationError(ValueError):
    """A node failed on meta tensors; the message names the node and the module it came from."""


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _CostInterpreter(fx.Interpreter):
    """Runs nodes on meta tensors, recording per-node costs into node.meta."""

    def __init__(self, gm: fx.GraphModule, param_storages: dict[int, str], training: bool, reuse: bool = True):
        # Every value stays alive for the whole run, so a storage key is never reused for another storage.
        super().__init__(gm, garbage_collect_values=False)
        self.param_storages = param_storages  # storage key -> qualified name
        self.storage_names = dict(param_storages)  # storage key -> name of what first held it
        self.training = training
        self.saved_seen: set[int] = set()
        # What autograd saved is freed with its graph where no output needs a gradient: kept, as every value is
        self.saved_alive: list[torch.Tensor] = []
        # Calls that repeat an earlier one's exactly are annotated from its record (partitioner.annotate_reuse)
        self.records: dict[tuple, Record] | None = {} if reuse else None
        self.reused = 0
        self._own_key = 0  # keys (negative) for the storages a reused call saves of its own

    def _storage_name(self, t: torch.Tensor, creator: fx.Node) -> str:
        return self.storage_names.setdefault(storage_key(t), creator.name)

    def run_node(self, n: fx.Node) -> Any:
        packed: dict[int, tuple[str, int]] = {}  # storage key -> (name, bytes) of what autograd saves here

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = storage_key(t)
            if key not in self.param_storages:
                packed[key] = (self._storage_name(t, n), t.untyped_storage().nbytes())
                self.saved_alive.append(t)  # its key names it: no later storage may take the key over
            return t

        args, kwargs = self.fetch_args_kwargs_from_env(n)
        self._check_dtypes(n, args, kwargs)
        if n.op == "call_function":  # export graphs bake the capture device (aten.to.device(x, cpu)): stay on meta
            args, kwargs = pytree.tree_map(meta_device, (args, kwargs))
        inputs = _tensors((args, kwargs))
        watched = inputs + self._module_state(n)
        key = None
        fused = self._fused_gate(n)  # an activation's output a fused gated activation does not save
        if self.records is not None and "capture_leaf" not in n.meta:
            key = signature(n, self.module, args, kwargs, self.param_storages.keys())
            if key is not None and fused is not None:  # a plain product's record would save the activation
                key = (key, "gated")
            if key is not None and key in self.records:
                return self._from_record(n, self.records[key], inputs, watched)
        versions = [t._version for t in watched]
        try:
            with FlopCounterMode(display=False) as counter, saved_tensors_hooks(pack, lambda t: t):
                result = getattr(self, n.op)(n.target, args, kwargs)
            flops = int(counter.get_total_flops()) or _grouped_mm_flops(n, args)
        except Exception as e:
            if "capture_leaf" not in n.meta:
                where = f" (module {n.target!r})" if n.op == "call_module" else ""
                raise AnnotationError(
                    f"node {n.format_node()}{where} failed on the example inputs: {type(e).__name__}: {e}. "
                    f"Check that the example inputs have the shapes and dtypes the model expects."
                ) from e
            # An opaque leaf of capture's module-level fallback cannot run on meta: measured or estimated.
            from partitioner.leaves import leaf_cost

            profile = leaf_cost(self.module.get_submodule(n.target), n, args, kwargs, training=self.training)
            result, flops = profile.output, profile.flops
            packed = {-id(n): (n.name, profile.saved_bytes)} if profile.saved_bytes else {}

        outputs = _tensors(result)
        if is_attention(n):
            packed = self._flash_saves(n, inputs, outputs)
        elif packed and outputs and _is_dropout(n, self.module):
            # The fused kernel (CUDA's native_dropout, what torch.compile emits) keeps a bool mask; the composite
            # meta path keeps one of the input's dtype.
            packed = {-id(n): (f"{n.name}#mask", outputs[0].numel())}
        elif packed and outputs and (norm_dims := _rms_norm_dims(n, self.module, args, kwargs)):
            packed = self._fused_rms_norm_saves(n, inputs[0], norm_dims)
        if fused is not None:
            packed.pop(storage_key(fused), None)
        packed = self._name_internals(n, packed, outputs)
        saves, saved = self._saves(packed)
        params = self._params_read(n, inputs)
        in_keys = {storage_key(t) for t in inputs}
        aliases = bool(outputs) and all(storage_key(t) in in_keys for t in outputs)
        n.meta["val"] = pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, result)
        n.meta["flops"] = flops
        n.meta["bwd_flops"] = self._bwd_flops(flops, inputs, n) if self.training else 0
        n.meta["out_bytes"] = sum(_nbytes(t) for t in outputs)
        n.meta["mem_bytes"] = self._mem_bytes(n, inputs, outputs, aliases)
        n.meta["bwd_bytes"] = (
            self._bwd_bytes(n, inputs, outputs, sum(saves.values()), flops) if self.training and not aliases else 0
        )
        if fused is not None and n.meta["bwd_bytes"]:  # the backward computes the activation again: reads, writes
            n.meta["bwd_bytes"] += 2 * _nbytes(fused)
        n.meta["params"] = params
        n.meta["is_tensor"] = bool(outputs)
        n.meta["requires_grad"] = any(t.requires_grad for t in outputs)
        floating = [t.dtype for t in inputs + outputs if t.is_floating_point()]
        n.meta["dtype"] = str(floating[0]).removeprefix("torch.") if floating else "float32"
        written = [t for t, v in zip(watched, versions) if t._version != v] + _hidden_writes(
            n, self.module, args, kwargs
        )
        self._name_storages(n, outputs, watched, written, saves, saved)
        if key is not None and not written and "leaf_profile" not in n.meta:
            same = {k: n.meta[k] for k in _CALL_FIGURES}
            made = record(n, inputs, result, packed, self.storage_names, same)
            if made is not None:
                self.records[key] = made
        return result

    def _fused_gate(self, n: fx.Node) -> torch.Tensor | None:
        """The activation's output of a gated activation n that runs fused (partitioner.gated: the runtime's
        passes.fuse_gated rewrites the same matches; the call's own checks), or None."""
        if n.op not in ("call_function", "call_method") or not self.training:
            return None
        pair = gated_pair(n, self.module)
        if pair is None:
            return None
        s, up = self.env.get(pair.activation), self.env.get(pair.up)
        if not (isinstance(s, torch.Tensor) and isinstance(up, torch.Tensor)):
            return None
        if not runs_fused(s, up):
            return None
        n.meta["gated_activation"] = pair.activation.name
        return s

    def _from_record(self, n: fx.Node, rec: Record, inputs: list[torch.Tensor], watched: list[torch.Tensor]) -> Any:
        """Annotate n from the record of an earlier call it repeats: its outputs made from the recipes, every storage
        named as a full run names it (partitioner.annotate_reuse)."""
        self.reused += 1
        result = rec.outputs.make(inputs)
        outputs = _tensors(result)
        packed: dict[int, tuple[str, int]] = {}
        for where, which, nbytes in rec.saves:
            if where == "own":
                self._own_key -= 1
                packed[self._own_key] = (f"{n.name}#{which}", nbytes)
            else:
                t = inputs[which] if where == "input" else outputs[which]
                packed[storage_key(t)] = (self._storage_name(t, n), nbytes)
        n.meta["val"] = pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, result)
        n.meta.update(rec.meta)
        n.meta["params"] = self._params_read(n, inputs)
        self._name_storages(n, outputs, watched, [], *self._saves(packed))
        return result

    def _saves(self, packed: dict[int, tuple[str, int]]) -> tuple[dict[str, int], int]:
        """What a node saves (storage name -> bytes) from its packed storages, and the bytes it pays: those no earlier
        node saved (the first saver of a storage pays for it)."""
        saves: dict[str, int] = {}
        for name, nbytes in packed.values():
            saves[name] = saves.get(name, 0) + nbytes
        saved = sum(nbytes for key, (_, nbytes) in packed.items() if key not in self.saved_seen)
        self.saved_seen.update(packed)
        return saves, saved

    def _name_storages(self, n: fx.Node, outputs: list[torch.Tensor], watched: list[torch.Tensor],
                       written: list[torch.Tensor], saves: dict[str, int], saved: int) -> None:  # fmt: skip
        """node.meta's saved activations and the storages n's outputs live in, reads and writes, by name."""
        n.meta["saved_bytes"] = saved if self.training else 0
        n.meta["saves"] = saves if self.training else {}
        n.meta["storages"] = sorted({self._storage_name(t, n) for t in outputs})
        n.meta["reads"] = sorted({self._storage_name(t, n) for t in watched})
        n.meta["writes"] = sorted({self._storage_name(t, n) for t in written})

    def _name_internals(self, n: fx.Node, packed: dict, outputs: list[torch.Tensor]) -> dict:
        """Storages node n created and saved but does not return (a mask, statistics) are named `n#k`, so that they
        are told apart from its output, which carries n's own name."""
        out_keys = {storage_key(t) for t in outputs}
        renamed, k = {}, 0
        for key, (name, nbytes) in packed.items():
            if name == n.name and key not in out_keys:
                name = f"{n.name}#{k}"
                k += 1
                if key >= 0:
                    self.storage_names[key] = name
            renamed[key] = (name, nbytes)
        return renamed

    def _flash_saves(self, n: fx.Node, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> dict:
        """What a fused attention kernel saves for backward: its q, k, v (and mask) inputs, its output and the softmax
        statistics (one fp32 per query row and head), never the s x s probabilities. The meta kernel runs the math
        decomposition, whose saved probabilities are not what runs on a GPU (flash / memory-efficient kernels) or
        a CPU (torch's fused CPU kernel)."""
        if not self.training or not any(t.requires_grad for t in outputs):
            return {}
        packed = {storage_key(t): (self._storage_name(t, n), t.untyped_storage().nbytes()) for t in inputs}
        out = outputs[0]
        lse = out.numel() // out.shape[-1] * 4  # (..., heads, queries) in fp32
        packed[storage_key(out)] = (self._storage_name(out, n), _nbytes(out) + lse)
        return packed

    def _fused_rms_norm_saves(self, n: fx.Node, x: torch.Tensor, norm_dims: int) -> dict:
        """What `_fused_rms_norm`'s backward reads (`_fused_rms_norm_backward(grad, input, shape, rstd, weight)`):
        the input, and rstd, one value per normalized row in the input's opmath type (fp32 for half types)."""
        rows = x.numel() // max(1, math.prod(x.shape[x.dim() - norm_dims :]))
        rstd_size = 8 if x.dtype == torch.float64 else 4
        return {
            storage_key(x): (self._storage_name(x, n), x.untyped_storage().nbytes()),
            -id(n): (f"{n.name}#rstd", rows * rstd_size),
        }

    def _module_state(self, n: fx.Node) -> list[torch.Tensor]:
        """The parameters and buffers a call_module node reads besides its arguments (meta while annotating)."""
        if n.op != "call_module":
            return []
        mod = self.module.get_submodule(n.target)
        return [*mod.parameters(), *mod.buffers()]

    def _check_dtypes(self, n: fx.Node, args: tuple, kwargs: dict) -> None:
        """Matrix products need operands of one dtype. Meta kernels do not check (the real ones do),
        so without this a Long input to a Linear would plan fine and fail at the first real call."""
        operands: list[torch.Tensor] = []
        if n.op == "call_module" and isinstance(self.module.get_submodule(n.target), _MATMUL_MODULES):
            mod = self.module.get_submodule(n.target)
            operands = [a for a in args[:1] if isinstance(a, torch.Tensor)] + [mod.weight]
        elif n.op == "call_function" and n.target in _MATMUL_FUNCTIONS:
            operands = [a for a in args[:2] if isinstance(a, torch.Tensor)]
        dtypes = {t.dtype for t in operands}
        if len(dtypes) > 1:
            where = f" (module {n.target!r})" if n.op == "call_module" else ""
            raise AnnotationError(
                f"node {n.format_node()}{where} multiplies tensors of different dtypes "
                f"{sorted(str(d) for d in dtypes)}: pass example inputs of the dtype the model's weights have"
            )

    def _params_read(self, n: fx.Node, inputs: list[torch.Tensor]) -> list[str]:
        if n.op == "get_attr":
            return [str(n.target)]
        if n.op == "call_module":
            mod = self.module.get_submodule(n.target)
            prefix = f"{n.target}."
            names = [prefix + k for k, _ in mod.named_parameters(remove_duplicate=False)]
            names += [prefix + k for k, _ in mod.named_buffers(remove_duplicate=False)]
            return names
        return []

    def _mem_bytes(self, n: fx.Node, inputs: list[torch.Tensor], outputs: list[torch.Tensor], aliases: bool) -> int:
        """Bytes the forward kernels read + write: inputs (parameters included) and outputs.

        Views and ops without tensor outputs move nothing. An embedding reads only the rows it
        gathers (about its output's size), not its whole table.
        """
        if aliases or not outputs:
            return 0
        out = sum(_nbytes(t) for t in outputs)
        if _is_embedding(n, self.module):
            return 2 * out + sum(_nbytes(t) for t in inputs if not t.is_floating_point())
        params = 0
        if n.op == "call_module":
            mod = self.module.get_submodule(n.target)
            params = sum(_nbytes(p) for p in mod.parameters()) + sum(_nbytes(b) for b in mod.buffers())
        return sum(_nbytes(t) for t in inputs) + out + params

    def _bwd_bytes(
        self, n: fx.Node, inputs: list[torch.Tensor], outputs: list[torch.Tensor], saved: int, flops: int
    ) -> int:
        """Bytes the backward of n reads and writes (module docstring's rule); 0 when nothing needs its gradient."""
        grad_out = sum(_nbytes(t) for t in outputs if t.requires_grad and t.is_floating_point())
        if not grad_out:
            return 0
        params = [t for t in self._module_state(n) if t.is_floating_point()] + [
            t for t in inputs if storage_key(t) in self.param_storages and t.is_floating_point()
        ]
        param_keys = {storage_key(t) for t in params}
        activations = [
            t for t in inputs if t.requires_grad and t.is_floating_point() and storage_key(t) not in param_keys
        ]
        needing = activations + [t for t in params if t.requires_grad]
        held = sum(_nbytes(t) for t in params) if activations else 0  # an input's gradient goes through the weights
        reads = grad_out * (min(max(len(needing), 1), 2) if flops else 1)
        return reads + saved + held + sum(_nbytes(t) for t in needing)

    def _bwd_flops(self, flops: int, inputs: list[torch.Tensor], n: fx.Node) -> int:
        if flops == 0:
            return 0
        grads = sum(t.requires_grad for t in inputs)
        if n.op == "call_module":
            grads += any(p.requires_grad for p in self.module.get_submodule(n.target).parameters())
        return flops * min(grads, 2)


# The figures of node.meta that depend on the call alone (annotate_reuse.Record.meta)


def _grouped_mm_flops(n: fx.Node, args: tuple) -> int:
    """FLOPs of a grouped matrix product (a mixture of experts' tokens times their experts' weights), which
    FlopCounterMode does not count: each row one k x n product with its group's weight (every row is in some group
    where the offsets cover them all, as the sorted expert ids' do)."""
    schema = getattr(n.target, "_schema", None)
    if schema is None or schema.name not in GROUPED_MM or len(args) < 2:
        return 0
    a, w = args[0], args[1]
    if not (isinstance(a, torch.Tensor) and isinstance(w, torch.Tensor) and a.dim() == 2 and w.dim() == 3):
        return 0
    return 2 * a.shape[0] * a.shape[1] * w.shape[2]


_CALL_FIGURES = ("flops", "bwd_flops", "out_bytes", "mem_bytes", "bwd_bytes", "is_tensor", "requires_grad", "dtype")

_MATMUL_MODULES = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Bilinear)
_MATMUL_FUNCTIONS = {
    torch.nn.functional.linear,
    torch.matmul,
    torch.mm,
    torch.bmm,
    torch.ops.aten.linear.default,
    torch.ops.aten.mm.default,
    torch.ops.aten.bmm.default,
}
_EMBEDDING_FUNCTIONS = {torch.nn.functional.embedding, torch.ops.aten.embedding.default}


_ATTENTION_FUNCTIONS = {
    torch.nn.functional.scaled_dot_product_attention,
    torch.ops.aten.scaled_dot_product_attention.default,
}


def is_attention(n: fx.Node) -> bool:
    """A fused attention call (SDPA): its saved tensors are the fused kernel's (`_flash_saves`)."""
    return n.op == "call_function" and n.target in _ATTENTION_FUNCTIONS


_DROPOUT_FUNCTIONS = {
    torch.nn.functional.dropout,
    torch.ops.aten.dropout.default,
    torch.ops.aten.native_dropout.default,
}


def _is_dropout(n: fx.Node, root: torch.nn.Module) -> bool:
    if n.op == "call_module":
        return isinstance(root.get_submodule(n.target), torch.nn.modules.dropout._DropoutNd)
    return n.op == "call_function" and n.target in _DROPOUT_FUNCTIONS


_RMS_NORM_FUNCTIONS = {
    torch.nn.functional.rms_norm,
    torch.rms_norm,
    torch.ops.aten.rms_norm.default,
    torch.ops.aten._fused_rms_norm.default,
}


def _rms_norm_dims(n: fx.Node, root: torch.nn.Module, args: tuple, kwargs: dict) -> int:
    """How many trailing dims an RMSNorm node normalizes (nn.RMSNorm, F.rms_norm or ATen's), 0 for other nodes."""
    if n.op == "call_module":
        mod = root.get_submodule(n.target)
        return len(mod.normalized_shape) if isinstance(mod, torch.nn.RMSNorm) else 0
    if n.op != "call_function" or n.target not in _RMS_NORM_FUNCTIONS:
        return 0
    shape = args[1] if len(args) > 1 else kwargs.get("normalized_shape")
    return len(shape) if isinstance(shape, (list, tuple)) else 1


def _is_embedding(n: fx.Node, root: torch.nn.Module) -> bool:
    if n.op == "call_module":
        return isinstance(root.get_submodule(n.target), torch.nn.Embedding)
    return n.op == "call_function" and n.target in _EMBEDDING_FUNCTIONS


_NORM_STATISTICS = ("running_mean", "running_var")


def _hidden_writes(n: fx.Node, root: torch.nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """Running statistics a batch/instance norm updates in training. ATen's schemas do not mark them as
    written (`Tensor? running_mean`) and the kernels do not bump their version counters, so the version
    check in run_node cannot see these writes; the op's own arguments say whether it updates them."""
    if n.op == "call_module":
        mod = root.get_submodule(n.target)
        if isinstance(mod, torch.nn.modules.batchnorm._NormBase) and mod.training and mod.track_running_stats:
            return [t for t in (mod.running_mean, mod.running_var) if isinstance(t, torch.Tensor)]
        return []
    if n.op != "call_function":
        return []
    bound = _bind_arguments(n.target, args, kwargs)
    if bound is None or not (bound.get("training") is True or bound.get("use_input_stats") is True):
        return []
    return [t for name in _NORM_STATISTICS if isinstance(t := bound.get(name), torch.Tensor)]


def _bind_arguments(target: Any, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """Argument name -> value of a call, from the ATen schema or the Python signature (None if unknown)."""
    schema = getattr(target, "_schema", None)
    if schema is not None:
        names = [a.name for a in schema.arguments]
        return {**dict(zip(names, args)), **kwargs}
    try:
        return dict(inspect.signature(target).bind(*args, **kwargs).arguments)
    except (TypeError, ValueError):
        return None


def annotate(gm: fx.GraphModule, inputs: list[Any], *, training: bool = True, reuse: bool = True) -> fx.GraphModule:
    """Annotate `gm` in place for placeholder values `inputs` (real or meta tensors); returns `gm`.

    Raises AnnotationError (a ValueError) naming the first node that fails on these inputs. `reuse`: annotate a call
    that repeats an earlier one's exactly from its record (partitioner.annotate_reuse; the same node.meta, faster).
    """
    meta_state: dict[str, torch.Tensor] = {}
    by_tensor: dict[int, torch.Tensor] = {}
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if id(t) not in by_tensor:  # tied tensors stay tied on meta
            by_tensor[id(t)] = to_meta(t.detach()).requires_grad_(t.requires_grad and training)
        meta_state[name] = by_tensor[id(t)]
    param_storages: dict[int, str] = {}
    for name, t in meta_state.items():  # a tied tensor is named by its first name, as plan.graph names it
        param_storages.setdefault(storage_key(t), name)

    meta_inputs = to_meta(list(inputs))
    grad_mode = torch.enable_grad() if training else torch.no_grad()
    with stateless._reparametrize_module(gm, meta_state, tie_weights=True), grad_mode:
        interp = _CostInterpreter(gm, param_storages, training, reuse)
        interp.run(*meta_inputs)
    gm.meta["annotate_reused"] = interp.reused  # nodes annotated from an earlier call's record
    for n in gm.graph.nodes:
        if n.op == "output":
            n.meta["flops"] = 0
    return gm
