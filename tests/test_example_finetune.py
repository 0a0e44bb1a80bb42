"""examples/finetune_hf_llama.py as a user runs it: in one process, and under torchrun on 4 gloo processes.

Each run must exit 0 (the script checks itself against plain HF training), print one loss per step equal to
plain HF training of the same model on the same data (recomputed here with the example's own functions), and
leave a checkpoint that loads into a fresh LlamaForCausalLM with strict=True and gives the reference's logits on
the held-out batch. Every subprocess has a deadline and runs in its own process group, killed whole at the
deadline, so a hung world fails the test instead of blocking it.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from partitioner.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "finetune_hf_llama.py"
# The tiny size CI runs: 2 layers, hidden 64 (4 heads, 2 kv heads, vocab 256), 8 sequences of 16 tokens.
SIZE = argparse.Namespace(layers=2, hidden=64, seq=16, batch=8, lr=3e-3, steps=3)
ARGS = [f"--{k}={v}" for k, v in vars(SIZE).items()]


def _example() -> ModuleType:
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    spec = importlib.util.spec_from_file_location("finetune_hf_llama", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _reference() -> tuple[Any, list[float], Any]:
    """Plain HF training at SIZE: (the trained LlamaForCausalLM, its loss per step, the held-out batch)."""
    ex = _example()
    batches = [ex.batch(SIZE.batch, SIZE.seq, seed=1 + i) for i in range(SIZE.steps)]
    model, losses = ex.reference(SIZE, batches)
    return model.eval(), losses, ex.batch(SIZE.batch, SIZE.seq, seed=0)


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """`cmd` in a new session (torchrun's workers included), killed whole at `timeout` seconds."""
    env = {
        **os.environ, "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} ran past {timeout} s:\n{stdout}\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _check(result: subprocess.CompletedProcess, out: Path) -> None:
    """Exit 0, the reference's losses printed, and a checkpoint that is the reference's model."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    text = result.stdout
    assert result.returncode == 0, f"exit {result.returncode}:\n{text}\n{result.stderr[-4000:]}"
    assert "checkpoint loads into LlamaForCausalLM (strict=True)" in text, text
    assert text.rstrip().splitlines()[-1].startswith("OK: "), text

    plain, expected, (held_kwargs, _) = _reference()
    losses = [float(x) for x in re.findall(r"^step \d+: loss (\S+)$", text, flags=re.M)]
    assert losses == pytest.approx(expected, abs=1e-5, rel=0), text  # printed to 6 decimals
    assert losses[-1] < losses[0]  # it learns
    logit_diff = float(re.search(r"max \|logit diff\| (\S+) against the reference", text).group(1))
    assert logit_diff < 1e-3, text

    fresh = LlamaForCausalLM(LlamaConfig.from_pretrained(out))
    fresh.load_state_dict(load_file(out / "model.safetensors"), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(**held_kwargs).logits, plain(**held_kwargs).logits, atol=1e-3, rtol=0)


@pytest.mark.timeout(150)
def test_finetune_example_runs_in_one_process(tmp_path: Path) -> None:
    _example()
    result = _run([sys.executable, str(EXAMPLE), *ARGS, f"--out={tmp_path}"], timeout=120)
    assert "training in one process" in result.stdout, result.stdout
    _check(result, tmp_path)


@pytest.mark.distributed
@pytest.mark.slow  # 24 s of CI's 15 minutes; the one-process run and HF Llama's torchrun tests stay in CI
@pytest.mark.timeout(200)
def test_finetune_example_runs_under_torchrun_on_4_processes(tmp_path: Path) -> None:
    """pipeline 2 x tensor 2: each of the 4 processes trains a stage's shard; rank 0 merges the checkpoint."""
    _example()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", "--master-addr=127.0.0.1",
                f"--master-port={free_port()}"]  # fmt: skip
    result = _run([*torchrun, str(EXAMPLE), *ARGS, f"--out={tmp_path}"], timeout=170)
    assert "training in 4 processes" in result.stdout, result.stdout
    assert result.stdout.startswith("Plan for LlamaForCausalLM on 4 x cpu (pipeline 2 x tensor 2 x data 1;")
    _check(result, tmp_path)
