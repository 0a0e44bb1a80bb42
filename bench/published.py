"""Our predictions against published, measured training runs: the calibration check of the cost model.

    python bench/published.py                       # every row of bench/calibration/ and ../shared/calibration/
    python bench/published.py --table korthikanti_2022_table5
    python bench/published.py --rows "GPT 1.7B" --search

Tables (one CSV each; a row's columns as ../shared/calibration/megatron_2021_table1.csv's):
- megatron_2021_table1 (../shared/calibration): Narayanan et al. 2021, Table 1: ten GPTs, 1.7B on 32 A100s to 1T on
  3,072, full recompute, achieved TFLOP/s per GPU.
- korthikanti_2022_table5 (bench/calibration): Korthikanti et al. 2022, Tables 3 and 5: GPTs of 22B on 8 A100s to 1T
  on 512, each measured twice, with full recompute and with sequence parallelism + selective recompute (the
  paper's "present work"), as seconds per iteration (column `step_seconds`).
- llama3_2024_table4 (bench/calibration): the Llama 3 paper, Table 4: Llama 3 405B (zoo.llama, bf16) on 8,192 and
  16,384 H100s at its published degrees and microbatches, its schedule, recompute and sequence parallelism "searched"
  (not published), TFLOP/s counted as PaLM's model FLOPs (column `flops`).
- torchtitan_2024_fsdp (bench/calibration): torchtitan's docs/performance.md (2024): Llama 2 13B and 70B and Llama 3
  70B trained with FSDP2 alone (ZeRO-3) on 64 A100s, a rank's tokens per second turned into seconds per step. Only
  the rows whose recompute is one of ours (none, full); its "selective op" and "selective layer" checkpointing are
  other policies than Korthikanti et al.'s attention-core recompute.

For each row: the GPT is built on the meta device as its paper ran it (layers, hidden, heads, FFN width, vocabulary,
sequence; fp16 weights; attention written out with the s x s probabilities materialized and dropout 0.1, as
Megatron-LM's 2021 code), compiled with the published layout forced (pipeline, tensor, interleaved stages,
microbatches = global batch / (dp x micro batch), the row's recompute, DDP replicas reducing their gradients as the
run's software did), and priced on the row's device. Printed: predicted and published seconds per step, their
ratio, whether the memory model fits the layout in the device's memory, and (--search) the layout the free search
picks for the same devices and batch, with its predicted step.

Published step time: a row's `step_seconds` where the paper gives seconds per iteration; else the paper's FLOPs per
iteration over the achieved FLOP/s of all GPUs,
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

Context parallelism: a row's optional `cp` column (the degree; empty or absent: 1, as none of the runs above split a
sequence). The data degree `dp` may be left empty: it is then the GPUs over tp x pp x cp. A degree or batch that
does not add up (tp x pp x cp x dp other than the GPUs, a global batch the replicas' micro batches do not divide)
is refused naming the row. Empty, "n/a" or "-" in `vp` is one stage per rank.

Optimizer state: every run kept fp32 master weights and Adam moments beside its 16-bit ones (Megatron-LM's
mixed-precision optimizer; torchtitan's FSDP2 holds fp32 parameters and casts them to bf16 for compute): 16 bytes
per parameter, so each compile passes `master_weights=True`.

Precision: BF16 or FP16 (the `precision` column). A row trained in FP8 (Transformer Engine, NeMo's H100 tables) is
refused with a note, not priced as 16-bit: the cost model has no FP8 GEMMs.

Other tables: `--csv PATH` checks any CSV of these columns (repeatable), its record named after the file's stem.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, bench/ is sys.path[0], where bench/kernels.py would shadow any top-level `kernels` (Hugging
# Face's, which transformers imports): import from the repo root (run from a checkout without installing).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import partitioner  # noqa: E402
from partitioner.units import format_bytes, format_seconds  # noqa: E402
from zoo.gpt3 import GPT, GPTConfig  # noqa: E402
from zoo.gpt3 import param_count as gpt_param_count  # noqa: E402
from zoo.llama import Llama, LlamaConfig  # noqa: E402
from zoo.llama import param_count as llama_param_count  # noqa: E402

CALIBRATION = ROOT.parent / "shared" / "calibration"  # the team's tables (not in a bare clone)
OURS = ROOT / "bench" / "calibration"  # tables transcribed here, each row citing its source
RESULTS = ROOT / "bench" / "results"
DEVICES = {"A100": "a100", "H100": "h100", "H200": "h200"}
NARAYANAN_2021 = "arxiv.org/abs/2104.04473"
SEARCHED = "searched"  # a choice the paper does not publish: compile searches it at the row's published degrees


@dataclass(frozen=True)
class Row:
    """One published run (a CSV row of a calibration table)."""

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
    sequence_parallel: bool | None = False  # None: not published, the search decides
    step_seconds: float | None = None  # the paper's measured seconds per iteration, where it gives them
    table: str = ""  # the CSV's stem
    arch: str = "gpt"  # "gpt": zoo.gpt3's GPT written as Megatron-LM 2021; "llama": zoo.llama (GQA, SwiGLU, RMSNorm)
    kv_heads: int | None = None  # grouped-query attention's kv heads (llama); None: one per head
    bf16: bool = False  # the precision column says BF16 (else fp16)
    data_parallel: str = "ddp"  # how the run's replicas held their state (ddp / zero1 / zero2 / fsdp)
    schedule: str | None = None  # the pipeline schedule; None: interleaved where vp > 1, else 1f1b
    flops: str = "narayanan2021"  # how the paper counted FLOPs: "narayanan2021" (its eq. 3) or "palm" (below)
    cp: int = 1  # context parallelism: each sequence split over cp ranks
    fp8: bool = False  # the precision column says FP8: refused (module docstring)

    @classmethod
    def parse(cls, r: dict[str, str], table: str = "") -> Row:
        recompute = r["act_recompute"].split()[0].lower() if r.get("act_recompute") else "none"
        if r.get("overlap_grad_reduce"):
            overlap = r["overlap_grad_reduce"].strip().lower() in ("true", "yes", "1")
        else:
            overlap = overlaps_grad_reduce(r.get("source_url", ""), pp=int(r["pp"]))
        model, gpus, tp, pp, cp = r["model"], int(r["num_gpus"]), int(r["tp"]), int(r["pp"]), _degree(r.get("cp"))
        dp = _degree(r.get("dp"), gpus // (tp * pp * cp) if gpus % (tp * pp * cp) == 0 else 0)
        if tp * pp * cp * dp != gpus:
            raise ValueError(f"{model}: tp {tp} x pp {pp} x cp {cp} x dp {dp or '?'} is not its {gpus} GPUs")
        gbs, mbs = int(r["gbs"]), int(r["mbs"])
        if gbs % (dp * mbs):
            raise ValueError(f"{model}: a global batch of {gbs} does not split into micro batches of {mbs} on {dp} "
                             "replicas")  # fmt: skip
        return cls(
            model=model, system=r["system"], gpus=gpus, global_batch=gbs,
            micro_batch=mbs, seq=int(r["seq_len"]), tp=tp, pp=pp, cp=cp,
            vp=_degree(r.get("vp")), dp=dp, layers=int(r["layers"]), hidden=int(r["hidden"]),
            heads=int(r["heads"]), ffn=int(r["ffn_hidden"]), vocab=int(r["vocab"]),
            tflops_per_gpu=float(r.get("model_tflops_per_gpu") or "nan"), recompute=recompute,
            overlap_grad_reduce=overlap,
            sequence_parallel=_flag(r.get("sequence_parallel")),
            step_seconds=float(r["step_seconds"]) if r.get("step_seconds") else None, table=table,
            arch=r.get("arch") or "gpt", kv_heads=int(r["kv_heads"]) if r.get("kv_heads") else None,
            bf16="BF16" in (r.get("precision") or "").upper(), fp8="FP8" in (r.get("precision") or "").upper(),
            data_parallel=r.get("data_parallel") or "ddp",
            schedule=r.get("schedule") or None, flops=r.get("flops") or "narayanan2021",
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
        """Seconds per step: the paper's measured seconds per iteration where the row has them, else the paper's
        FLOPs per iteration over the row's achieved TFLOP/s per GPU x GPUs. FLOPs: Narayanan et al.'s eq. 3
        (`flops` "narayanan2021", which counts the recomputed forward), or PaLM's model FLOPs (Chowdhery et al.
        2022, appendix B: 6 N + 12 L h s per token, N every parameter, attention counted whole; "palm")."""
        if self.step_seconds is not None:
            return self.step_seconds
        if math.isnan(self.tflops_per_gpu):  # neither column
            raise ValueError(f"{self.model}: the row has neither step_seconds nor model_tflops_per_gpu")
        B, s, L, h, V = self.global_batch, self.seq, self.layers, self.hidden, self.vocab
        if self.flops == "palm":
            flops = B * s * (6 * self.parameters() + 12 * L * h * s)
        elif self.flops == "narayanan2021":
            flops = 96 * B * s * L * h * h * (1 + s / (6 * h) + V / (16 * L * h))
        else:
            raise ValueError(f"{self.model}: flops={self.flops!r}: 'narayanan2021' or 'palm'")
        return flops / (self.gpus * self.tflops_per_gpu * 1e12)

    def parameters(self) -> int:
        """The built model's parameter count (closed form)."""
        if self.arch == "llama":
            return llama_param_count(self.llama_config())
        return gpt_param_count(self.gpt_config())

    def gpt_config(self) -> GPTConfig:
        return GPTConfig(n_layer=self.layers, d_model=self.hidden, n_head=self.heads, d_ff=self.ffn,
                         vocab_size=self.vocab, n_ctx=self.seq, dropout=0.1, attention="math")  # fmt: skip

    def llama_config(self) -> LlamaConfig:
        # Llama 3's rotary base; the base changes no shape and no cost
        return LlamaConfig(n_layer=self.layers, d_model=self.hidden, n_head=self.heads, n_kv_head=self.kv_heads,
                           d_ff=self.ffn, vocab_size=self.vocab, n_ctx=self.seq, rope_theta=500000.0)  # fmt: skip


