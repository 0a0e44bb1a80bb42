"""Our predictions against published, measured training runs: the calibration check of the cost model.

    python bench/published.py                       # every row of ../shared/calibration/*.csv
    python bench/published.py --rows "GPT 1.7B" --search

For each row: the GPT is built on the meta device as its paper ran it (layers, hidden, heads, FFN width, vocabulary,
sequence; fp16 weights; attention written out with the s x s probabilities materialized and dropout 0.1, as
Megatron-LM's 2021 code), compiled with the published layout forced (pipeline, tensor, interleaved stages,
microbatches = global batch / (dp x micro batch), the row's recompute, DDP replicas reducing their gradients as the
run's software did), and priced on the row's device. Printed: predicted and published seconds per step, their
ratio, whether the memory model fits the layout in the device's memory, and (--search) the layout the free search
picks for the same devices and batch, with its predicted step.

Published step time: the paper's FLOPs per iteration over the achieved FLOP/s of all GPUs,
    time = 96 B s l h^2 (1 + s / 6h + V / 16 l h) / (N x achieved TFLOP/s per GPU)
(Narayanan et al. 2021, eq. 3, which counts the recomputed forward too). Nothing here is fitted to these rows:
the device presets and the cost model are what every other compile uses.

Gradient reduction: a row's optional `overlap_grad_reduce` column (true / false) says whether its DDP all-reduced
during the backward; without it, the run's own launch scripts decide (`overlaps_grad_reduce`). Narayanan et al.
2021: the authors' examples/sc21/run_table_1.sh (Megatron-LM, 2021-08-10) passes --DDP-impl torch (torch's DDP,
overlapped with the backward) for the pp = 1 rows and --DDP-impl local for the others, whose train_step ran
`allreduce_gradients()` once `forward_backward_func` had returned: after the backward, fp16 gradients. Runs of
other sources are taken to overlap it, as DDP does.

Sequence parallelism: a row's optional `sequence_parallel` column (true / false); without it, off (Megatron-LM's
--sequence-parallel came with Korthikanti et al. 2022, after the 2021 runs).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import partitioner  # noqa: E402
from partitioner.units import format_bytes, format_seconds  # noqa: E402
from zoo.gpt3 import GPT, GPTConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT.parent / "shared" / "calibration"
RESULTS = ROOT / "bench" / "results"
DEVICES = {"A100": "a100", "H100": "h100", "H200": "h200"}
NARAYANAN_2021 = "arxiv.org/abs/2104.04473"


@dataclass(frozen=True)
class Row:
    """One published run (a CSV row of shared/calibration)."""

    model: str
    system: str
    gpus: int
    global_batch: int
    micro_batch: int
    seq: int
    tp: int
    pp: int
    vp: int
    dp: int
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    tflops_per_gpu: float
    recompute: str
    overlap_grad_reduce: bool = True
    sequence_parallel: bool = False

    @classmethod
    def parse(cls, r: dict[str, str]) -> Row:
        recompute = r["act_recompute"].split()[0].lower() if r.get("act_recompute") else "none"
        if r.get("overlap_grad_reduce"):
            overlap = r["overlap_grad_reduce"].strip().lower() in ("true", "yes", "1")
        else:
            overlap = overlaps_grad_reduce(r.get("source_url", ""), pp=int(r["pp"]))
        return cls(
            model=r["model"], system=r["system"], gpus=int(r["num_gpus"]), global_batch=int(r["gbs"]),
            micro_batch=int(r["mbs"]), seq=int(r["seq_len"]), tp=int(r["tp"]), pp=int(r["pp"]),
            vp=int(r["vp"] or 1), dp=int(r["dp"]), layers=int(r["layers"]), hidden=int(r["hidden"]),
            heads=int(r["heads"]), ffn=int(r["ffn_hidden"]), vocab=int(r["vocab"]),
            tflops_per_gpu=float(r["model_tflops_per_gpu"]), recompute=recompute, overlap_grad_reduce=overlap,
            sequence_parallel=(r.get("sequence_parallel") or "").strip().lower() in ("true", "yes", "1"),
        )  # fmt: skip

    @property
    def device(self) -> str:
        for key, preset in DEVICES.items():
            if key in self.system:
                return preset
        raise ValueError(f"{self.model}: no device preset for system {self.system!r}")

    @property
    def microbatches(self) -> int:
        return self.global_batch // (self.dp * self.micro_batch)

    def published_step(self) -> float:
        """Seconds per step from the paper's FLOP count (eq. 3) and its achieved TFLOP/s per GPU."""
        B, s, L, h, V = self.global_batch, self.seq, self.layers, self.hidden, self.vocab
        flops = 96 * B * s * L * h * h * (1 + s / (6 * h) + V / (16 * L * h))
        return flops / (self.gpus * self.tflops_per_gpu * 1e12)


def overlaps_grad_reduce(source: str, *, pp: int) -> bool:
    """Whether the run of `source` all-reduced its gradients during the backward (module docstring)."""
    if NARAYANAN_2021 in source:
        return pp == 1  # --DDP-impl torch at pp 1, local (after the backward) above
    return True


def load_rows(pattern: str = "*.csv") -> list[Row]:
    rows = []
    for path in sorted(CALIBRATION.glob(pattern)):
        with path.open() as f:
            rows += [Row.parse(r) for r in csv.DictReader(f)]
    return rows


