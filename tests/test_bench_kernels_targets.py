"""bench/kernels.py's roofline targets (issue #21 item 6), judged without a GPU.

Rows are built as `measure()` builds them (`result_row`) from each Case's FLOP / byte formulas on meta tensors, with
chosen times: one that attains a target exactly and one just short of it. Nothing here needs CUDA or runs a kernel.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from bench import kernels as bk

H100 = "NVIDIA H100 80GB HBM3"
H200 = "NVIDIA H200"
META = torch.device("meta")


def _case(family: str, shape: str) -> bk.Case:
    (case,) = [c for c in bk.CASES[family] if c.shape == shape]
    return case


def _rows(case: bk.Case, dtype: str, mode: str, ms: dict[str, float]) -> list[dict]:
    """One row per implementation in `ms` (impl -> median ms), shaped like measure()'s."""
    x = case.make(META, bk.DTYPES[dtype])
    return [bk.result_row(case, x, dtype, mode, impl, t, 0.0) for impl, t in ms.items()]


def _judged(rows: list[dict], case: bk.Case, device: str) -> dict[str, dict]:
    """The judged targets of `rows`, keyed by Target.peak (one target of each kind per row here)."""
    judged = bk.evaluate_targets(rows, [case], device)
    by_peak = {j["peak"]: j for j in judged}
    assert len(by_peak) == len(judged)
    return by_peak


VQ_BIG = "M=65536 K=8192 D=256"


@pytest.mark.parametrize("device, preset", [(H100, "h100"), (H200, "h200")])
def test_vq_lookup_meets_60_percent_of_the_dense_bf16_peak_exactly_and_misses_just_below(device, preset):
    case = _case("vq", VQ_BIG)
    flops = 2 * 65536 * 8192 * 256  # 2*M*K*D, the formula the target states
    assert case.flops(case.make(META, torch.bfloat16), "fwd") == flops
    at_60 = flops / (0.6 * 989.4e12) * 1e3  # ms
    formula = f"attained = 2*M*K*D / t / 989.4e12 FLOP/s ({preset} dense bf16 peak)"

    met = _judged(_rows(case, "bf16", "fwd", {"triton": at_60, "eager": 5 * at_60}), case, device)
    assert met["flops"]["status"] == "met" and met["flops"]["measured"] == pytest.approx(0.6, rel=1e-12)
    assert met["flops"]["formula"] == formula and met["flops"]["target"] == ">= 60% of the dense bf16 peak"
    assert met["flops"]["note"].startswith("compute-bound: 3.82e+03 FLOP/B >= ridge")
    assert met["eager"]["status"] == "met" and met["eager"]["measured"] == pytest.approx(5.0)
    assert met["eager"]["formula"] == "speedup = t(eager) / t(triton), same shape, dtype and mode of this run"

    missed = _judged(_rows(case, "bf16", "fwd", {"triton": at_60 * 1.001, "eager": 4.99 * at_60}), case, device)
    assert missed["flops"]["status"] == "missed" and missed["flops"]["measured"] < 0.6
    assert missed["flops"]["formula"] == formula
    assert missed["eager"]["status"] == "missed" and missed["eager"]["measured"] < 5.0


def test_vq_targets_are_bf16_fp16_forward_only_and_na_where_the_roofline_puts_them_out_of_reach():
    case = _case("vq", VQ_BIG)
    assert not bk.evaluate_targets(_rows(case, "fp32", "fwd", {"triton": 1.0, "eager": 9.0}), [case], H100)
    assert not bk.evaluate_targets(_rows(case, "bf16", "fwd+bwd", {"triton": 1.0, "eager": 9.0}), [case], H100)
    assert {j["status"] for j in bk.evaluate_targets(_rows(case, "fp16", "fwd", {"triton": 1.0}), [case], H100)} == {
        "missed",  # 0.275 ms at peak: 27.8% of it in 1 ms
        "n/a",  # no eager row in this run
    }
    # MetaSlot's own shape: 0.3 us at the roofline, under 0.6 / 0.4 x the 5 us launch cost: no fraction judged
    small = _case("vq", "M=704 K=512 D=256")
    judged = _judged(_rows(small, "bf16", "fwd", {"triton": 1e-4, "eager": 1e-3}), small, H100)
    assert judged["flops"]["status"] == "n/a" and judged["flops"]["measured"] is None
    assert judged["flops"]["note"].startswith("latency-bound: roofline time 0.296 us < 0.6 / (1 - 0.6) x launch cost")
    assert judged["eager"]["status"] == "met"  # the speedup is judged at every shape
    assert all(not c.targets for c in bk.CASES["vq_st"])  # the issue states no target of its own


