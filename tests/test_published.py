"""bench/published.py: the calibration rows load, their published step follows the paper's formula (or its measured
seconds), the transcribed rows agree with the paper's own utilization figures, and the smallest rows' forced layouts
fit our memory model and are predicted near their measured steps."""

from __future__ import annotations

import csv

import pytest
import torch

from bench.published import CALIBRATION, OURS, Row, build, check, load_rows, record_name

shared = pytest.mark.skipif(not CALIBRATION.exists(), reason="../shared/calibration is not in this checkout")


def _korthikanti() -> list[dict[str, str]]:
    with (OURS / "korthikanti_2022_table5.csv").open() as f:
        return list(csv.DictReader(f))


def _assert_layouts_consistent(rows: list[Row]) -> None:
    for r in rows:
        assert r.tp * r.pp * r.dp == r.gpus, r.model
        assert r.global_batch % (r.dp * r.micro_batch) == 0, r.model


def test_our_tables_load_with_consistent_layouts_each_row_citing_its_source() -> None:
    rows = [r for r in load_rows() if r.table == "korthikanti_2022_table5"]
    assert len(rows) == 8
    _assert_layouts_consistent(rows)
    for r in rows:
        assert r.layers % (r.pp * r.vp) == 0 or r.vp == 1, r.model
        assert r.published_step() == r.step_seconds, r.model
    assert all("arxiv.org/abs/2205.05198" in raw["source_url"] for raw in _korthikanti())
    assert record_name("korthikanti_2022_table5") == "published-korthikanti-2022.json"
    assert record_name("megatron_2021_table1") == "published-megatron-2021.json"


def test_korthikanti_seconds_per_iteration_reproduce_the_paper_s_model_flops_utilization() -> None:
    # Two tables of the paper transcribed apart (Table 5's seconds, its MFU column): the paper's model FLOPs per
    # iteration, 72 B L s h^2 (1 + s/6h + V/12hL), over seconds x GPUs x 312 TFLOP/s must give its MFU, within
    # the rounding of both figures.
    checked = 0
    for raw in _korthikanti():
        if not raw["mfu_pct"]:
            continue
        r = Row.parse(raw)
        B, L, s, h, V = r.global_batch, r.layers, r.seq, r.hidden, r.vocab
        flops = 72 * B * L * s * h * h * (1 + s / (6 * h) + V / (12 * h * L))
        mfu = [100 * flops / ((r.step_seconds + d) * r.gpus * 312e12) for d in (0.005, -0.005)]  # 2 decimals
        assert mfu[0] - 0.05 <= float(raw["mfu_pct"]) <= mfu[1] + 0.05, (r.model, mfu)  # MFU to 1 decimal
        checked += 1
    assert checked == 4


@pytest.mark.parametrize("model", ["GPT 22B full", "GPT 22B sel+SP"])
def test_the_smallest_korthikanti_layouts_fit_and_are_predicted_within_10_percent(model: str) -> None:
    row = next(r for r in load_rows() if r.model == model)
    result = check(row, search=False)
    assert result["fits"], result
    assert result["predicted_s"] / result["published_s"] == pytest.approx(1.0, abs=0.1)


@shared
def test_rows_load_with_consistent_layouts() -> None:
    rows = [r for r in load_rows() if r.table == "megatron_2021_table1"]
    assert len(rows) == 10
    _assert_layouts_consistent(rows)
    for r in rows:
        assert r.recompute in ("none", "selective", "full"), r.model


@shared
def test_published_step_is_the_paper_s_flops_over_its_throughput() -> None:
    # GPT 1.7B: 96 B s l h^2 (1 + s/6h + V/16lh) = 1.547e16 FLOPs per iteration at 137 TFLOP/s on each of 32 GPUs.
    row = next(r for r in load_rows() if r.model == "GPT 1.7B")
    assert row.published_step() == pytest.approx(1.5466e16 / (32 * 137e12), rel=1e-3)


@shared
def test_the_smallest_published_layout_fits_and_is_predicted_within_20_percent() -> None:
    row = next(r for r in load_rows() if r.model == "GPT 1.7B")
    result = check(row, search=False)
    assert result["fits"], result
    assert result["predicted_s"] / result["published_s"] == pytest.approx(1.0, abs=0.2)


@shared
def test_megatron_2021_rows_reduce_gradients_as_the_authors_scripts_did_unless_a_row_says_otherwise() -> None:
    with next(CALIBRATION.glob("megatron_2021*.csv")).open() as f:
        raw = list(csv.DictReader(f))
    # examples/sc21/run_table_1.sh: torch's DDP (overlapped) without a pipeline, Megatron's local DDP (after) with one
    assert [Row.parse(r).overlap_grad_reduce for r in raw] == [int(r["pp"]) == 1 for r in raw]
    piped = next(r for r in raw if int(r["pp"]) > 1)
    assert Row.parse({**piped, "overlap_grad_reduce": "true"}).overlap_grad_reduce is True
    assert Row.parse({**piped, "source_url": "https://example.org/another-run"}).overlap_grad_reduce is True


