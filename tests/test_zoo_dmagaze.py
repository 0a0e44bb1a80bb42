"""DMAGaze (zoo/dmagaze.py): parameter count, shapes, gradients, tracing, loss, metric and a tiny overfit run."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import zoo.dmagaze as dmagaze  # importing registers the presets
from partitioner.kernels.msglam import msglam_attention
from zoo.registry import entry, example_inputs, example_targets, get, loss_fn, names

# ----------------------------------------------------------------------------------------------------------------
# Parameter count, derived from the layer list of the paper / issue (not from the code under test)
# ----------------------------------------------------------------------------------------------------------------


def _conv(c_in: int, c_out: int, k: int, bias: bool = True, groups: int = 1) -> int:
    return c_out * (c_in // groups) * k * k + (c_out if bias else 0)


def _bn(c: int) -> int:
    return 2 * c


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def _resnet34() -> int:
    total = _conv(3, 64, 7, bias=False) + _bn(64)  # stem
    c_in = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for j in range(blocks):
            cin = c_in if j == 0 else width
            total += _conv(cin, width, 3, bias=False) + _bn(width) + _conv(width, width, 3, bias=False) + _bn(width)
            if j == 0 and cin != width:  # projection shortcut
                total += _conv(cin, width, 1, bias=False) + _bn(width)
        c_in = width
    return total


def _msglam() -> int:
    total = _conv(64, 64, 3)  # the shared group conv
    for w in (64, 128, 192, 256):  # stage widths
        total += 2 * _linear(w, w // 2) + _linear(w, w) + 1  # q, k, v 1x1 projections and sigma
        total += 2 * w * (w // 16) + 2 * 7 * 7  # CBAM: channel MLP (no biases), 7x7 spatial conv (no bias)
        total += _conv(2 * w, w, 1)  # tail
    total += _conv(896, 896, 1, groups=896) + _conv(896, 896, 3, groups=896) + _conv(896, 896, 5, groups=896)
    return total + _conv(3 * 896, 256, 1) + _bn(256)


def _dmagaze_param_count() -> int:
    head_pose = _conv(512, 128, 3) + _bn(128) + _linear(6272, 128) + _linear(128, 32)
    eyes = 2 * (_conv(3, 32, 3) + _bn(32) + _conv(32, 64, 3) + _bn(64)) + _linear(17280, 128) + _linear(128, 32)
    disentangler = _conv(512, 256, 3) + _bn(256) + 256 * 7 * 7  # + the mask logits
    heads = 2 * (_linear(256 * 7 * 7, 256) + _conv(256, 128, 1) + _bn(128))
    decoder = _linear(128, 512 * 7 * 7) + sum(
        _conv(c_in, c_out, 4) for c_in, c_out in ((512, 256), (256, 128), (128, 64), (64, 32), (32, 3))
    )
    gaze = 2 * (_linear(192, 32) + _linear(32, 1))
    return _resnet34() + head_pose + eyes + disentangler + _msglam() + heads + decoder + gaze


def test_registered() -> None:
    assert names("dmagaze") == ["dmagaze", "dmagaze-tiny"]
    assert entry("dmagaze").loss is dmagaze.dmagaze_loss


def test_param_count_on_meta() -> None:
    with torch.device("meta"):
        model = get("dmagaze")
    n = sum(p.numel() for p in model.parameters())
    print(f"dmagaze parameters: {n:,}")
    assert all(p.is_meta for p in model.parameters())
    assert n == _dmagaze_param_count() == 39_924_657


def test_flops_on_meta() -> None:
    """The partitioner's annotate pass: FlopCounterMode over meta tensors (the attention's reference path)."""
    with torch.device("meta"):
        model = get("dmagaze")
    inputs = example_inputs("dmagaze", batch=2, device="meta")
    assert [tuple(t.shape) for t in inputs] == [(2, 3, 224, 224), (2, 3, 36, 60), (2, 3, 36, 60), (2, 2, 4)]
    with FlopCounterMode(display=False) as counter:
        gaze, recon_eye, recon_rest, mask = model(*inputs)
    assert gaze.shape == (2, 2) and recon_eye.shape == recon_rest.shape == (2, 3, 224, 224)
    assert mask.shape == (2, 1, 224, 224)
    assert counter.get_total_flops() > 2 * 2 * 3.6e9  # more than ResNet-34's ~3.6 GMAC per sample


# ----------------------------------------------------------------------------------------------------------------
# dmagaze-tiny on the CPU
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_tiny_forward_backward(backend: str) -> None:
    torch.manual_seed(0)
    model = get("dmagaze-tiny", attention_backend=backend)
    inputs = example_inputs("dmagaze-tiny", batch=2)
    targets = example_targets("dmagaze-tiny", batch=2)
    # face (2, 3, 96, 96), eyes (2, 3, 12, 20), boxes (2, 2, 4)
    #   -> gaze (2, 2), recon_eye and recon_rest (2, 3, 96, 96), eye_mask (2, 1, 96, 96)
    assert [tuple(t.shape) for t in inputs] == [(2, 3, 96, 96), (2, 3, 12, 20), (2, 3, 12, 20), (2, 2, 4)]
    out = model(*inputs)
    assert [tuple(t.shape) for t in out] == [(2, 2), (2, 3, 96, 96), (2, 3, 96, 96), (2, 1, 96, 96)]
    loss = loss_fn("dmagaze-tiny")(out, targets)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    # the learnable sigmas and the disentangler mask are trained
    assert model.msglam.stages[0].attn.log_sigma.grad.abs() > 0
    assert model.disentangler.mask_logits.grad.abs().sum() > 0


def test_tiny_backends_agree() -> None:
    torch.manual_seed(0)
    model = get("dmagaze-tiny").eval()
    inputs = example_inputs("dmagaze-tiny", batch=2)
    ref = model(*inputs)
    for stage in model.msglam.stages:
        stage.attn.backend = "triton"
    tri = model(*inputs)
    for a, b in zip(ref, tri, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_symbolic_trace_equals_eager() -> None:
    torch.manual_seed(0)
    model = get("dmagaze-tiny", attention_backend="reference").eval()
    gm = torch.fx.symbolic_trace(model)
    leaves = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is msglam_attention]
    assert len(leaves) == 2 * 4 * 4  # 2 branches x 4 MS-GLAM passes x 4 stages
    inputs = example_inputs("dmagaze-tiny", batch=3, seed=1)
    for a, b in zip(gm(*inputs), model(*inputs), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_example_data_deterministic_and_meta() -> None:
    a, b = example_inputs("dmagaze-tiny", batch=2), example_inputs("dmagaze-tiny", batch=2)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    gaze, face = example_targets("dmagaze-tiny", batch=2)
    assert torch.equal(face, a[0]) and gaze.shape == (2, 2)
    assert all(t.is_meta for t in example_inputs("dmagaze", batch=1, device="meta"))


def test_eye_mask_matches_boxes() -> None:
    model = get("dmagaze-tiny")
    boxes = torch.tensor([[[10.0, 20.0, 14.0, 23.0], [50.0, 20.0, 52.0, 22.0]]])  # (1, 2, 4) x0, y0, x1, y1
    mask = model.eye_mask(boxes)  # (1, 1, 96, 96)
    expected = torch.zeros(1, 1, 96, 96)
    expected[..., 20:23, 10:14] = 1.0
    expected[..., 20:22, 50:52] = 1.0
    assert torch.equal(mask, expected)


def test_loss_is_one_one_one() -> None:
    face = torch.rand(1, 3, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1.0  # 4 eye pixels, 12 rest pixels
    gaze_t = torch.tensor([[0.2, -0.1]])
    gaze = gaze_t + torch.tensor([[0.1, -0.3]])  # L1 = 0.2
    recon_eye = face + 0.5 * mask + 7.0 * (1 - mask)  # eye-region error 0.5 (MSE 0.25); outside is ignored
    recon_rest = face + 0.2 * (1 - mask) - 9.0 * mask  # rest-region error 0.2 (MSE 0.04); eyes are ignored
    loss = dmagaze.dmagaze_loss((gaze, recon_eye, recon_rest, mask), (gaze_t, face))
    torch.testing.assert_close(loss, torch.tensor(0.2 + 0.25 + 0.04))


def test_angular_error() -> None:
    half_pi = math.pi / 2
    pred = torch.tensor([[0.0, 0.0], [half_pi, 0.0], [0.3, 0.2], [0.0, half_pi]])
    target = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.3, 0.2], [0.0, 0.0]])
    torch.testing.assert_close(
        dmagaze.angular_error(pred, target), torch.tensor([0.0, 90.0, 0.0, 90.0]), atol=1e-3, rtol=0
    )
    # 3-vectors are accepted too; pitch 0.1 vs -0.1 at yaw 0 is 0.2 rad apart
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([-1.0, 0.0, 0.0])
    torch.testing.assert_close(dmagaze.angular_error(a, b), torch.tensor(180.0), atol=1e-2, rtol=0)
    err = dmagaze.angular_error(torch.tensor([0.0, 0.1]), torch.tensor([0.0, -0.1]))
    torch.testing.assert_close(err, torch.tensor(math.degrees(0.2)), atol=1e-3, rtol=0)
    torch.testing.assert_close(dmagaze.gaze_to_vector(torch.zeros(2)), torch.tensor([0.0, 0.0, -1.0]))


def test_tiny_overfits_fixed_batch() -> None:
    torch.manual_seed(0)
    model = get("dmagaze-tiny", attention_backend="reference")  # the interpreter is too slow for 50 steps
    inputs = example_inputs("dmagaze-tiny", batch=4, seed=3)
    targets = example_targets("dmagaze-tiny", batch=4, seed=3)
    loss_of = loss_fn("dmagaze-tiny")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(50):
        opt.zero_grad()
        loss = loss_of(model(*inputs), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"dmagaze-tiny overfit: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] <= 0.5 * losses[0]


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="valid fields: face_size"):
        get("dmagaze-tiny", not_a_field=1)
    with pytest.raises(ValueError, match="glam_groups=3"):
        get("dmagaze-tiny", glam_groups=3)
    with pytest.raises(ValueError, match="face_size=100"):
        get("dmagaze-tiny", face_size=100)
    with pytest.raises(ValueError, match="attention_backend"):
        get("dmagaze-tiny", attention_backend="cuda")
    with pytest.raises(ValueError, match="cbam_reduction=16"):
        get("dmagaze-tiny", cbam_reduction=16)