SLOT = "B=64 S=7 N=1024 D=256 Dv=256"


@pytest.mark.parametrize("mode, numerator", [("fwd", "(|q|+|k|+|v|+|U|)"), ("fwd+bwd", "3*(|q|+|k|+|v|+|U|)")])
def test_slot_attention_meets_70_percent_of_hbm_and_1_5x_compile_exactly_and_misses_just_below(mode, numerator):
    case = _case("slot_attention", SLOT)
    x = case.make(META, torch.bfloat16)
    qkvu = bk._nbytes(x["q"], x["k"], x["v"]) + 64 * 7 * 256 * 2  # |q|+|k|+|v|+|U|, U (B, S, Dv) in bf16
    nbytes = case.bytes(x, mode)
    assert nbytes == (qkvu if mode == "fwd" else 3 * qkvu)  # the Target's numerator is the Case's byte formula
    at_70 = nbytes / (0.7 * 4.8e12) * 1e3
    formula = f"attained = {numerator} / t / 4.8e12 B/s (h200 HBM bandwidth)"

    met = _judged(_rows(case, "bf16", mode, {"triton": at_70, "eager": at_70, "compile": 1.5 * at_70}), case, H200)
    assert met["hbm"]["status"] == "met" and met["hbm"]["measured"] == pytest.approx(0.7, rel=1e-12)
    assert met["hbm"]["formula"] == formula and met["hbm"]["note"].startswith("memory-bound: 6.95 FLOP/B < ridge 206")
    assert met["compile"]["status"] == "met" and met["compile"]["measured"] == pytest.approx(1.5)
    assert "eager" not in met  # the slot-attention speedup is over torch.compile of the reference

    ms = {"triton": at_70 * 1.001, "compile": 1.49 * at_70}
    missed = _judged(_rows(case, "bf16", mode, ms), case, H200)
    assert (missed["hbm"]["status"], missed["compile"]["status"]) == ("missed", "missed")


def test_a_fraction_of_a_peak_is_na_on_the_wrong_side_of_the_ridge_or_under_the_launch_cost():
    # A FLOP/s target on memory-bound slot attention is not judged: the roofline bounds it by HBM
    flop_target = bk.Target("toy", 0.6, "flops", "2*B*S*N*(D+Dv)")
    case = dataclasses.replace(_case("slot_attention", SLOT), targets=(flop_target,))
    (judged,) = bk.evaluate_targets(_rows(case, "bf16", "fwd", {"triton": 0.03}), [case], H100)
    assert judged["status"] == "n/a" and judged["note"].startswith("memory-bound: 6.95 FLOP/B < ridge 295")
    # The small slot shape: 5.2 us at an H100's roofline, under 0.7 / 0.3 x 5 us forward; 15.7 us with the backward
    small = _case("slot_attention", "B=64 S=11 N=256 D=256 Dv=256")
    fwd = _judged(_rows(small, "bf16", "fwd", {"triton": 0.01}), small, H100)
    assert fwd["hbm"]["status"] == "n/a" and fwd["hbm"]["note"].startswith("latency-bound: roofline time 5.22 us")
    bwd = _judged(_rows(small, "bf16", "fwd+bwd", {"triton": 0.05}), small, H100)  # 31% of HBM
    assert bwd["hbm"]["status"] == "missed" and bwd["compile"]["status"] == "n/a"  # no compile row in this run


def test_msglam_is_judged_on_its_speedup_over_eager_forward_backward_only():
    case = _case("msglam", "B=64 C=256 H=7 W=7")
    assert not bk.evaluate_targets(_rows(case, "bf16", "fwd", {"triton": 1.0, "eager": 3.0}), [case], H100)
    for dtype in ("bf16", "fp32"):
        (met,) = bk.evaluate_targets(_rows(case, dtype, "fwd+bwd", {"triton": 0.5, "eager": 1.0}), [case], H100)
        assert (met["status"], met["target"], met["measured"]) == ("met", ">= 2x eager", 2.0)
        (missed,) = bk.evaluate_targets(_rows(case, dtype, "fwd+bwd", {"triton": 0.5, "eager": 0.999}), [case], H100)
        assert missed["status"] == "missed"


