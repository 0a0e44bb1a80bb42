"""examples/custom_slot_attention.py, run as a user runs it: a subprocess at a small size, its printed figures checked.

Both CPU paths run (a few seconds each on 2 cores): without TRITON_INTERPRET, where `slot_attention` falls back to
its reference, and under TRITON_INTERPRET=1, where the Triton kernel runs in Triton's interpreter. The GPU path
(`--device cuda`) is not run here.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_slot_attention.py"
SMALL = ["--steps", "2", "--iters", "2", "--batch", "2", "--size", "4", "--slots", "3", "--dim", "16"]
NUMBER = r"([-+0-9.e]+|nan|inf)"


def _run(interpret: str, dtype: str) -> str:
    """The example's stdout; fails the test with its output when it exits non-zero."""
    env = {**os.environ, "TRITON_INTERPRET": interpret, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), *SMALL, "--dtype", dtype],
        capture_output=True,
        text=True,
        env=env,
        cwd=EXAMPLE.parents[1],
        timeout=150,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern.replace("NUMBER", NUMBER), text)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    return float(match.group(1))


@pytest.mark.timeout(200)
@pytest.mark.parametrize(
    ("interpret", "dtype", "path", "tol"),
    [
        ("0", "float32", "reference fallback (CPU tensors need TRITON_INTERPRET=1", 0.0),
        ("1", "float32", "Triton interpreter (TRITON_INTERPRET=1)", 1e-5),
        ("1", "bfloat16", "Triton interpreter (TRITON_INTERPRET=1)", 5e-2),
    ],
    ids=["reference-fallback", "interpreter-fp32", "interpreter-bf16"],
)
def test_custom_slot_attention_example(interpret: str, dtype: str, path: str, tol: float) -> None:
    out = _run(interpret, dtype)
    assert f"kernel path: {path}" in out, out

    # Step 1: kernel against reference (0 where both runs are the reference)
    output_diff = _number(r"max \|kernel - reference\|: output NUMBER,", out)
    grad_diff = _number(r"max \|kernel - reference\|: output \S+, gradients NUMBER", out)
    relative = _number(r"largest relative to its tensor's scale: NUMBER ", out)
    assert relative <= tol, out
    if tol == 0.0:
        assert output_diff == grad_diff == 0.0, out
    else:
        assert 0.0 <= output_diff < 1e-2 and 0.0 <= grad_diff < 1e-2, out  # outputs and gradients are O(0.1)

    # Step 2: two finite losses (a falling loss is not asserted)
    losses = [float(x) for x in re.findall(rf"step \d+: loss {NUMBER}", out)]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), out

    # Step 3: two stages, every kernel call a graph node, the compiled output equal to the plain model's
    assert "Plan for ObjectAutoencoder on 2 x cpu (pipeline 2 x tensor 1 x data 1;" in out, out
    assert "captured with fx: slot_attention is 2 leaf call(s)" in out, out  # --iters 2
    assert _number(r"max abs difference NUMBER\)", out) == 0.0, out
