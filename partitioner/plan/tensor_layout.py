"""plan.tensor_layout: a tensor-parallel layout as plain data (`TensorParallelPlan`) and the shard arithmetic every
consumer of one uses (the rewrite, the checkpoint merge, the runtime's loads).

Invariant: `unshard_tensor([shard_tensor(t, dim, parts, r, tp, pad, whole) for r in range(tp)], dim, parts, pad,
whole)` equals `t`. `pad` (vocabulary padding): `t` is first extended by `pad` zero rows along `dim` so that tp divides
it; the last rank(s) hold those rows, which the model never reads (plan.tensor's module docstring), and unsharding drops
them. `whole` (a multi-query fused projection: q rows sharded, the one k and v kept whole): the last `whole` rows of
`dim` are held whole by every rank, after its slice of the others; unsharding takes them from the first rank.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["REPLICATED", "TensorParallelPlan", "kept_whole_share", "shard_slices", "shard_tensor", "unshard_tensor"]

REPLICATED = "replicated"


@dataclass
class TensorParallelPlan:
    """The layout plan of one graph at one tp degree: plain data, `to_json()` / `from_json()` round-trip.

    node_layout: node name -> "replicated" | "shard(d)" | "partial" | "seq(d)" (every node of the graph; seq: split
        along the tokens under sequence parallelism, plan.tensor_sequence).
    param_shard: parameter name -> {"dim": int | None, "parts": int} (dim None = replicated), plus "pad": rows
        added at the end of `dim` so that tp divides a vocabulary (padded size = size + pad), or "whole": the last
        rows of `dim` every rank holds whole (a fused q | k | v whose k and v heads tp does not split; local size =
        (size - whole) / tp + whole); tied names both.
    module_rules: node name -> "column" | "row" | "vocab_embedding" | "vocab_cross_entropy" | "reduce_mean" |
        "reduce_sum" (a mean / sum over the sharded dim: each rank's part, all-reduced; a mean's divided by tp).
    arg_rewrites: node name -> argument paths (["args", i] or ["args", i, j] or ["kwargs", k(, j)]) whose value
        (a global size: int, or an int node) becomes value // tp.
    whole_rewrites: node name -> [{"path": argument path, "whole": w}]: a size or index along a dim whose last
        elements every rank holds whole (see param_shard's "whole"); its value v becomes (v - w) // tp + w.
    local_shares: node name -> the fraction of its elements a rank holds, for sharded nodes where that is not 1/tp
        (those with a dim held partly whole).
    global_sizes: int-valued nodes read from a sharded dimension; the applier multiplies them by tp so every
        int in the graph stays a global size. global_shapes: torch.Size-valued nodes of sequence-split values ->
        the dim the applier multiplies by tp.
    collectives: {"kind": "all_reduce" | "all_gather" | "reduce_scatter" | "scatter", "phase": "forward" |
        "backward" | "step", "after": node, "users": [nodes] (the consumers it feeds: f, and the gathers and scatters
        of sequence parallelism), "grad": "reduce_scatter" | "slice" (a forward all-gather's backward), "params":
        [names] (an all-reduce of these parameters' gradients: at phase "step" once per step, after the last
        microbatch's backward, all of a rank's in one call; a plan saved before that has them at "backward", summed
        per microbatch in the graph), "columns": true (a gather feeding the
        column-parallel Linears in `users` as one node that saves the shard), "op": "sum" | "max", "dim": gather /
        scatter dim, "bytes": bytes of the full tensor per call}. Backward records of sequence parallelism
        (all-gathers, reduce-scatters) are priced; the rewrite inserts them as the backward of forward ones.
    fallbacks: {"node": seed node, "reason": why it stays replicated}.
    requirements: sizes a tp must divide for the sharded nodes of this plan ({"node", "size"}).
    """

    tp: int
    node_layout: dict[str, str]
    param_shard: dict[str, dict[str, int | None]]
    module_rules: dict[str, str]
    arg_rewrites: dict[str, list[list[Any]]]
    global_sizes: list[str]
    collectives: list[dict[str, Any]]
    fallbacks: list[dict[str, str]]
    requirements: list[dict[str, Any]] = field(default_factory=list)
    gather_output: bool = True
    sequence_parallel: bool = False
    global_shapes: dict[str, int] = field(default_factory=dict)
    whole_rewrites: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    local_shares: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        """The layout as JSON text (sorted keys); `from_json` reads it back equal."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TensorParallelPlan:
        """The layout `to_json` wrote."""
        return cls(**json.loads(text))

    def sharded_nodes(self) -> list[str]:
        """Names of the nodes whose layout is not replicated (sharded, partial or sequence-split), graph order."""
        return [n for n, lay in self.node_layout.items() if lay != REPLICATED]

    def param_share(self, name: str, size: int) -> float:
        """The fraction of parameter `name` (its sharded dim of `size` elements) one rank holds: 1 when replicated,
        1/tp when sharded, more with a dim held partly whole."""
        spec = self.param_shard.get(name, {"dim": None})
        return kept_whole_share(size, spec.get("whole", 0), self.tp) if spec.get("dim") is not None else 1.0

    def step_summed_params(self) -> list[str]:
        """The parameters whose gradients are summed over the tp ranks once per step, after the backward (sequence
        parallelism's norms and row-parallel biases: each rank's copy saw only its tokens), each once: a parameter
        several nodes read (ALBERT's one layer called for every layer) is in several collectives' lists, and summing
        its gradient twice over the ranks would make it tp times too large."""
        names = (p for c in self.collectives if c["phase"] == "step" for p in c.get("params", ()))
        return list(dict.fromkeys(names))

    def summary(self) -> str:
        """A short table: counts per layout, collectives per kind/phase, fallbacks with reasons."""
        sp = f" (sequence parallel: {sum(lay.startswith('seq') for lay in self.node_layout.values())} split)"
        lines = [
            f"tensor parallel tp={self.tp}: {len(self.sharded_nodes())}/{len(self.node_layout)} nodes sharded"
            + (sp if self.sequence_parallel else "")
        ]
        kinds: dict[str, int] = {}
        for c in self.collectives:
            key = f"{c['kind']}({c.get('op', 'cat' if c['kind'] == 'all_gather' else '')}) {c['phase']}"
            kinds[key] = kinds.get(key, 0) + 1
        lines += [f"  {k}: {v}" for k, v in sorted(kinds.items())]
        lines += [f"  replicated {f['node']}: {f['reason']}" for f in self.fallbacks]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- shard math
def kept_whole_share(size: int, whole: int, tp: int) -> float:
    """The fraction of a dim of `size` one of `tp` ranks holds when its last `whole` are held whole by every rank (1/tp
    when none is)."""
    return ((size - whole) / tp + whole) / size if whole else 1.0 / tp


def shard_slices(
    shape: tuple[int, ...] | torch.Size, dim: int, parts: int, rank: int, tp: int, pad: int = 0, whole: int = 0
) -> list[tuple]:
    """Index tuples into the full tensor that rank `rank` holds, in local order (one per part, then the whole tail).
    With `pad`, the rank's rows past the end of the full tensor are padding: local = cat(full[s] for s in slices), then
    zero rows up to the local size (`shard_tensor`). With `whole`, the last `whole` rows of `dim` follow the rank's
    slice of the others.

    Example: shape (192, 64), dim 0, parts 3, tp 2, rank 1 -> rows [32:64], [96:128], [160:192].
    Example: shape (97, 64), dim 0, parts 1, tp 2, pad 1, rank 1 -> rows [49:97] (and one padding row).
    Example: shape (96, 64), dim 0, parts 1, tp 2, whole 32, rank 1 -> rows [32:64], [64:96].
    """
    size = shape[dim]
    if (pad or whole) and parts != 1:
        raise ValueError("a padded dimension, or one held partly whole, has one part")
    if pad and whole:
        raise ValueError("a dimension is either padded or held partly whole")
    if not 0 <= whole < size:
        raise ValueError(f"whole={whole} rows of a dimension of size {size}")
    if (size - whole + pad) % (parts * tp):
        what = f"{size - whole} rows before the {whole} kept whole" if whole else f"dimension {dim} of size {size}"
        raise ValueError(f"{what} does not split into {parts} parts x tp={tp}")
    split = size - whole
    block, chunk = (split + pad) // parts, (split + pad) // (parts * tp)
    lead = (slice(None),) * dim
    out = []
    for i in range(parts):
        start = i * block + rank * chunk
        out.append(lead + (slice(min(start, split), min(start + chunk, split)),))
    if whole:
        out.append(lead + (slice(split, size),))
    return out


def shard_tensor(
    full: torch.Tensor, dim: int, parts: int, rank: int, tp: int, pad: int = 0, whole: int = 0
) -> torch.Tensor:
    """Rank `rank`'s shard of `full` (a copy when parts > 1, padded or partly whole, else a view)."""
    pieces = [full[s] for s in shard_slices(full.shape, dim, parts, rank, tp, pad, whole)]
    local = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)
    short = (full.shape[dim] + pad) // tp - local.shape[dim] if not whole else 0
    if short:
        zeros = list(local.shape)
        zeros[dim] = short
        local = torch.cat([local, local.new_zeros(zeros)], dim)
    return local


def unshard_tensor(shards: list[torch.Tensor], dim: int, parts: int, pad: int = 0, whole: int = 0) -> torch.Tensor:
    """Inverse of `shard_tensor` over all ranks: `unshard_tensor([shard_tensor(t, d, p, r, n, pad, whole) ...]) == t`
    (a row held whole comes from the first rank)."""
    if whole:
        split = shards[0].shape[dim] - whole
        tail = shards[0].narrow(dim, split, whole)
        return torch.cat([s.narrow(dim, 0, split) for s in shards] + [tail], dim)
    blocks = [s.chunk(parts, dim) for s in shards]
    full = torch.cat([blocks[r][i] for i in range(parts) for r in range(len(shards))], dim)
    return full.narrow(dim, 0, full.shape[dim] - pad) if pad else full
