"""kernels._triton_common.prune_spills / fewest_spills: the compile-based pruning every autotuned kernel has (its
GPU half, compiling the kept configs, is tests/test_gpu.py's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from partitioner.kernels._triton_common import fewest_spills

ROOT = Path(__file__).resolve().parents[1]


def test_the_configs_that_do_not_spill_are_kept_in_order() -> None:
    spills = {"a": 0, "b": 96, "c": 0, "d": 8}
    assert fewest_spills(list("abcd"), spills.__getitem__) == ["a", "c"]


def test_where_every_config_spills_those_spilling_least_are_kept() -> None:
    spills = {"a": 40, "b": 8, "c": 8}
    assert fewest_spills(list("abc"), spills.__getitem__) == ["b", "c"]
    assert fewest_spills([], spills.__getitem__) == []


def test_every_autotuned_kernel_compiled_for_a_gpu_prunes_by_its_compile() -> None:
    """Decorated for the compiler (not the interpreter), each of the seven autotuned kernels' early_config_prune is the
    wrapper, its tile model reachable as `.inner`; without CUDA the wrapper gives the model's configs (what the sm_90
    harness reads)."""
    code = (
        "import importlib\n"
        "m, s, v = (importlib.import_module(f'partitioner.kernels.{n}') for n in ('msglam', 'slot_attention', 'vq'))\n"
        "ks = [m._msglam_fwd_kernel, m._msglam_bwd_kernel, s._slot_attention_fwd_kernel, s._slot_attention_bwd_kernel,"
        " v._vq_fwd_kernel, v._vq_st_bwd_dz_kernel, v._vq_st_bwd_dc_kernel]\n"
        "assert all(hasattr(k.early_config_prune, 'inner') for k in ks), ks\n"
        "print(len(ks))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "7", run.stdout + run.stderr
