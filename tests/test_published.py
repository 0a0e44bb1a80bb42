"""bench/published.py: the calibration rows load, their published step follows the paper's formula, and the
smallest row's forced layout fits our memory model and is predicted near its measured step."""

from __future__ import annotations

import pytest

from bench.published import CALIBRATION, check, load_rows

pytestmark = pytest.mark.skipif(not CALIBRATION.exists(), reason="../shared/calibration is not in this checkout")


def test_rows_load_with_consistent_layouts() -> None:
    rows = load_rows()
    assert len(rows) >= 10
    for r in rows:
        assert r.tp * r.pp * r.dp == r.gpus, r.model
        assert r.global_batch % (r.dp * r.micro_batch) == 0, r.model
        assert r.recompute in ("none", "selective", "full"), r.model


def test_published_step_is_the_paper_s_flops_over_its_throughput() -> None:
    # GPT 1.7B: 96 B s l h^2 (1 + s/6h + V/16lh) = 1.547e16 FLOPs per iteration at 137 TFLOP/s on each of 32 GPUs.
    row = next(r for r in load_rows() if r.model == "GPT 1.7B")
    assert row.published_step() == pytest.approx(1.5466e16 / (32 * 137e12), rel=1e-3)


def test_the_smallest_published_layout_fits_and_is_predicted_within_20_percent() -> None:
    row = next(r for r in load_rows() if r.model == "GPT 1.7B")
    result = check(row, search=False)
    assert result["fits"], result
    assert result["predicted_s"] / result["published_s"] == pytest.approx(1.0, abs=0.2)


def test_megatron_2021_rows_reduce_gradients_as_the_authors_scripts_did_unless_a_row_says_otherwise() -> None:
    import csv

    from bench.published import Row

    with next(CALIBRATION.glob("megatron_2021*.csv")).open() as f:
        raw = list(csv.DictReader(f))
    # examples/sc21/run_table_1.sh: torch's DDP (overlapped) without a pipeline, Megatron's local DDP (after) with one
    assert [Row.parse(r).overlap_grad_reduce for r in raw] == [int(r["pp"]) == 1 for r in raw]
    piped = next(r for r in raw if int(r["pp"]) > 1)
    assert Row.parse({**piped, "overlap_grad_reduce": "true"}).overlap_grad_reduce is True
    assert Row.parse({**piped, "source_url": "https://example.org/another-run"}).overlap_grad_reduce is True
