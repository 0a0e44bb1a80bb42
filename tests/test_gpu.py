"""GPU checks (`gpu` marker): skipped without CUDA (CI), run whenever a GPU is available (`python -m pytest -q
tests/test_gpu.py`, then `python bench/kernels.py` for the timings, recorded in bench/results/).

- a compiled model's local pipeline on cuda equals the model;
- the Triton kernels, compiled for the GPU (not interpreted), match their plain-PyTorch references;
- a one-rank NCCL pipeline trains equal to single-process CPU training;
- profile mode's predicted step is within 2x of a measured step on the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import partitioner
import zoo
from partitioner.launch import spawn

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parent.parent


def test_local_pipeline_on_cuda_equals_the_model() -> None:
    torch.manual_seed(0)
    model = zoo.get("gpt3-tiny").cuda()
    x = tuple(t.cuda() for t in zoo.example_inputs("gpt3-tiny", batch=8))
    cm = partitioner.compile(model, devices=2, pipeline=2, example_inputs=x, device_type="h100")
    with torch.no_grad():
        torch.testing.assert_close(cm(*x), model(*x))


def test_triton_kernels_compiled_for_the_gpu_match_their_references() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not the interpreter
    run = subprocess.run(
        [sys.executable, "bench/kernels.py", "--check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "FAIL" not in run.stdout


@pytest.mark.timeout(300)
def test_one_rank_nccl_pipeline_trains_as_one_process(tmp_path: Path) -> None:
    from tests._dist_worker import reference

    out = tmp_path / "nccl.pt"
    (result,) = spawn("tests._dist_worker:nccl_pipeline_step", 1, {"steps": 2, "out": str(out)}, backend="nccl",
                      timeout=240)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    got = torch.load(out)
    losses, state = reference("gpt3-tiny", microbatches=2, batch=8, steps=2, lr=0.1, seed=0)
    assert got["losses"] == pytest.approx(losses, abs=1e-4, rel=0)
    for name, ref in state.items():
        torch.testing.assert_close(got["state"][name].cpu(), ref, atol=1e-4, rtol=1e-4, msg=name)


def test_profile_mode_predicts_a_measured_gpu_step_within_2x() -> None:
    torch.manual_seed(0)
    model = zoo.get("gpt3-tiny").cuda()
    x = tuple(t.cuda() for t in zoo.example_inputs("gpt3-tiny", batch=16))
    y = zoo.example_targets("gpt3-tiny", batch=16).cuda()
    cm = partitioner.compile(model, devices=1, example_inputs=x, device_type="h100", cost="profile", microbatches=1)
    loss_fn = zoo.loss_fn("gpt3-tiny")
    for _ in range(3):  # warm-up: kernels chosen, caches filled
        cm.step(x, y, loss_fn)
        cm.zero_grad()
    times = []
    for _ in range(10):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        cm.step(x, y, loss_fn)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cm.zero_grad()
    measured = sorted(times)[len(times) // 2]
    predicted = cm.plan.predicted["step_time"]
    print(f"profile mode: predicted {predicted * 1e3:.3f} ms, measured {measured * 1e3:.3f} ms per step")
    assert 0.5 <= measured / predicted <= 2.0


def test_autotuning_compiles_the_kept_configs_and_counts_their_spills(monkeypatch: pytest.MonkeyPatch) -> None:
    """kernels._triton_common.prune_spills: on the GPU the kept configs are compiled for the call's own arguments and
    those ptxas spills registers in are dropped. VQ with the straight-through backward at D=128 (the register models
    were measured at D=256): every autotuned kernel it launches counts its kept configs' spills, and its result
    stays the reference's."""
    import partitioner.kernels._triton_common as common
    from partitioner import kernels

    seen: list[list[int]] = []
    original = common.fewest_spills

    def recording(configs: list, spills: object) -> list:
        counts = [spills(c) for c in configs]  # type: ignore[operator]
        seen.append(counts)
        return original(configs, lambda c: counts[configs.index(c)])

    monkeypatch.setattr(common, "fewest_spills", recording)
    torch.manual_seed(0)
    z = torch.randn(4096, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    codebook = torch.randn(1024, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    idx, quantized, _ = kernels.vq_lookup(z, codebook, straight_through=True, backend="triton")
    quantized.float().sum().backward()
    assert len(seen) >= 3, "the forward and both backward kernels compile their kept configs"
    assert all(isinstance(n, int) and n >= 0 for counts in seen for n in counts)
    ref_idx, _, _ = kernels.vq_lookup(z.detach(), codebook.detach(), backend="reference")
    assert (idx == ref_idx).float().mean() > 0.99  # bf16 distances may order near-ties differently