def test_llama3_rows_count_palm_s_model_flops_and_build_the_published_405b() -> None:
    rows = [r for r in load_rows() if r.table == "llama3_2024_table4"]
    assert [r.gpus for r in rows] == [8192, 16384]
    _assert_layouts_consistent(rows)
    assert all(r.arch == "llama" and r.bf16 for r in rows)
    # 2,048 sequences of 8,192 tokens x (6 N + 12 L h s) per token over 8,192 GPUs x 430 TFLOP/s (by hand: N is
    # Llama 3 405B's 405,853,388,800 parameters)
    tokens = 2048 * 8192
    per_token = 6 * 405_853_388_800 + 12 * 126 * 16384 * 8192
    assert rows[0].published_step() == pytest.approx(tokens * per_token / (8192 * 430e12), rel=1e-9)
    assert rows[0].published_step() == pytest.approx(12.5645, abs=1e-4)
    model, (ids,) = build(rows[0])
    assert sum(p.numel() for p in model.parameters()) == 405_853_388_800
    assert next(model.parameters()).dtype == torch.bfloat16 and ids.shape == (2048, 8192)
    assert rows[0].microbatches == 32 and rows[1].microbatches == 16


def test_torchtitan_rows_reproduce_their_mfu_from_their_tokens_per_second() -> None:
    # The rows hold seconds per step derived from torchtitan's tokens per second per GPU (a rank's local batch over
    # the step); their MFU column, transcribed apart, must follow from those tokens per second and the built model:
    # tokens/s x (6 N + 12 L h s) / 312 TFLOP/s (A100 bf16), N every parameter.
    rows = [r for r in load_rows() if r.table == "torchtitan_2024_fsdp"]
    assert len(rows) == 3
    _assert_layouts_consistent(rows)
    with (OURS / "torchtitan_2024_fsdp.csv").open() as f:
        mfu = {raw["model"]: float(raw["mfu_pct"]) for raw in csv.DictReader(f)}
    for r in rows:
        assert r.data_parallel == "fsdp" and r.arch == "llama" and r.bf16 and r.microbatches == 1, r.model
        tokens_per_s = r.micro_batch * r.seq / r.published_step()
        per_token = 6 * r.parameters() + 12 * r.layers * r.hidden * r.seq
        assert 100 * tokens_per_s * per_token / 312e12 == pytest.approx(mfu[r.model], abs=0.06), r.model


def test_the_smallest_torchtitan_fsdp_row_fits_and_is_predicted_within_10_percent() -> None:
    row = next(r for r in load_rows() if r.model == "Llama 2 13B FSDP")
    result = check(row, search=False)
    assert result["fits"] and result["ran"].startswith("1f1b"), result
    assert result["predicted_s"] / result["published_s"] == pytest.approx(1.0, abs=0.1)


def _write_table(path, rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


_TINY_LLAMA = {
    "model": "tiny llama", "system": "DGX-H100", "precision": "BF16", "num_gpus": "16", "gbs": "32", "mbs": "1",
    "seq_len": "1024", "tp": "1", "pp": "2", "cp": "2", "vp": "n/a", "dp": "", "layers": "4", "hidden": "512",
    "heads": "8", "kv_heads": "2", "ffn_hidden": "1536", "vocab": "1024", "model_tflops_per_gpu": "100",
    "act_recompute": "none", "arch": "llama", "flops": "palm", "source_url": "https://example.org/a-run",
}  # fmt: skip


def test_a_table_of_other_columns_is_read_from_any_path_with_context_parallelism_and_derived_data_degree(
    tmp_path, capsys: pytest.CaptureFixture
) -> None:
    """--csv reads any table; a `cp` column is forced as the context degree, an empty `dp` is the GPUs over
    tp x pp x cp, "n/a" in `vp` is one stage per rank; an FP8 row is refused with a note, not priced as 16-bit."""
    from bench.published import main, read_table

    path = tmp_path / "other_runs.csv"
    _write_table(path, [_TINY_LLAMA, {**_TINY_LLAMA, "model": "tiny fp8", "precision": "FP8-CS"}])
    row, fp8 = read_table(path)
    assert (row.cp, row.dp, row.vp, row.microbatches, row.table) == (2, 4, 1, 8, "other_runs")
    result = check(row, search=False)
    assert result["fits"] and result["layout"] == "pp2 x tp1 x cp2 x dp4"
    assert result["predicted_s"] > 0
    skipped = check(fp8, search=False)
    assert skipped["fits"] is None and skipped["predicted_s"] is None and "FP8" in skipped["why"]
    assert main(["--csv", str(path), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tiny fp8: predicted not checked" in out and "1 of 1 layouts fit" in out
    assert (tmp_path / "published-other-runs.json").exists()


@pytest.mark.parametrize("change, message", [
    ({"dp": "3"}, "tp 1 x pp 2 x cp 2 x dp 3 is not its 16 GPUs"),
    ({"cp": "3"}, "tp 1 x pp 2 x cp 3 x dp ? is not its 16 GPUs"),
    ({"gbs": "30"}, "a global batch of 30 does not split into micro batches of 1 on 4 replicas"),
])  # fmt: skip
def test_a_row_whose_degrees_or_batch_do_not_add_up_is_refused_naming_it(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match="tiny llama: " + message.replace("?", r"\?")):
        Row.parse({**_TINY_LLAMA, **change})
