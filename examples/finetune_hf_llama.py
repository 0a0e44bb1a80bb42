"""Fine-tune a small Hugging Face Llama at pipeline 2 x tensor 2, save a merged checkpoint, load it back into HF.

    torchrun --nproc-per-node 4 examples/finetune_hf_llama.py    # 4 gloo processes on the CPU, a shard each
    python examples/finetune_hf_llama.py                         # the same script, every stage in this process

`--pipeline P --tensor-parallel T` needs P x T processes under torchrun. In one process the plan's stages run
unsharded: the tensor-parallel shards run only under torchrun (`cm.verify_tensor_parallel` checks them here).

The model is a tiny `LlamaConfig` built here with seeded random weights (nothing is downloaded), trained for a few
AdamW steps on synthetic token sequences with a causal-LM loss. Rank 0 then writes `cm.full_state_dict()` (the
tensor-parallel shards merged, the model's own parameter names) as `model.safetensors` next to `config.json`,
loads it into a fresh `LlamaForCausalLM` with `strict=True`, and checks it against plain HF training of the same
model on the same data and optimizer in one process: the loss of every step, the weights, and the logits on a
held-out batch. It exits 1 where any of them differ by more than fp32 rounding explains.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import partitioner

VOCAB, HEADS, KV_HEADS = 256, 4, 2

Batch = tuple[dict[str, Any], torch.Tensor]  # (the model's keyword call, next-token targets)


def build(layers: int, hidden: int, seq: int) -> LlamaForCausalLM:
    """The same model on every call and every rank: a tiny Llama with seeded weights."""
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=seq,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def batch(size: int, seq: int, seed: int) -> Batch:
    """Sequences counting up from a random token (something a few steps can learn): input_ids [size, seq] and
    the targets, the same tokens one position on."""
    start = torch.randint(0, VOCAB, (size, 1), generator=torch.Generator().manual_seed(seed))
    tokens = (start + torch.arange(seq + 1)) % VOCAB  # [size, seq + 1]
    # use_cache=False: torch.export refuses the DynamicCache a causal LM returns with the cache on.
    return {"input_ids": tokens[:, :-1], "use_cache": False}, tokens[:, 1:]


def causal_lm_loss(out: Any, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position of HF's CausalLMOutputWithPast."""
    return F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())


def reference(args: argparse.Namespace, batches: list[Batch]) -> tuple[LlamaForCausalLM, list[float]]:
    """Plain HF training in one process, no partitioner: the same model, data and optimizer, one pass per batch."""
    model = build(args.layers, args.hidden, args.seq)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    for kwargs, targets in batches:
        loss = causal_lm_loss(model(**kwargs), targets)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model, losses


def save(state: dict[str, torch.Tensor], config: LlamaConfig, out: Path) -> Path:
    """A Hugging Face checkpoint directory: config.json and model.safetensors."""
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")
    return out / "model.safetensors"


