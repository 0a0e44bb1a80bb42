"""kernels/slot_attention.py's autotune pruning against real sm_90 compiles (bench/kernels_sm90.py, no GPU needed).

The pruning keeps a config when its shared memory (`_smem_bytes`, an upper bound of what Triton allocates) fits
an H100's 227 KiB and its register tiles (`_reg_words`) fit the budget that compiled without spills. Here a few
backward configs near those limits are compiled for sm_90 at the benchmark shapes: the smem bound must never be
below the compiled kernel's, and a kept config must compile without spills within the H100's limits. The whole
space was checked the same way when the models were written (192 compiles, see the comment above `_REG_WORDS`).
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from tests.test_kernels_sm90 import H100_SMEM_BYTES, _harness  # noqa: E402

ELEMENT_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4, "fp32-tf32": 4}
# bf16 BLOCK_N=64 w4 s2: the backward's bound is exact (120 KiB) and its register count the largest kept (192
# words). TF32 BLOCK_N=64 w4 s2: pruned, and it does spill and overflow. BLOCK_N=32 w8 s2: kept at both dtypes.
CONFIGS = ("BLOCK_N=64 w4 s2", "BLOCK_N=32 w8 s2")
DTYPES = ("bf16", "fp32-tf32")


def _parse(config: str) -> tuple[int, int, int]:
    """'BLOCK_N=64 w4 s2' -> (64, 4, 2)."""
    block_n, warps, stages = config.split()
    return int(block_n.split("=")[1]), int(warps[1:]), int(stages[1:])


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    args = ["--kernel", "slot_attention_bwd", "--dtypes", *DTYPES]  # the forward's bound is exact, simpler
    for config in CONFIGS:
        args += ["--config", config]
    return _harness(tmp_path_factory.mktemp("sm90_slot_attention"), *args)


def _model(row: dict[str, Any], constexprs: dict[str, Any]) -> tuple[int, float, float]:
    """(smem bound in bytes, register words, budget) of the row's config by the pruning's models."""
    sa = importlib.import_module("partitioner.kernels.slot_attention")  # the package exports a function so named
    bwd = row["kernel"] == "slot_attention_bwd"
    block_n, warps, stages = _parse(row["config"])
    bs, bd, bdv = constexprs["BLOCK_S"], constexprs["BLOCK_D"], constexprs["BLOCK_DV"]
    block_c = constexprs.get("BLOCK_C", min(sa._DK_CHUNK, bd, bdv))
    elem, tf32 = ELEMENT_SIZE[row["dtype"]], constexprs["DOT_PRECISION"] == "tf32"
    fma = elem == 4 and not tf32
    smem = sa._smem_bytes(bwd, block_n, stages, bs, bd, bdv, elem, block_c, tf32)
    words = sa._reg_words(bwd, block_n, warps, bs, bd, bdv, elem, block_c)
    return smem, words, sa._REG_WORDS["bwd" if bwd else "fwd", fma]


def test_pruning_models_bound_the_sm90_compiles(result: dict[str, Any]) -> None:
    rows = result["rows"]
    assert result["complete"] and len(rows) == len(CONFIGS) * len(DTYPES)
    assert all("error" not in r for r in rows), [r["error"] for r in rows if "error" in r]
    for row in rows:
        constexprs = result["launches"][f"{row['kernel']} ({row['dtype']})"]["constexprs"]
        smem, words, budget = _model(row, constexprs)
        what = f"{row['kernel']} {row['config']} {row['dtype']}"
        assert smem >= row["smem_bytes"], f"{what}: smem bound {smem} B below the compile's {row['smem_bytes']} B"
        spills = row["spill_stores"] + row["spill_loads"]
        if row["kept"]:
            assert words <= budget and smem <= H100_SMEM_BYTES, what
            assert spills == 0 and row["fits"], f"{what} is kept but spills {spills} B or does not fit: {row}"
            if row["dtype"] in ("bf16", "fp16") or constexprs["DOT_PRECISION"] == "tf32":
                assert row["mma"] + row["wgmma"] > 0, f"{what}: no tensor-core instructions"
    kept = {(r["kernel"], r["config"], r["dtype"]) for r in rows if r["kept"]}
    # The pruning keeps the tight bf16 configs and drops TF32 BLOCK_N=64 w4 s2, which does spill and overflow
    assert ("slot_attention_bwd", "BLOCK_N=64 w4 s2", "bf16") in kept
    dropped = next(
        r for r in rows if (r["kernel"], r["config"], r["dtype"]) == ("slot_attention_bwd", CONFIGS[0], "fp32-tf32")
    )
    assert not dropped["kept"] and dropped["spill_stores"] > 0 and dropped["smem_bytes"] > H100_SMEM_BYTES


def test_forward_config_of_the_sm90_smoke_test_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """tests/test_kernels_sm90.py compiles the forward's "BLOCK_N=16 w4 s1" for bf16 and fp32 and expects it kept."""
    sa = importlib.import_module("partitioner.kernels.slot_attention")  # the package exports a function so named

    monkeypatch.setattr(sa, "INTERPRET", False)
    meta = dict(BLOCK_S=16, BLOCK_D=256, BLOCK_DV=256, DOT_PRECISION="ieee")
    for dtype in (torch.bfloat16, torch.float32):
        for n_per_split in (256, 128):  # the two benchmark shapes' token splits on an H100
            kept = sa._prune("fwd", sa._configs(), {"K": torch.empty(1, dtype=dtype)}, n_per_split=n_per_split, **meta)
            assert any(c.kwargs["BLOCK_N"] == 16 and c.num_warps == 4 and c.num_stages == 1 for c in kept), dtype