def _degree(value: str | None, default: int = 1) -> int:
    """A parallel degree's column: a positive integer; empty, absent, "n/a" or "-" is `default`."""
    value = (value or "").strip().lower()
    return default if value in ("", "n/a", "na", "-", "none") else int(value)


def _flag(value: str | None) -> bool | None:
    """A true / false column; "searched" (not published: the search decides) is None, empty is false."""
    value = (value or "").strip().lower()
    return None if value == SEARCHED else value in ("true", "yes", "1")


def overlaps_grad_reduce(source: str, *, pp: int) -> bool:
    """Whether the run of `source` all-reduced its gradients during the backward (module docstring)."""
    if NARAYANAN_2021 in source:
        return pp == 1  # --DDP-impl torch at pp 1, local (after the backward) above
    return True


def load_rows(pattern: str = "*.csv") -> list[Row]:
    """Every row of the calibration tables matching `pattern`: ours (bench/calibration), then the team's."""
    return [row for folder in (OURS, CALIBRATION) for path in sorted(folder.glob(pattern)) for row in read_table(path)]


def read_table(path: Path) -> list[Row]:
    """The rows of one calibration CSV (columns as the module docstring says), its stem their table."""
    with path.open() as f:
        return [Row.parse(r, table=path.stem) for r in csv.DictReader(f)]