def build(row: Row) -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    cfg = GPTConfig(n_layer=row.layers, d_model=row.hidden, n_head=row.heads, d_ff=row.ffn, vocab_size=row.vocab,
                    n_ctx=row.seq, dropout=0.1, attention="math")  # fmt: skip
    with torch.device("meta"):
        model = GPT(cfg).to(torch.float16)
    return model, (torch.empty(row.global_batch, row.seq, dtype=torch.long, device="meta"),)


def check(row: Row, *, search: bool) -> dict:
    """Compile `row` with its published layout (and, with `search`, freely); the figures as a dict."""
    model, inputs = build(row)
    out: dict = {"model": row.model, "gpus": row.gpus, "layout": f"pp{row.pp} x tp{row.tp} x dp{row.dp}",
                 "vp": row.vp, "microbatches": row.microbatches, "published_s": row.published_step()}  # fmt: skip
    t0 = time.perf_counter()
    try:
        cm = partitioner.compile(
            model, row.gpus, inputs, device_type=row.device, pipeline=row.pp, tensor_parallel=row.tp,
            microbatches=row.microbatches, schedule="interleaved" if row.vp > 1 else "1f1b",
            stages_per_device=row.vp if row.vp > 1 else None, recompute=row.recompute, data_parallel="ddp",
            overlap_grad_reduce=row.overlap_grad_reduce, sequence_parallel=row.sequence_parallel,
            context_parallel=1,  # the published runs split no sequence
        )  # fmt: skip
        p = cm.plan.predicted
        out.update(predicted_s=p["step_time"], fits=True, peak=p["peak_memory"], bubble=p["bubble_fraction"],
                   dp_sync=p["data_parallel_sync"])  # fmt: skip
    except partitioner.InfeasibleMemoryError as e:
        out.update(predicted_s=None, fits=False, why=str(e)[:300])
    out["compile_s"] = time.perf_counter() - t0
    if search:
        t0 = time.perf_counter()
        try:
            cm = partitioner.compile(model, row.gpus, inputs, device_type=row.device, schedule="auto")
            plan = cm.plan
            modes = sorted({s.recompute for s in plan.stages})
            out.update(
                search_layout=f"pp{plan.pipeline_degree} x tp{plan.tensor_degree}"
                + (f" x cp{plan.context_degree}" if plan.context_degree > 1 else "")
                + f" x dp{plan.data_degree}",
                search_detail=f"{plan.schedule}, {plan.microbatches} mb, {plan.data_parallel or '-'}, "
                f"recompute {'/'.join(modes)}",
                search_s=plan.predicted["step_time"],
            )  # fmt: skip
        except ValueError as e:
            out.update(search_layout=None, search_why=str(e)[:300])
        out["search_compile_s"] = time.perf_counter() - t0
    return out


def _table(results: list[dict], search: bool) -> str:
    head = f"{'model':<12} {'GPUs':>5} {'layout':<20} {'published':>10} {'predicted':>10} {'ratio':>6} {'fits':>5}"
    if search:
        head += f"  {'search picks':<22} {'its step':>9} {'vs published layout':>20} {'search took':>12}"
    lines = [head, "-" * len(head)]
    for r in results:
        pred = r.get("predicted_s")
        ratio = f"{pred / r['published_s']:.2f}" if pred else "-"
        layout = r["layout"] + (f" v{r['vp']}" if r["vp"] > 1 else "")
        line = (
            f"{r['model']:<12} {r['gpus']:>5} {layout:<20} {format_seconds(r['published_s']):>10} "
            f"{format_seconds(pred) if pred else '-':>10} {ratio:>6} {'yes' if r['fits'] else 'NO':>5}"
        )
        if search:
            s = r.get("search_s")
            vs = f"{s / pred:.2f}x" if s and pred else "-"
            took = format_seconds(r["search_compile_s"]) if "search_compile_s" in r else "-"
            line += f"  {r.get('search_layout') or '-':<22} {format_seconds(s) if s else '-':>9} {vs:>20} {took:>12}"
        lines.append(line)
    errors = [abs(r["predicted_s"] / r["published_s"] - 1) for r in results if r.get("predicted_s")]
    if errors:
        lines.append(
            f"|predicted / published - 1|: median {statistics.median(errors):.1%}, worst {max(errors):.1%}; "
            f"{sum(r['fits'] for r in results)} of {len(results)} layouts fit the memory model"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", help="comma-separated model names to check (default: every row)")
    ap.add_argument("--search", action="store_true", help="also run the free search on each row's GPUs and batch")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON record (default bench/results)")
    ap.add_argument("--no-save", action="store_true", help="print only; write no JSON")
    args = ap.parse_args(argv)
    rows = load_rows()
    if args.rows:
        wanted = {w.strip() for w in args.rows.split(",")}
        rows = [r for r in rows if r.model in wanted]
        if not rows:
            ap.error(f"no calibration row named {sorted(wanted)}; rows: {[r.model for r in load_rows()]}")
    results = []
    for row in rows:
        r = check(row, search=args.search)
        results.append(r)
        pred = r.get("predicted_s")
        print(f"{row.model}: predicted {format_seconds(pred) if pred else 'does not fit'}, published "
              f"{format_seconds(r['published_s'])}, peak {format_bytes(r['peak']) if pred else '-'}, "
              f"compiled in {r['compile_s']:.1f} s", flush=True)  # fmt: skip
    print()
    print(_table(results, args.search))
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "published-megatron-2021.json"
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        path.write_text(json.dumps({"date": stamp, "rows": results}, indent=1, default=str))
        shown = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path  # --out: anywhere
        print(f"\nwrote {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
