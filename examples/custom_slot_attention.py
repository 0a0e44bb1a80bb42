"""Your own model calling a `kernels` Triton kernel: check it against the reference, train it, partition it.

    python examples/custom_slot_attention.py                      # CPU: Triton cannot run, the reference runs
    TRITON_INTERPRET=1 python examples/custom_slot_attention.py   # CPU: the Triton kernel, in Triton's interpreter
    python examples/custom_slot_attention.py --device cuda        # GPU: the compiled Triton kernel (not yet run)

The first two take about 8 s and 20 s on 2 CPU cores (the interpreter is slow; keep sizes small there).

The model is a tiny object-centric autoencoder: a CNN turns an image into tokens, Slot Attention (Locatello et
al. 2020) groups them into a few slots, calling `partitioner.kernels.slot_attention` at every iteration, and the last
iteration's attention, used as per-slot masks, paints each slot's colour back into the image.

`slot_attention(..., backend="auto")` runs Triton where it can (CUDA tensors, or CPU tensors when TRITON_INTERPRET=1
was set before `partitioner.kernels` was imported) and the plain-PyTorch reference otherwise, silently;
`backend="triton"` raises instead, naming the reason. This script uses that to say which path ran. On a CPU without
the interpreter both runs of step 1 are the reference, so their differences are 0 by construction.

`partitioner.compile` captures each call as one graph node that dispatches when it runs (every `kernels` function
is an fx leaf, however it is imported): the compiled model runs the same kernel. Step 3 checks it is a node.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import partitioner
from partitioner.kernels import slot_attention

# (tolerance, floor) per dtype: a tensor passes within tolerance x its scale, the scale being its largest reference
# magnitude but at least floor x the largest gradient. The floor is there because some gradients are 0 in exact
# arithmetic (norm_slots.bias: a shift shared by every slot's query leaves the softmax over slots unchanged) and
# others are sums over tokens that cancel. fp32 paths differ by summation order only; in bf16 the reference rounds
# every intermediate and the kernel accumulates in fp32, so only errors at the largest gradient's scale mean much.
TOL = {torch.float32: (1e-5, 1e-3), torch.bfloat16: (5e-2, 1.0)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class SlotAttention(nn.Module):
    """Iterative Slot Attention with learned initial slots (deterministic: every path sees the same slots)."""

    def __init__(self, dim: int, slots: int, iters: int, backend: str = "auto") -> None:
        super().__init__()
        self.iters = iters
        self.backend = backend  # a Python string: fx bakes its value into the graph at compile time
        self.init = nn.Parameter(torch.randn(slots, dim) * dim**-0.5)
        self.norm_inputs, self.norm_slots, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, N, D) -> slots (B, S, D) and the last iteration's attention (B, S, N)."""
        x = self.norm_inputs(tokens)
        k, v = self.to_k(x), self.to_v(x)  # (B, N, D), the same at every iteration
        slots = self.init.expand(tokens.shape[0], -1, -1)  # (B, S, D)
        attn = None
        for _ in range(self.iters):
            q = self.to_q(self.norm_slots(slots))  # (B, S, D)
            # The fused step: softmax over slots, renormalised over tokens; attn (B, S, N) is returned for the decoder
            updates, attn = slot_attention(q, k, v, return_attn=True, backend=self.backend)
            slots = self.gru(updates.flatten(0, 1), slots.flatten(0, 1)).view_as(slots)  # GRUCell wants (B*S, D)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots, attn


class ObjectAutoencoder(nn.Module):
    """images (B, 3, H, W) -> reconstruction (B, 3, H, W) through `slots` slot vectors."""

    def __init__(self, size: int, dim: int = 32, slots: int = 4, iters: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1))
        self.position = nn.Parameter(torch.randn(size * size, dim) * 0.02)  # learned, one per pixel
        self.slot_attention = SlotAttention(dim, slots, iters)
        self.to_rgb = nn.Linear(dim, 3)
        with torch.no_grad():  # start near a black image, so the first steps learn colours rather than undo them
            self.to_rgb.weight.mul_(0.1)
            self.to_rgb.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(images).flatten(2).transpose(1, 2) + self.position  # (B, N = H*W, D)
        slots, attn = self.slot_attention(tokens)
        # Each pixel is the attention-weighted mix of the slots' colours (attn sums to 1 over slots per token)
        pixels = torch.einsum("bsn,bsc->bcn", attn, self.to_rgb(slots))  # (B, 3, N)
        return pixels.reshape(images.shape)


