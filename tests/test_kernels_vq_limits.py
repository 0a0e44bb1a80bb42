"""kernels/vq.py's autotune pruning against what the sm_90 (H100) compile reports (issue #21 item 2).

The pruning computes shared memory from the tile shapes, element sizes and num_stages (``_smem_fwd``, ``_smem_dz``,
``_smem_dc``) and drops configs whose registers spill: a coarse model of the live fp32 tiles (``_tile_words``) and,
at the benchmarks' BLOCK_D = 256, the configs ptxas spilled by name (``_SPILLED``). The model must never
under-estimate shared memory: checked here against numbers bench/kernels_sm90.py recorded (a fast table check) and
against a live compile of two configs through the harness (its own process, a few seconds each).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import partitioner.kernels.vq as vq

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
H100_SMEM_BYTES = 232448  # 227 KiB per block, as bench/kernels_sm90.py

# (kernel, config, dtype, shared memory bytes, registers, spilled bytes (stores)) as bench/kernels_sm90.py compiled
# them (triton 3.9.0, ptxas 13.4, sm_90a) at the benchmark shapes (BLOCK_D = 256): per kernel and input, the kept
# configs with the least and the most shared memory, and configs that spilled (what _SPILLED must name).
RECORDED: list[tuple[str, str, str, int, int, int]] = [
    ("vq_fwd", "BLOCK_M=32 BLOCK_K=32 w4 s2", "bf16", 33280, 64, 0),
    ("vq_fwd", "BLOCK_M=64 BLOCK_K=128 w4 s3", "bf16", 164096, 168, 0),
    ("vq_fwd", "BLOCK_M=32 BLOCK_K=32 w4 s2", "fp16", 33280, 64, 0),
    ("vq_fwd", "BLOCK_M=64 BLOCK_K=128 w4 s3", "fp16", 164096, 168, 0),
    ("vq_fwd", "BLOCK_M=32 BLOCK_K=32 w4 s2", "fp32", 65792, 80, 0),
    ("vq_fwd", "BLOCK_M=32 BLOCK_K=32 w4 s3", "fp32", 98560, 72, 0),
    ("vq_fwd", "BLOCK_M=128 BLOCK_K=32 w4 s2", "fp32", 164096, 32, 46864),
    ("vq_fwd", "BLOCK_M=32 BLOCK_K=32 w4 s2", "fp32-tf32", 66048, 200, 0),
    ("vq_fwd", "BLOCK_M=128 BLOCK_K=64 w8 s2", "fp32-tf32", 197120, 160, 0),
    ("vq_fwd", "BLOCK_M=32 BLOCK_K=128 w4 s2", "fp32-tf32", 164864, 255, 560),
    ("vq_st_bwd_dc", "BLOCK_M=32 BLOCK_K2=16 w4 s2", "bf16", 42496, 140, 0),
    ("vq_st_bwd_dc", "BLOCK_M=128 BLOCK_K2=32 w8 s2", "bf16", 157696, 174, 0),
    ("vq_st_bwd_dc", "BLOCK_M=32 BLOCK_K2=64 w8 s3", "bf16", 136192, 255, 332),
    ("vq_st_bwd_dc", "BLOCK_M=32 BLOCK_K2=16 w4 s2", "fp16", 42496, 140, 0),
    ("vq_st_bwd_dc", "BLOCK_M=128 BLOCK_K2=32 w8 s2", "fp16", 157696, 174, 0),
    ("vq_st_bwd_dc", "BLOCK_M=32 BLOCK_K2=64 w8 s3", "fp16", 136192, 255, 332),
    ("vq_st_bwd_dc", "BLOCK_M=32 BLOCK_K2=16 w4 s2", "fp32", 67584, 142, 0),
    ("vq_st_bwd_dc", "BLOCK_M=64 BLOCK_K2=16 w8 s2", "fp32", 135168, 106, 0),
    ("vq_st_bwd_dc", "BLOCK_M=64 BLOCK_K2=16 w4 s2", "fp32", 135168, 255, 2060),
    ("vq_st_bwd_dc", "BLOCK_M=32 BLOCK_K2=16 w4 s2", "fp32-tf32", 115200, 253, 0),
    ("vq_st_bwd_dc", "BLOCK_M=64 BLOCK_K2=32 w8 s2", "fp32-tf32", 230400, 251, 0),
    ("vq_st_bwd_dc", "BLOCK_M=32 BLOCK_K2=64 w8 s2", "fp32-tf32", 197120, 255, 1728),
    ("vq_st_bwd_dz", "BLOCK_M=32 BLOCK_K=16 w4 s2", "bf16", 42048, 158, 0),
    ("vq_st_bwd_dz", "BLOCK_M=128 BLOCK_K=32 w8 s3", "bf16", 180480, 228, 0),
    ("vq_st_bwd_dz", "BLOCK_M=128 BLOCK_K=64 w4 s3", "bf16", 229888, 255, 3684),
    ("vq_st_bwd_dz", "BLOCK_M=32 BLOCK_K=16 w4 s2", "fp16", 42048, 158, 0),
    ("vq_st_bwd_dz", "BLOCK_M=128 BLOCK_K=32 w8 s3", "fp16", 180480, 228, 0),
    ("vq_st_bwd_dz", "BLOCK_M=128 BLOCK_K=16 w4 s2", "fp16", 147520, 255, 3072),
    ("vq_st_bwd_dz", "BLOCK_M=32 BLOCK_K=16 w8 s2", "fp32", 18432, 142, 0),
    ("vq_st_bwd_dz", "BLOCK_M=32 BLOCK_K=64 w8 s2", "fp32", 73728, 188, 0),
    ("vq_st_bwd_dz", "BLOCK_M=64 BLOCK_K=32 w4 s2", "fp32", 40960, 255, 1048),
    ("vq_st_bwd_dz", "BLOCK_M=32 BLOCK_K=16 w4 s2", "fp32-tf32", 98368, 238, 0),
    ("vq_st_bwd_dz", "BLOCK_M=32 BLOCK_K=64 w8 s2", "fp32-tf32", 196864, 168, 0),
    ("vq_st_bwd_dz", "BLOCK_M=64 BLOCK_K=32 w8 s2", "fp32-tf32", 197120, 255, 1244),
]


def _parse(config: str) -> tuple[int, int, int, int]:
    """'BLOCK_M=64 BLOCK_K2=32 w8 s2' -> (64, 32, 8, 2)."""
    m = re.fullmatch(r"BLOCK_M=(\d+) BLOCK_K2?=(\d+) w(\d+) s(\d+)", config)
    assert m, config
    return tuple(int(g) for g in m.groups())  # type: ignore[return-value]


def _model_smem(kernel: str, config: str, dtype: str) -> int:
    """The pruning's shared-memory bytes for a harness row (the launchers' BLOCK_D = 256 and BLOCK_DC)."""
    bm, bk, _, stages = _parse(config)
    elem = 2 if dtype in ("bf16", "fp16") else 4
    if kernel.startswith("vq_fwd"):
        return vq._smem_fwd(bm, bk, stages, 256, elem)
    chunk = 32 if dtype == "fp32" else 256  # _feature_chunk: fp32 with ieee dots
    smem = vq._smem_dz if kernel == "vq_st_bwd_dz" else vq._smem_dc
    return smem(bm, bk, stages, 256, elem, chunk)


def _kind(dtype: str) -> str:
    return {"bf16": "2byte", "fp16": "2byte", "fp32": "fp32", "fp32-tf32": "tf32"}[dtype]


def _short(kernel: str) -> str:
    return {"vq_fwd": "fwd", "vq_st_bwd_dz": "dz", "vq_st_bwd_dc": "dc"}[kernel.split("[")[0]]


@pytest.mark.parametrize(("kernel", "config", "dtype", "smem", "regs", "spilled"), RECORDED)
def test_smem_model_never_underestimates_a_recorded_compile(
    kernel: str, config: str, dtype: str, smem: int, regs: int, spilled: int
) -> None:
    assert _model_smem(kernel, config, dtype) >= smem


def test_recorded_spills_are_pruned_by_name() -> None:
    """Every recorded config that spilled is named in _SPILLED (so the pruning at BLOCK_D = 256 drops it)."""
    spilled = [(k, c, d) for k, c, d, _, _, s in RECORDED if s]
    assert spilled, "RECORDED should hold spilling configs"
    missing = [r for r in spilled if _parse(r[1]) not in vq._SPILLED.get((_short(r[0]), _kind(r[2])), frozenset())]
    assert not missing, missing


def _kept(kernel: str, dtype: torch.dtype, precision: str, m: int, k: int) -> list[Any]:
    configs = {"fwd": vq._fwd_configs, "dz": lambda: vq._bwd_configs("BLOCK_K")}.get(
        kernel, lambda: vq._bwd_configs("BLOCK_K2")
    )()
    prune = {"fwd": vq._prune_fwd, "dz": vq._prune_dz, "dc": vq._prune_dc}[kernel]
    chunk = 32 if dtype == torch.float32 and precision == "ieee" else 256
    args = {"Z": torch.empty(1, dtype=dtype), "DOT_PRECISION": precision}
    return prune(configs, args, M=m, K=k, BLOCK_D=256, BLOCK_DC=chunk)


@pytest.mark.parametrize("kernel", ["fwd", "dz", "dc"])
@pytest.mark.parametrize(
    ("dtype", "precision"),
    [(torch.bfloat16, "ieee"), (torch.float16, "ieee"), (torch.float32, "ieee"), (torch.float32, "tf32")],
    ids=["bf16", "fp16", "fp32", "fp32-tf32"],
)
def test_pruning_keeps_only_configs_that_fit(monkeypatch: pytest.MonkeyPatch, kernel: str, dtype: torch.dtype,
                                             precision: str) -> None:  # fmt: skip
    """At the benchmark shapes the kept configs fit 227 KiB by the model and none is one that spilled."""
    monkeypatch.setattr(vq, "INTERPRET", False)
    elem = torch.empty(0, dtype=dtype).element_size()
    chunk = 32 if dtype == torch.float32 and precision == "ieee" else 256
    kind = {2: "2byte", 4: "tf32" if precision == "tf32" else "fp32"}[elem]
    for m, k in ((704, 512), (65536, 1024)):
        kept = _kept(kernel, dtype, precision, m, k)
        assert kept
        for c in kept:
            bm, bk = c.kwargs["BLOCK_M"], c.kwargs.get("BLOCK_K", c.kwargs.get("BLOCK_K2"))
            key = (bm, bk, c.num_warps, c.num_stages)
            assert key not in vq._SPILLED.get((kernel, kind), frozenset())
            if kernel == "fwd":
                assert vq._smem_fwd(bm, bk, c.num_stages, 256, elem) <= H100_SMEM_BYTES
            else:
                smem = vq._smem_dz if kernel == "dz" else vq._smem_dc
                assert smem(bm, bk, c.num_stages, 256, elem, chunk) <= H100_SMEM_BYTES


def test_forward_keeps_its_large_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """The 128 x 64, 128 x 128 and 256 x 64 tiles compile cleanly for sm_90 (bf16): pruning keeps them."""
    monkeypatch.setattr(vq, "INTERPRET", False)
    kept = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]) for c in _kept("fwd", torch.bfloat16, "ieee", 65536, 8192)}
    assert {(128, 64), (128, 128), (256, 64)} <= kept


# ----------------------------------------------------------------------------------------------------------
# A live compile through the harness: the model against what Triton and ptxas do now
# ----------------------------------------------------------------------------------------------------------

# One tensor-core config of each backward kernel (bf16), kept at the benchmark shapes
LIVE = {"vq_st_bwd_dz": "BLOCK_M=64 BLOCK_K=16 w8 s2", "vq_st_bwd_dc": "BLOCK_M=64 BLOCK_K2=32 w8 s2"}


def test_harness_compile_matches_the_model(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the harness compiles for sm_90
    cmd = [sys.executable, "bench/kernels_sm90.py", "--kernel", *LIVE, "--dtypes", "bf16", "--out", str(tmp_path)]
    for config in LIVE.values():
        cmd += ["--config", config]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    (path,) = tmp_path.glob("kernels-sm90-*.json")
    rows = {r["kernel"]: r for r in json.loads(path.read_text())["rows"]}
    assert set(rows) == set(LIVE)
    for kernel, row in rows.items():
        assert row["config"] == LIVE[kernel] and row["kept"], row
        assert row["spill_stores"] == row["spill_loads"] == 0 and row["fits"], row
        assert row["smem_bytes"] <= _model_smem(kernel, row["config"], "bf16") <= H100_SMEM_BYTES, row
        assert row["dots"] and all(d.split()[0] in ("wgmma", "mma") for d in row["dots"]), row