def load(out: Path) -> tuple[LlamaForCausalLM, list[str]]:
    """A fresh LlamaForCausalLM from the checkpoint, strictly (every tensor of the model's state_dict, nothing
    else), and the model's buffers the checkpoint rightly lacks: non-persistent ones, in no state_dict."""
    fresh = LlamaForCausalLM(LlamaConfig.from_pretrained(out))
    state = load_file(out / "model.safetensors")
    absent = sorted({n for n, _ in fresh.named_buffers()} - set(state))
    fresh.load_state_dict(state, strict=True)
    return fresh.eval(), absent


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest |a - b| over every tensor of two state dicts with the same names."""
    return max((a[k] - b[k]).abs().max().item() for k in a)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="training steps (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=64, help=f"hidden size, {HEADS} heads (default: %(default)s)")
    parser.add_argument("--pipeline", type=int, default=2, help="pipeline stages (default: %(default)s)")
    parser.add_argument("--tensor-parallel", type=int, default=2, help="tensor degree (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step (default: %(default)s)")
    parser.add_argument("--seq", type=int, default=16, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="checkpoint directory (default: a new temporary directory)")
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    say = print if int(os.environ.get("RANK", "0")) == 0 else lambda *a: None

    # Every rank builds the whole (tiny) model and compiles it alike; under torchrun each then keeps only its
    # stage's tensor-parallel shard (a big model would be built on meta with partitioner.record_init instead).
    model = build(args.layers, args.hidden, args.seq)
    batches = [batch(args.batch, args.seq, seed=1 + i) for i in range(args.steps)]
    held_out = batch(args.batch, args.seq, seed=0)
    cm = partitioner.compile(
        model, devices=args.pipeline * args.tensor_parallel, pipeline=args.pipeline,
        tensor_parallel=args.tensor_parallel, example_kwargs=batches[0][0], device_type="cpu",
    )  # fmt: skip
    say(cm.plan.summary().splitlines()[0])
    where = f"{world} processes, a stage's tensor-parallel shard each" if world > 1 else "one process, every stage"
    say(f"training in {where}: {args.steps} steps of {args.batch} x {args.seq} tokens, AdamW lr {args.lr}")

    # The same calls in one process and under torchrun, where cm.step runs this rank's stages on torch's
    # pipeline schedule and cm.make_optimizer trains this rank's shards (as the plan's data-parallel mode says).
    opt = cm.make_optimizer(torch.optim.AdamW, lr=args.lr)
    losses = []
    for i, (kwargs, targets) in enumerate(batches):
        losses.append(cm.step((), targets, causal_lm_loss, kwargs=kwargs).item())
        opt.step()
        cm.zero_grad()
        say(f"step {i}: loss {losses[-1]:.6f}")
    # A step without opt.step() evaluates: the trained pipeline's loss on a batch it never trained on.
    held_loss = cm.step((), held_out[1], causal_lm_loss, kwargs=held_out[0]).item()
    cm.zero_grad()

    state = cm.full_state_dict()  # collective: the merged model on rank 0, None on the other ranks
    if cm.pipeline is not None:
        cm.pipeline.close()
        dist.destroy_process_group()
    if state is None:
        return 0

    out = args.out or Path(tempfile.mkdtemp(prefix="finetune_hf_llama-"))
    path = save(state, model.config, out)
    print(f"checkpoint: {path} ({len(state)} tensors, {path.stat().st_size / 2**20:.2f} MiB) and config.json")
    loaded, absent = load(out)
    print(f"checkpoint loads into LlamaForCausalLM (strict=True); not in it, rightly: {', '.join(absent) or 'none'} "
          f"(non-persistent buffers)")  # fmt: skip

    # The proof: plain HF training of the same model on the same batches, in this process.
    plain, expected = reference(args, batches)
    with torch.no_grad():
        got, want = loaded(**held_out[0]), plain.eval()(**held_out[0])
    loaded_loss = causal_lm_loss(got, held_out[1]).item()
    loss_diff = max(abs(a - b) for a, b in zip(losses, expected))
    weight_diff = largest_difference(loaded.state_dict(), plain.state_dict())
    logit_diff = (got.logits - want.logits).abs().max().item()
    print(f"reference (plain HF training in one process): max |loss diff| {loss_diff:.1e} over {args.steps} steps, "
          f"max |weight diff| {weight_diff:.1e}")  # fmt: skip
    print(f"held-out batch: loss {loaded_loss:.6f} from the loaded model, {held_loss:.6f} from the trained "
          f"pipeline; max |logit diff| {logit_diff:.1e} against the reference")  # fmt: skip

    checks = {  # what: (its largest difference, the most that fp32 rounding explains)
        "training losses against the reference": (loss_diff, 1e-4),
        # AdamW divides by sqrt(v): rounding in a near-zero gradient can move a weight by up to lr in a step.
        "weights against the reference": (weight_diff, args.lr),
        "held-out logits against the reference": (logit_diff, 1e-3),
        "held-out loss of the loaded model against the pipeline's": (abs(loaded_loss - held_loss), 1e-5),
    }
    failed = [f"{what}: {diff:.1e} > {most:.0e}" for what, (diff, most) in checks.items() if not diff <= most]
    print("FAILED: " + "; ".join(failed) if failed else "OK: the checkpoint holds the model the reference trained")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