def build(row: Row) -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """The row's model on meta in its precision, and its batch of token ids."""
    with torch.device("meta"):
        model = Llama(row.llama_config()) if row.arch == "llama" else GPT(row.gpt_config())
    model = model.to(torch.bfloat16 if row.bf16 else torch.float16)
    return model, (torch.empty(row.global_batch, row.seq, dtype=torch.long, device="meta"),)


def _virtual(plan: partitioner.Plan) -> str:
    """ " v8" for a plan running 8 stages per pipeline rank, "" for one."""
    per_rank = plan.num_stages // plan.pipeline_degree
    return f" v{per_rank}" if per_rank > 1 else ""


def check(row: Row, *, search: bool) -> dict:
    """Compile `row` with its published layout (and, with `search`, freely); the figures as a dict."""
    model, inputs = build(row)
    tp = f"tp{row.tp}" + {True: "+sp", False: "", None: "(+sp?)"}[row.sequence_parallel]
    cp = f" x cp{row.cp}" if row.cp > 1 else ""
    searched = row.schedule == "auto" or row.sequence_parallel is None or row.recompute == SEARCHED
    out: dict = {"table": row.table, "model": row.model, "gpus": row.gpus,
                 "layout": f"pp{row.pp} x {tp}{cp} x dp{row.dp}",
                 "searched_choices": searched,
                 "vp": row.vp, "recompute": row.recompute, "microbatches": row.microbatches,
                 "published_s": row.published_step()}  # fmt: skip
    if row.fp8:
        # Pricing FP8 GEMMs as 16-bit ones would be off by up to 2x: refused, not guessed.
        out.update(predicted_s=None, fits=None, compile_s=0.0,
                   why="not checked: trained in FP8, and the cost model prices 16-bit GEMMs only")  # fmt: skip
        return out
    t0 = time.perf_counter()
    try:
        cm = partitioner.compile(
            model, row.gpus, inputs, device_type=row.device, pipeline=row.pp, tensor_parallel=row.tp,
            microbatches=row.microbatches, schedule=row.schedule or ("interleaved" if row.vp > 1 else "1f1b"),
            stages_per_device=row.vp if row.vp > 1 else None,
            recompute=None if row.recompute == SEARCHED else row.recompute,
            data_parallel=row.data_parallel,
            overlap_grad_reduce=row.overlap_grad_reduce, sequence_parallel=row.sequence_parallel,
            context_parallel=row.cp, master_weights=True,
        )  # fmt: skip
        plan = cm.plan
        p = plan.predicted
        modes = "/".join(dict.fromkeys(s.recompute for s in plan.stages))
        ran = plan.schedule + _virtual(plan) + (" +sp" if plan.tensor.get("sequence_parallel") else "")
        out.update(predicted_s=p["step_time"], fits=True, peak=p["peak_memory"], bubble=p["bubble_fraction"],
                   dp_sync=p["data_parallel_sync"], ran=f"{ran}, recompute {modes}")  # fmt: skip
    except partitioner.InfeasibleMemoryError as e:
        out.update(predicted_s=None, fits=False, why=str(e)[:300])
    out["compile_s"] = time.perf_counter() - t0
    if search:
        t0 = time.perf_counter()
        try:
            cm = partitioner.compile(model, row.gpus, inputs, device_type=row.device, schedule="auto",
                                     master_weights=True)  # fmt: skip
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
    head = (f"{'model':<20} {'GPUs':>5} {'layout':<26} {'recompute':<9} {'published':>10} {'predicted':>10} "
            f"{'ratio':>6} {'fits':>5}")  # fmt: skip
    if search:
        head += f"  {'search picks':<22} {'its step':>9} {'vs published layout':>20} {'search took':>12}"
    lines = [head, "-" * len(head)]
    for r in results:
        pred = r.get("predicted_s")
        ratio = f"{pred / r['published_s']:.2f}" if pred else "-"
        layout = r["layout"] + (f" v{r['vp']}" if r["vp"] > 1 else "")
        line = (
            f"{r['model']:<20} {r['gpus']:>5} {layout:<26} {r['recompute']:<9} {format_seconds(r['published_s']):>10} "
            f"{format_seconds(pred) if pred else '-':>10} {ratio:>6} {_fits(r['fits']):>5}"
        )
        if search:
            s = r.get("search_s")
            vs = f"{s / pred:.2f}x" if s and pred else "-"
            took = format_seconds(r["search_compile_s"]) if "search_compile_s" in r else "-"
            line += f"  {r.get('search_layout') or '-':<22} {format_seconds(s) if s else '-':>9} {vs:>20} {took:>12}"
        lines.append(line)
        if r["fits"] is None:
            lines.append(f"{'':<20} {'':>5} {r['why']}")
        if r.get("ran") and r.get("searched_choices"):
            lines.append(f"{'':<20} {'':>5} priced as: {r['ran']}")
    tables = list(dict.fromkeys(r["table"] for r in results))
    for table in [*tables, None] if len(tables) > 1 else tables:
        mine = [r for r in results if table is None or r["table"] == table]
        errors = [abs(r["predicted_s"] / r["published_s"] - 1) for r in mine if r.get("predicted_s")]
        if errors:
            lines.append(
                f"{table or 'all tables'}: |predicted / published - 1| median {statistics.median(errors):.1%}, "
                f"worst {max(errors):.1%}; {sum(r['fits'] is True for r in mine)} of "
                f"{sum(r['fits'] is not None for r in mine)} layouts fit the memory model"
            )
    return "\n".join(lines)