def synthetic_images(batch: int, size: int, objects: int = 3, seed: int = 0) -> torch.Tensor:
    """(B, 3, size, size): black images with `objects` randomly placed squares of random colours each."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.zeros(batch, 3, size, size)
    for b in range(batch):
        for _ in range(objects):
            side = int(torch.randint(2, size // 2 + 1, (1,), generator=gen))
            y, x = torch.randint(0, size - side + 1, (2,), generator=gen).tolist()
            images[b, :, y : y + side, x : x + side] = torch.rand(3, 1, 1, generator=gen)
    return images


def forward_backward(
    model: ObjectAutoencoder, images: torch.Tensor, backend: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The output and every parameter's gradient of the reconstruction loss, with slot_attention on `backend`."""
    model.slot_attention.backend = backend
    model.zero_grad(set_to_none=True)
    out = model(images)
    F.mse_loss(out.float(), images.float()).backward()
    return out.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def check_against_reference(model: ObjectAutoencoder, images: torch.Tensor) -> None:
    """Step 1: forward and backward with the kernel and with the reference, same weights and inputs."""
    try:  # "triton" raises where Triton cannot run (that is how we know which path "auto" takes)
        out, grads = forward_backward(model, images, "triton")
        path = "Triton interpreter (TRITON_INTERPRET=1)" if images.device.type == "cpu" else "Triton on GPU"
    except RuntimeError as e:
        if "backend='triton' cannot run here" not in str(e):
            raise
        out, grads = forward_backward(model, images, "auto")
        path = f"reference fallback ({str(e).split(': ', 1)[1]}); both runs are the reference"
    ref_out, ref_grads = forward_backward(model, images, "reference")
    model.slot_attention.backend = "auto"
    print(f"kernel path: {path}")

    tol, floor = TOL[images.dtype]
    floor *= max(g.abs().max().item() for g in ref_grads.values())
    pairs = {"output": (out, ref_out)} | {name: (grads[name], ref_grads[name]) for name in grads}
    diffs, relative = {}, {}
    for name, (got, ref) in pairs.items():
        got, ref = got.float(), ref.float()
        scale = max(ref.abs().max().item(), 0.0 if name == "output" else floor)
        torch.testing.assert_close(got, ref, atol=tol * scale, rtol=tol, msg=lambda m, name=name: f"{name}: {m}")
        diffs[name] = (got - ref).abs().max().item()
        relative[name] = diffs[name] / scale if scale > 0 else 0.0
    worst = max(relative, key=relative.get)
    print(f"max |kernel - reference|: output {diffs.pop('output'):.3e}, gradients {max(diffs.values()):.3e}")
    print(f"largest relative to its tensor's scale: {relative[worst]:.3e} ({worst}); asserted below {tol:g}")


def train(model: ObjectAutoencoder, images: torch.Tensor, steps: int, lr: float) -> None:
    """Step 2: a few AdamW steps on one fixed batch (the loss should fall; nothing asserts that)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        loss = F.mse_loss(model(images).float(), images.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"step {step}: loss {loss.item():.5f}")


def compile_and_compare(model: ObjectAutoencoder, images: torch.Tensor) -> None:
    """Step 3: two pipeline stages in this process; their output must equal the plain model's exactly."""
    # device_type prices the plan; the stages hold the model's own weights and run on its device
    cm = partitioner.compile(model, devices=2, example_inputs=(images,), device_type="cpu", pipeline=2)
    print("\n".join(cm.plan.summary().splitlines()[:6]))
    # Where the kernel went: fx records each call as one call_function node, which dispatches when it runs
    calls = [i for i, stage in enumerate(cm.stage_modules) for n in stage.graph.nodes if n.target is slot_attention]
    how = f"captured with {cm.plan.capture}"
    assert calls, f"{how}: slot_attention is not a graph node, the compiled model runs its reference's ops instead"
    print(f"{how}: slot_attention is {len(calls)} leaf call(s) in stage(s) {sorted(set(calls))}")

    with torch.no_grad():
        expected, got = model(images), cm(images)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    print(f"compiled output equals the plain model's (max abs difference {(got - expected).abs().max().item():.1e})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="training steps (default: %(default)s)")
    parser.add_argument("--slots", type=int, default=4, help="slots per image (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=3, help="slot attention iterations (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=4, help="images per batch (default: %(default)s)")
    parser.add_argument("--size", type=int, default=8, help="image side; tokens = size^2 (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=32, help="token and slot width (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default: %(default)s)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default="float32", help="model and image dtype (default: %(default)s)"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="model device (default: %(default)s)")
    args = parser.parse_args(argv)
    if min(args.slots, args.iters, args.batch, args.dim) < 1 or args.size < 4 or args.steps < 0:
        parser.error("--slots, --iters, --batch and --dim must be at least 1, --size at least 4, --steps at least 0")

    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    model = ObjectAutoencoder(args.size, args.dim, args.slots, args.iters).to(args.device, dtype)
    images = synthetic_images(args.batch, args.size).to(args.device, dtype)
    print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters())} parameters, "
          f"images {tuple(images.shape)} {args.dtype} on {args.device}")  # fmt: skip

    for title, run in (
        ("1. kernel against reference", lambda: check_against_reference(model, images)),
        ("2. train", lambda: train(model, images, args.steps, args.lr)),
        ("3. partitioner.compile", lambda: compile_and_compare(model, images)),
    ):
        start = time.perf_counter()
        print(f"\n== {title}")
        run()
        print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
