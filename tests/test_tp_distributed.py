"""Tensor parallelism across real processes: gloo on localhost, one process per tp rank, torch's functional
collectives (`GroupComm`) under our f / g autograd rules.

Each rank builds the same model (same seed), plans, rewrites its own rank graph, runs forward and backward and
compares its outputs and its gradients (sharded ones against its slice of the unsharded gradient) with the
unsharded model run in the same process: fp32 assert_close. Ranks are started by `partitioner.launch.spawn`
(hard deadline) and every test has a pytest timeout. tp=8 (8 processes on 2 cores) is slow-marked.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from partitioner.launch import spawn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORKER = "tests.test_tp_distributed:check_rank"


def check_rank(*, model: str, overrides: dict | None = None, loss_in_graph: bool = False) -> None:
    """One rank: plan, rewrite, forward + backward, compare with the unsharded model (raises on mismatch)."""
    import copy

    import zoo
    from partitioner.annotate import annotate
    from partitioner.capture import capture
    from partitioner.passes.tensor_parallel import GroupComm, count_collectives, shard_of, tensor_parallel_rank
    from partitioner.plan.tensor import plan_tensor_parallel
    from partitioner.runtime.tp_local import _default_loss
    from tests.test_tensor_parallel import NanoGPT

    torch.manual_seed(0)
    if model == "nano":
        net = NanoGPT("sdpa")
        g = torch.Generator().manual_seed(1)
        args: tuple = (torch.randint(0, 96, (2, 8), generator=g),)
        if loss_in_graph:
            args = args + (torch.randint(0, 96, (2, 8), generator=g),)
    else:
        net = zoo.get(model, **(overrides or {}))
        args = zoo.example_inputs(model, batch=2, seq=8)
    loss_fn = (lambda out: out[0]) if loss_in_graph else _default_loss

    cg = capture(net, args)
    gm = cg.graph_module
    inputs = cg.flatten_inputs(args, {})
    annotate(gm, inputs, training=True)
    comm = GroupComm()
    plan = plan_tensor_parallel(gm, comm.world_size)
    rank_gm = tensor_parallel_rank(gm, plan, comm.rank, comm)
    counts = count_collectives(rank_gm)

    reference = copy.deepcopy(gm)
    ref_out = reference(*inputs)
    loss_fn(ref_out).backward()
    out = rank_gm(*inputs)
    loss_fn(out).backward()

    for i, (a, b) in enumerate(zip(out, ref_out)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, i=i: f"rank {comm.rank} output {i}: {m}")
    local = dict(rank_gm.named_parameters(remove_duplicate=False))
    checked = 0
    for name, ref in reference.named_parameters(remove_duplicate=False):
        if ref.grad is None:
            continue
        want = shard_of(plan, name, ref.grad, comm.rank)  # a padded vocabulary's padding rows get no gradient
        scale = max(1.0, ref.grad.abs().max().item())
        torch.testing.assert_close(
            local[name].grad, want, rtol=1e-5, atol=1e-5 * scale, msg=lambda m, k=name: f"rank {comm.rank} {k}: {m}"
        )
        checked += 1
    dist.barrier()
    print(f"rank {comm.rank}: ok, {checked} gradients, collectives {counts}")


def _run(tp: int, timeout: float, **kw: object) -> None:
    results = spawn(WORKER, tp, kw, timeout=timeout, pg_timeout=60)
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} exited {r.returncode} (timed out: {r.timed_out}):\n{r.stderr[-4000:]}"
        assert "ok" in r.stdout


@pytest.mark.distributed
@pytest.mark.timeout(180)
# RoBERTa is BERT's graph with other embeddings' sizes: CI runs BERT, `-m slow` both.
@pytest.mark.parametrize("model", ["gpt3-tiny", "bert-tiny", pytest.param("roberta-tiny", marks=pytest.mark.slow)])
@pytest.mark.parametrize("tp", [2, 4])
def test_zoo_tp_matches_unsharded(model: str, tp: int) -> None:
    _run(tp, 150, model=model)


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_padded_vocabulary_matches_unsharded() -> None:
    """510 tokens at tp=4: the tied embedding / head padded to 512 rows, 128 per rank."""
    _run(4, 150, model="gpt3-tiny", overrides={"vocab_size": 510})


@pytest.mark.distributed
@pytest.mark.timeout(180)
@pytest.mark.parametrize("tp", [2, 4])
def test_nanogpt_loss_in_graph_vocab_parallel_cross_entropy(tp: int) -> None:
    _run(tp, 150, model="nano", loss_in_graph=True)


@pytest.mark.distributed
@pytest.mark.slow  # 8 processes on 2 cores, 20 s: tp 2 and 4 run in CI
@pytest.mark.timeout(180)
def test_gpt3_tiny_tp8() -> None:
    """8 processes on 2 cores (about 16 s): every GPT-3 tiny matrix sharded 8 ways (8 heads)."""
    _run(8, 150, model="gpt3-tiny", overrides={"n_head": 8})


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_gpt3_tiny_tp8_with_4_heads_falls_back_to_replicated_attention() -> None:
    _run(8, 150, model="gpt3-tiny")


def funcol_grad_probe() -> None:
    """Why we wrap collectives in our own autograd.Functions: torch's functional all_reduce differentiates to
    another all-reduce. As Megatron's g (a partial sum made replicated), its input grad must be the replicated
    output grad itself; funcol's backward sums the tp identical copies instead (tp x too large)."""
    import torch.distributed._functional_collectives as funcol

    from partitioner.passes.tensor_parallel import GroupComm, TPCollective

    x = torch.ones(3, requires_grad=True)
    funcol.all_reduce(x, "sum", dist.group.WORLD).wait().sum().backward()
    y = torch.ones(3, requires_grad=True)
    TPCollective("reduce", GroupComm())(y).sum().backward()
    print(f"funcol {x.grad.tolist()} ours {y.grad.tolist()}", flush=True)
    # About 1 run in 10, torch 2.13 aborts at teardown after funcol's differentiable all-reduce ("terminate called
    # without an active exception", with or without a barrier first): what this probe shows is printed; end here.
    dist.barrier()
    os._exit(0)


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_functional_all_reduce_autograd_is_not_megatrons_g() -> None:
    results = spawn("tests.test_tp_distributed:funcol_grad_probe", 2, {}, timeout=100, pg_timeout=60)
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
        assert "funcol [2.0, 2.0, 2.0] ours [1.0, 1.0, 1.0]" in r.stdout, r.stdout