def _fits(fits: bool | None) -> str:
    return "-" if fits is None else "yes" if fits else "NO"


def record_name(table: str) -> str:
    """The JSON record of a table's rows in bench/results: megatron_2021_table1 -> published-megatron-2021.json."""
    return "published-" + re.sub(r"_table\d+$", "", table).replace("_", "-") + ".json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", help="comma-separated model names to check (default: every row)")
    ap.add_argument("--table", help="check one table's rows (a CSV's stem, e.g. korthikanti_2022_table5)")
    ap.add_argument("--csv", type=Path, action="append", default=[],
                    help="check the rows of this CSV (any path; columns as the tables'; repeatable)")  # fmt: skip
    ap.add_argument("--search", action="store_true", help="also run the free search on each row's GPUs and batch")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON record (default bench/results)")
    ap.add_argument("--no-save", action="store_true", help="print only; write no JSON")
    args = ap.parse_args(argv)
    if args.csv:
        rows = [row for path in args.csv for row in read_table(path)]
    else:
        rows = load_rows(f"{args.table}.csv" if args.table else "*.csv")
    if not rows:
        ap.error(f"no calibration table {args.table!r}; tables: {sorted({r.table for r in load_rows()})}")
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
        verdict = format_seconds(pred) if pred else "not checked" if r["fits"] is None else "does not fit"
        print(f"{row.model}: predicted {verdict}, published "
              f"{format_seconds(r['published_s'])}, peak {format_bytes(r['peak']) if pred else '-'}, "
              f"compiled in {r['compile_s']:.1f} s", flush=True)  # fmt: skip
    print()
    print(_table(results, args.search))
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        print()
        for table in dict.fromkeys(r["table"] for r in results):
            path = args.out / record_name(table)
            mine = [r for r in results if r["table"] == table]
            path.write_text(json.dumps({"date": stamp, "table": table, "rows": mine}, indent=1, default=str))
            shown = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path  # --out: any
            print(f"wrote {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
