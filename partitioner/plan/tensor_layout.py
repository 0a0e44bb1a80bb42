"""plan.tensor_layout: a tensor-parallel layout as plain data (`TensorParallelPlan`) and the shard arithmetic every
consumer of one uses (the rewrite, the checkpoint merge, the runtime's loads).

Invariant: `unshard_tensor([shard_tensor(t, dim, parts, r, tp, pad) for r in range(tp)], dim, parts, pad)` equals
`t`. `pad` (vocabulary padding): `t` is first extended by `pad` zero rows along `dim` so that tp divides it; the last
rank(s) hold those rows, which the model never reads (plan.tensor's module docstring), and unsharding drops them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["REPLICATED", "TensorParallelPlan", "shard_slices", "shard_tensor", "unshard_tensor"]

REPLICATED = "replicated"


@dataclass
class TensorParallelPlan:
    """The layout plan of one graph at one tp degree: plain data, `to_json()` / `from_json()` round-trip.

    node_layout: node name -> "replicated" | "shard(d)" | "partial" | "seq(d)" (every node of the graph; seq: split
        along the tokens under sequence parallelism, plan.tensor_sequence).
    param_shard: parameter name -> {"dim": int | None, "parts": int} (dim None = replicated), plus "pad": rows
        added at the end of `dim` so that tp divides a vocabulary (padded size = size + pad); tied names both.
    module_rules: node name -> "column" | "row" | "vocab_embedding" | "vocab_cross_entropy".
    arg_rewrites: node name -> argument paths (["args", i] or ["args", i, j] or ["kwargs", k(, j)]) whose value
        (a global size: int, or an int node) becomes value // tp.
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

    def step_summed_params(self) -> list[str]:
        """The parameters whose gradients are summed over the tp ranks once per step, after the backward (sequence
        parallelism's norms and row-parallel biases: each rank's copy saw only its tokens)."""
        return [p for c in self.collectives if c["phase"] == "step" for p in c.get("params", ())]

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
def shard_slices(
    shape: tuple[int, ...] | torch.Size, dim: int, parts: int, rank: int, tp: int, pad: int = 0
) -> list[tuple]:
    """Index tuples into the full tensor that rank `rank` holds, in local order (one per part). With `pad`, the
    rank's rows past the end of the full tensor are padding: local = cat(full[s] for s in slices), then zero rows
    up to the local size (`shard_tensor`).

    Example: shape (192, 64), dim 0, parts 3, tp 2, rank 1 -> rows [32:64], [96:128], [160:192].
    Example: shape (97, 64), dim 0, parts 1, tp 2, pad 1, rank 1 -> rows [49:97] (and one padding row).
    """
    size = shape[dim]
    if pad and parts != 1:
        raise ValueError("a padded dimension has one part")
    if (size + pad) % (parts * tp):
        raise ValueError(f"dimension {dim} of size {size} does not split into {parts} parts x tp={tp}")
    block, chunk = (size + pad) // parts, (size + pad) // (parts * tp)
    lead = (slice(None),) * dim
    out = []
    for i in range(parts):
        start = i * block + rank * chunk
        out.append(lead + (slice(min(start, size), min(start + chunk, size)),))
    return out


def shard_tensor(full: torch.Tensor, dim: int, parts: int, rank: int, tp: int, pad: int = 0) -> torch.Tensor:
    """Rank `rank`'s shard of `full` (a copy when parts > 1 or padded, else a view)."""
    pieces = [full[s] for s in shard_slices(full.shape, dim, parts, rank, tp, pad)]
    local = pieces[0] if parts == 1 else torch.cat(pieces, dim)
    short = (full.shape[dim] + pad) // tp - local.shape[dim]
    if short:
        zeros = list(local.shape)
        zeros[dim] = short
        local = torch.cat([local, local.new_zeros(zeros)], dim)
    return local


def unshard_tensor(shards: list[torch.Tensor], dim: int, parts: int, pad: int = 0) -> torch.Tensor:
    """Inverse of `shard_tensor` over all ranks: `unshard_tensor([shard_tensor(t, d, p, r, n, pad) ...]) == t`."""
    blocks = [s.chunk(parts, dim) for s in shards]
    full = torch.cat([blocks[r][i] for i in range(parts) for r in range(len(shards))], dim)
    return full.narrow(dim, 0, full.shape[dim] - pad) if pad else full