def test_device_names_map_to_the_sxm_presets_only():
    assert bk.target_device("NVIDIA H100 80GB HBM3").name == "h100"
    assert bk.target_device("NVIDIA H200").name == "h200"
    others = ("NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA GH200 480GB", "NVIDIA A100-SXM4-80GB")
    for other in others:  # other clocks, power or memory than the SXM datasheets
        assert bk.target_device(other) is None, other


def test_an_unknown_device_judges_the_speedups_only():
    case = _case("vq", VQ_BIG)
    judged = _judged(_rows(case, "bf16", "fwd", {"triton": 1.0, "eager": 6.0}), case, "NVIDIA A100-SXM4-80GB")
    assert judged["flops"]["status"] == "n/a" and judged["flops"]["measured"] is None
    assert judged["flops"]["note"].startswith("no target peak is known for NVIDIA A100-SXM4-80GB")
    assert judged["flops"]["formula"] == "attained = 2*M*K*D / t / (dense bf16 peak: unknown)"
    assert judged["eager"]["status"] == "met"


def test_write_results_reports_the_targets_in_markdown_and_json(tmp_path):
    slot, vq = _case("slot_attention", SLOT), _case("vq", VQ_BIG)
    rows = _rows(slot, "bf16", "fwd", {"triton": 0.03, "eager": 0.04, "compile": 0.05})
    rows += _rows(vq, "bf16", "fwd", {"triton": 0.4, "eager": 2.5, "compile": 1.5})
    md = bk.write_results(rows, [slot, vq], H100, tmp_path)
    text = md.read_text()
    section = text[text.index("## Targets (roofline)") :]
    assert "Peaks of the `h100` preset" in section and "bf16 989.4e12" in section and "HBM 3.35e12 B/s" in section
    # a formula's |q| is escaped so that it stays in its table cell
    assert r"attained = (\|q\|+\|k\|+\|v\|+\|U\|) / t / 3.35e12 B/s (h100 HBM bandwidth)" in section
    assert "| vq | M=65536 K=8192 D=256 | bf16 | fwd | >= 60% of the dense bf16 peak | 69.5% | met |" in section
    assert "| vq | M=65536 K=8192 D=256 | bf16 | fwd | >= 5x eager | 6.25x | met |" in section
    assert "| >= 1.5x compile | 1.67x | met |" in section and "| >= 70% of HBM bandwidth | 67.2% | missed |" in section

    data = json.loads(md.with_suffix(".json").read_text())
    assert data["target_peaks"] == "h100"
    assert [(j["kernel"], j["peak"], j["status"]) for j in data["targets"]] == [
        ("slot_attention", "hbm", "missed"),
        ("slot_attention", "compile", "met"),
        ("vq", "flops", "met"),
        ("vq", "eager", "met"),
    ]
    assert data["targets"][0]["formula"] == "attained = (|q|+|k|+|v|+|U|) / t / 3.35e12 B/s (h100 HBM bandwidth)"
    assert data["rows"][0]["flops"] == slot.flops(slot.make(META, torch.bfloat16), "fwd")

    unknown = bk.write_results(rows, [slot, vq], "Tesla T4", tmp_path / "t4").read_text()
    assert "No target peak is known for Tesla T4" in unknown and "| >= 5x eager | 6.25x | met |" in unknown


def test_the_module_docstring_states_every_target():
    doc = " ".join(bk.__doc__.split())
    for stated in (">= 60% of the dense tensor-core peak", ">= 5x eager", ">= 70% of HBM bandwidth",
                   ">= 1.5x torch.compile of the reference", ">= 2x eager"):  # fmt: skip
        assert stated in doc, stated
    thresholds = {(t.peak, t.threshold) for family in bk.CASES.values() for c in family for t in c.targets}
    assert thresholds == {("flops", 0.6), ("eager", 5.0), ("hbm", 0.7), ("compile", 1.5), ("eager", 2.0)}


def test_a_target_refuses_a_fraction_outside_0_1_or_without_its_formula():
    with pytest.raises(ValueError, match="0 < threshold < 1"):
        bk.Target("x", 60, "flops", "2*M*K*D")
    with pytest.raises(ValueError, match="a formula"):
        bk.Target("x", 0.6, "hbm")
    with pytest.raises(ValueError, match="positive"):
        bk.Target("x", 0, "eager")
