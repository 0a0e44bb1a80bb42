"""DMAGaze (arXiv 2504.11160, "Gaze Estimation Based on Disentanglement and Multi-Scale Attention").

Face (B, 3, 224, 224), left and right eye crops (B, 3, 36, 60) and the two eye boxes in face pixels go in; the gaze
(yaw, pitch) in radians and two 224x224 reconstructions come out. Written plainly (nanoGPT style):

    face --ResNet-34 to layer4--> f (512, 7, 7)
      f --HeadPose: conv3x3 512->128, BN, ReLU, FC 6272->128->32--> head (32)
      f --Disentangler: conv3x3 512->256, BN, ReLU--> d;  eye = m * d,  rest = (1 - m) * d,  m = sigmoid(mask_logits)
      eye, rest --MS-GLAM x4 (shared weights, shared by both branches)--> (256, 7, 7) each
      each --flatten, Linear 12544->256, view (256, 1, 1), conv1x1 256->128, BN, ReLU--> p_eye, p_rest (128)
      p_eye, p_rest --shared decoder: Linear 128->512*7*7, ReLU, 5 x ConvTranspose(4, 2, 1), sigmoid--> recon 1, 2
    eyes --per eye conv3x3(32)-BN-ReLU-pool, conv3x3(64)-BN-ReLU-pool; concat; FC 17280->128->32--> eyes (32)
    yaw, pitch = MLP_yaw, MLP_pitch(concat(eyes, p_eye, head))   (192 -> 32 -> 1 each)

MS-GLAM (one pass; `MSGLAM.forward` repeats it `glam_iterations` = 4 times with the same weights). Following the
authors' code (`MultiScaleConvCBAMNonLocalDecouple`), with g = C / groups = 64:
    split x (256) into 4 groups of 64; a single conv3x3 64->64 (shared by the groups) turns group i into s_i;
    stage 0 input  = s_0                                (64 channels)
    stage i input  = concat(stage i-1 output, s_i)      ((i + 1) * 64 channels: 128, 192, 256)
    stage i output = conv1x1(concat(CBAM(in), NonLocal(in)))  2w -> w, w = (i + 1) * 64; per-stage weights
    fused = concat(x, out_0..out_3)                     256 + 64 + 128 + 192 + 256 = 896 channels
    x'   = ReLU(BN(conv1x1(concat(dw1x1, dw3x3, dw5x5 of fused))))   depthwise 896 each, pointwise 2688 -> 256
The issue's "896 = 256 + 4 x 160" is this bookkeeping: the stage widths grow 64, 128, 192, 256 (mean 160) because
each stage sees the previous stage's output concatenated with its own group. Both attentions of a stage are one
call of `kernels.msglam.msglam_attention` (a leaf for torch.fx): 4 per pass, 16 per branch, 32 per forward. It is
one fused Triton launch (forward and backward) on CUDA or under TRITON_INTERPRET=1, and the plain-PyTorch
reference on meta / FakeTensors / under FlopCounterMode or with `attention_backend="reference"`.

Choices, and where we follow or leave the authors' code (github.com/Sajelhhh/DMAGaze, model/model.py, train.py):
- Disentangler mask: m = sigmoid(mask_logits), mask_logits (256, 7, 7) learnable, initialised N(0, 1) so the two
  branches differ from the first step (the paper's continuous learnable mask). The code's fixed random 0/1
  tensor created lazily in forward is a defect (not a learned mask, not in the state dict at init); not copied.
- Non-local attention: softmax over the logits -||q - k||^2 / 2 sigma^2 (the code softmaxes exp of that, which is
  nearly uniform) and a proper (B, N, C) -> (B, C, H, W) transpose (the code uses .view); sigma = exp(log_sigma),
  init 1 as in the code. See partitioner/kernels/msglam.py.
- CBAM: channel gate then spatial gate in sequence on the stage input (the CBAM paper and the code); the CBAM and
  non-local outputs are computed in parallel from the same input and concatenated (code and paper).
- Gaze MLPs: Linear(192, 32), ReLU, Linear(32, 1). The code has no nonlinearity between the two Linears (a
  collapsible linear map); the paper calls them MLPs. Same parameter count either way.
- Conv biases: kept wherever the code has them (every conv outside the ResNet, CBAM MLP/spatial convs excepted);
  the ResNet is torchvision's layout (bias-free convs, BN), written here, randomly initialised (no pretrained
  weights: no downloads in this project).
- Branch heads: Linear(C*7*7 -> 256), then `.view(B, 256, 1, 1)` and conv1x1 256->128 + BN + ReLU, as in the
  code. The 1x1 conv on a 1x1 map makes BatchNorm use batch statistics over B only: train with batch >= 2.
- Losses 1:1:1 (`dmagaze_loss`): L1 on (yaw, pitch); MSE of reconstruction 1 against the face inside the eye
  boxes; MSE of reconstruction 2 against the face outside them. The code crops both eyes out of reconstruction 1,
  resizes them to 36x60 and compares with the eye inputs, and compares three rectangular non-eye strips of
  reconstruction 2; we use the same regions as a pixel mask in face coordinates (batched, traceable, no
  per-sample Python loop). The mask is computed inside the model from the `eye_boxes` input and returned.
- Only the eye branch feeds gaze (code: `cat(eyes_features, p_1, head_pose)`); the rest branch is trained by the
  reconstruction loss alone.

Invariants: builds under `with torch.device("meta"):`; traceable by `torch.fx.symbolic_trace` (no control flow on
tensor values; `msglam_attention` recorded as one call_function); runs under FlopCounterMode on meta (the
attention's reference path). Inputs, in order: face (B, 3, F, F), left_eye (B, 3, h, w), right_eye (B, 3, h, w),
eye_boxes (B, 2, 4) float (x0, y0, x1, y1) in face pixels, half-open, [left, right]. Output: a tuple
(gaze (B, 2) [yaw, pitch], recon_eye (B, 3, F, F), recon_rest (B, 3, F, F), eye_mask (B, 1, F, F)).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from partitioner.kernels.msglam import msglam_attention
from zoo.common import preset_config
from zoo.registry import ModelEntry, register

__all__ = [
    "DMAGazeConfig",
    "DMAGaze",
    "PRESETS",
    "dmagaze_loss",
    "angular_error",
    "gaze_to_vector",
    "example_inputs",
    "example_targets",
]

_BACKENDS = ("auto", "triton", "reference")


@dataclass(frozen=True, kw_only=True)
class DMAGazeConfig:
    """Sizes of one DMAGaze model; the defaults are the paper's."""

    face_size: int = 224  # face crop side; the backbone's stride is 32, so features are (face_size / 32)^2
    eye_size: tuple[int, int] = (36, 60)  # (h, w) of each eye crop; two 2x pools -> (h / 4, w / 4)
    backbone_width: int = 64  # ResNet stem width; its four stages are 1, 2, 4, 8 x this (512 out for ResNet-34)
    backbone_blocks: tuple[int, int, int, int] = (3, 4, 6, 3)  # BasicBlocks per stage: ResNet-34
    head_pose_channels: int = 128  # conv3x3 of the head-pose branch
    hidden: int = 128  # FC hidden width of the head-pose and eye branches
    embed_dim: int = 32  # head-pose and eye feature widths fed to the gaze MLPs
    eye_channels: tuple[int, int] = (32, 64)  # the two conv widths of each eye encoder
    disentangle_channels: int = 256  # C of the disentangled maps and of MS-GLAM
    glam_groups: int = 4  # MS-GLAM splits C into this many groups (stage widths g, 2g, ..., C)
    glam_iterations: int = 4  # MS-GLAM passes, same weights
    cbam_reduction: int = 16  # CBAM channel-MLP reduction (hidden = stage width // this)
    cbam_kernel: int = 7  # CBAM spatial conv size (odd)
    branch_dim: int = 256  # Linear(flattened branch -> branch_dim)
    branch_channels: int = 128  # the 1x1 conv after it; also the decoder's input width
    decoder_channels: tuple[int, int, int, int, int] = (512, 256, 128, 64, 32)  # inputs of the 5 ConvTranspose
    gaze_hidden: int = 32  # yaw / pitch MLP hidden width
    attention_backend: str = "auto"  # msglam_attention backend: "auto", "triton" or "reference"

    def __post_init__(self) -> None:
        positive = (
            "face_size",
            "backbone_width",
            "head_pose_channels",
            "hidden",
            "embed_dim",
            "disentangle_channels",
            "glam_groups",
            "glam_iterations",
            "cbam_reduction",
            "cbam_kernel",
            "branch_dim",
            "branch_channels",
            "gaze_hidden",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"DMAGazeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.face_size % 32:
            raise ValueError(f"DMAGazeConfig.face_size={self.face_size} must be a multiple of 32 (backbone stride)")
        if len(self.eye_size) != 2 or any(s < 4 or s % 4 for s in self.eye_size):
            raise ValueError(f"DMAGazeConfig.eye_size={self.eye_size} must be (h, w), both multiples of 4")
        if len(self.backbone_blocks) != 4 or min(self.backbone_blocks) < 1:
            raise ValueError(f"DMAGazeConfig.backbone_blocks={self.backbone_blocks} must be 4 counts >= 1")
        if len(self.decoder_channels) != 5 or min(self.decoder_channels) < 1:
            raise ValueError(f"DMAGazeConfig.decoder_channels={self.decoder_channels} must be 5 widths >= 1")
        C, G = self.disentangle_channels, self.glam_groups
        if C % G or (C // G) % 2:
            raise ValueError(
                f"DMAGazeConfig: disentangle_channels={C} must split into glam_groups={G} groups of even width "
                f"(q, k have half the channels); C / groups = {C / G}"
            )
        if C // G < self.cbam_reduction:
            raise ValueError(
                f"DMAGazeConfig: the narrowest stage ({C // G} channels) is below cbam_reduction="
                f"{self.cbam_reduction}; its CBAM MLP would have no hidden unit"
            )
        if self.cbam_kernel % 2 == 0:
            raise ValueError(f"DMAGazeConfig.cbam_kernel={self.cbam_kernel} must be odd")
        if self.attention_backend not in _BACKENDS:
            raise ValueError(f"DMAGazeConfig.attention_backend={self.attention_backend!r}; valid: {_BACKENDS}")

    @property
    def feature_size(self) -> int:
        """Side of the backbone's output map (7 for a 224 face)."""
        return self.face_size // 32


PRESETS: dict[str, dict[str, Any]] = {
    "dmagaze": {},  # the paper: 224 face, 36x60 eyes, ResNet-34, C = 256 in 4 groups of 64
    # For tests: 96 face (3x3 = 9 tokens, odd), 12x20 eyes, ResNet with one block per stage and width 8,
    # C = 32 in 4 groups of 8 (stage widths 8, 16, 24, 32; CBAM reduction 4 keeps >= 2 hidden units).
    "dmagaze-tiny": dict(
        face_size=96,
        eye_size=(12, 20),
        backbone_width=8,
        backbone_blocks=(1, 1, 1, 1),
        head_pose_channels=16,
        hidden=32,
        embed_dim=8,
        eye_channels=(8, 16),
        disentangle_channels=32,
        cbam_reduction=4,
        branch_dim=32,
        branch_channels=16,
        decoder_channels=(32, 16, 16, 8, 8),
        gaze_hidden=8,
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# Backbone and the two small branches
# ----------------------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN plus the (projected when the shape changes) input, ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class ResNetBackbone(nn.Module):
    """ResNet stem + layer1..layer4 (no pooling head): (B, 3, F, F) -> (B, 8 * width, F / 32, F / 32)."""

    def __init__(self, cfg: DMAGazeConfig) -> None:
        super().__init__()
        w = cfg.backbone_width
        self.conv1 = nn.Conv2d(3, w, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        layers, c_in = [], w
        for i, n_blocks in enumerate(cfg.backbone_blocks):
            c_out, stride = w * 2**i, 1 if i == 0 else 2
            layers.append(
                nn.Sequential(
                    *[BasicBlock(c_in if j == 0 else c_out, c_out, stride if j == 0 else 1) for j in range(n_blocks)]
                )
            )
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.out_channels = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))  # (B, w, F/4, F/4)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 8w, F/32, F/32)


class HeadPoseBranch(nn.Module):
    """(B, 8w, s, s) -> conv3x3 -> BN -> ReLU -> flatten -> FC -> ReLU -> FC -> (B, embed_dim)."""

    def __init__(self, cfg: DMAGazeConfig, c_in: int) -> None:
        super().__init__()
        s = cfg.feature_size
        self.conv = nn.Conv2d(c_in, cfg.head_pose_channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(cfg.head_pose_channels)
        self.fc1 = nn.Linear(cfg.head_pose_channels * s * s, cfg.hidden)
        self.fc2 = nn.Linear(cfg.hidden, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x))).flatten(1)  # (B, 128 * s * s)
        return self.fc2(F.relu(self.fc1(x)))  # (B, 32)


def _eye_encoder(c1: int, c2: int) -> nn.Sequential:
    """(B, 3, h, w) -> (B, c2, h / 4, w / 4)."""
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


class EyeBranch(nn.Module):
    """Separate encoders per eye, concatenated: (B, 2 * c2 * h/4 * w/4) -> FC -> ReLU -> FC -> (B, embed_dim)."""

    def __init__(self, cfg: DMAGazeConfig) -> None:
        super().__init__()
        c1, c2 = cfg.eye_channels
        h, w = cfg.eye_size
        self.left = _eye_encoder(c1, c2)
        self.right = _eye_encoder(c1, c2)
        self.fc1 = nn.Linear(2 * c2 * (h // 4) * (w // 4), cfg.hidden)  # 17280 -> 128 for the paper's sizes
        self.fc2 = nn.Linear(cfg.hidden, cfg.embed_dim)

    def forward(self, left_eye: torch.Tensor, right_eye: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.left(left_eye), self.right(right_eye)], dim=1).flatten(1)  # (B, 2 * 64 * 9 * 15)
        return self.fc2(F.relu(self.fc1(x)))  # (B, 32)


class Disentangler(nn.Module):
    """(B, 8w, s, s) -> conv3x3 -> BN -> ReLU -> d (B, C, s, s); returns (m * d, (1 - m) * d), m = sigmoid(logits)."""

    def __init__(self, cfg: DMAGazeConfig, c_in: int) -> None:
        super().__init__()
        C, s = cfg.disentangle_channels, cfg.feature_size
        self.conv = nn.Conv2d(c_in, C, 3, padding=1)
        self.bn = nn.BatchNorm2d(C)
        self.mask_logits = nn.Parameter(torch.empty(C, s, s))  # continuous learnable mask (see the docstring)
        nn.init.normal_(self.mask_logits)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = F.relu(self.bn(self.conv(x)))  # (B, C, s, s)
        m = torch.sigmoid(self.mask_logits)  # (C, s, s), broadcast over the batch
        return m * d, (1.0 - m) * d


# ----------------------------------------------------------------------------------------------------------------
# MS-GLAM
# ----------------------------------------------------------------------------------------------------------------


class GlobalLocalAttention(nn.Module):
    """Parameters of one stage's Gaussian non-local + CBAM attention; forward = `msglam_attention`.

    Kept as raw tensors (1x1 convs as (out, in) matrices) because the fused op takes them so.
    """

    def __init__(self, channels: int, cbam_reduction: int, cbam_kernel: int, backend: str) -> None:
        super().__init__()
        C, D, R, K = channels, channels // 2, channels // cbam_reduction, cbam_kernel
        self.backend = backend
        self.wq, self.bq = nn.Parameter(torch.empty(D, C)), nn.Parameter(torch.empty(D))
        self.wk, self.bk = nn.Parameter(torch.empty(D, C)), nn.Parameter(torch.empty(D))
        self.wv, self.bv = nn.Parameter(torch.empty(C, C)), nn.Parameter(torch.empty(C))
        self.log_sigma = nn.Parameter(torch.zeros(()))  # sigma = 1 at init, as in the authors' code
        self.ca_w1 = nn.Parameter(torch.empty(R, C))  # CBAM channel MLP, no biases
        self.ca_w2 = nn.Parameter(torch.empty(C, R))
        self.sa_w = nn.Parameter(torch.empty(1, 2, K, K))  # CBAM spatial conv, no bias
        # nn.Conv2d's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
        for p, fan_in in (
            (self.wq, C),
            (self.bq, C),
            (self.wk, C),
            (self.bk, C),
            (self.wv, C),
            (self.bv, C),
            (self.ca_w1, C),
            (self.ca_w2, R),
            (self.sa_w, 2 * K * K),
        ):
            nn.init.uniform_(p, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return msglam_attention(
            x,
            self.wq,
            self.bq,
            self.wk,
            self.bk,
            self.wv,
            self.bv,
            self.log_sigma,
            self.ca_w1,
            self.ca_w2,
            self.sa_w,
            backend=self.backend,
        )  # 2 x (B, C, H, W)


class GLAMStage(nn.Module):
    """concat(CBAM(x), NonLocal(x)) -> conv1x1 2w -> w."""

    def __init__(self, width: int, cfg: DMAGazeConfig) -> None:
        super().__init__()
        self.attn = GlobalLocalAttention(width, cfg.cbam_reduction, cfg.cbam_kernel, cfg.attention_backend)
        self.tail = nn.Conv2d(2 * width, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nonlocal_out, cbam_out = self.attn(x)
        return self.tail(torch.cat([cbam_out, nonlocal_out], dim=1))  # (B, w, s, s)


class MSGLAM(nn.Module):
    """Multi-scale global-local attention, applied `glam_iterations` times with shared weights: (B, C, s, s) -> same."""

    def __init__(self, cfg: DMAGazeConfig) -> None:
        super().__init__()
        C, G = cfg.disentangle_channels, cfg.glam_groups
        self.groups, self.group_width, self.iterations = G, C // G, cfg.glam_iterations
        g = self.group_width
        self.sub_conv = nn.Conv2d(g, g, 3, padding=1)  # one conv shared by all groups (authors' code)
        self.stages = nn.ModuleList([GLAMStage((i + 1) * g, cfg) for i in range(G)])
        fused = C + g * G * (G + 1) // 2  # 256 + 64 (1 + 2 + 3 + 4) = 896
        self.dw1 = nn.Conv2d(fused, fused, 1, groups=fused)
        self.dw3 = nn.Conv2d(fused, fused, 3, padding=1, groups=fused)
        self.dw5 = nn.Conv2d(fused, fused, 5, padding=2, groups=fused)
        self.pw = nn.Conv2d(3 * fused, C, 1)
        self.bn = nn.BatchNorm2d(C)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        g = self.group_width
        outs: list[torch.Tensor] = []
        for i, stage in enumerate(self.stages):
            s_i = self.sub_conv(x[:, i * g : (i + 1) * g])  # (B, g, s, s)
            outs.append(stage(s_i if i == 0 else torch.cat([outs[-1], s_i], dim=1)))  # (B, (i + 1) g, s, s)
        fused = torch.cat([x, *outs], dim=1)  # (B, 896, s, s)
        fused = torch.cat([self.dw1(fused), self.dw3(fused), self.dw5(fused)], dim=1)  # (B, 2688, s, s)
        return F.relu(self.bn(self.pw(fused)))  # (B, C, s, s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.iterations):
            x = self.step(x)
        return x


# ----------------------------------------------------------------------------------------------------------------
# Heads, decoder, model
# ----------------------------------------------------------------------------------------------------------------


class BranchHead(nn.Module):
    """(B, C, s, s) -> flatten -> Linear -> (B, branch_dim, 1, 1) -> conv1x1 -> BN -> ReLU -> (B, branch_channels)."""

    def __init__(self, cfg: DMAGazeConfig) -> None:
        super().__init__()
        self.linear = nn.Linear(cfg.disentangle_channels * cfg.feature_size**2, cfg.branch_dim)
        self.conv = nn.Conv2d(cfg.branch_dim, cfg.branch_channels, 1)
        self.bn = nn.BatchNorm2d(cfg.branch_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x.flatten(1))[:, :, None, None]  # (B, 256, 1, 1)
        return F.relu(self.bn(self.conv(x))).flatten(1)  # (B, 128)


class Decoder(nn.Module):
    """(B, branch_channels) -> Linear -> ReLU -> (B, 512, s, s) -> 5 x (ConvTranspose 4/2/1) -> sigmoid (B, 3, F, F)."""

    def __init__(self, cfg: DMAGazeConfig) -> None:
        super().__init__()
        ch, s = cfg.decoder_channels, cfg.feature_size
        self.shape = (ch[0], s, s)
        self.fc = nn.Linear(cfg.branch_channels, ch[0] * s * s)
        widths = [*ch, 3]
        self.deconvs = nn.ModuleList(
            [nn.ConvTranspose2d(widths[i], widths[i + 1], 4, stride=2, padding=1) for i in range(5)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc(x)).view(-1, *self.shape)  # (B, 512, 7, 7)
        for deconv in self.deconvs[:-1]:
            x = F.relu(deconv(x))  # doubles the side: 14, 28, 56, 112
        return torch.sigmoid(self.deconvs[-1](x))  # (B, 3, 224, 224)


def _gaze_mlp(c_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class DMAGaze(nn.Module):
    """forward(face, left_eye, right_eye, eye_boxes) -> (gaze (B, 2), recon_eye, recon_rest, eye_mask); see the
    module docstring for shapes."""

    def __init__(self, cfg: DMAGazeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = ResNetBackbone(cfg)
        self.head_pose = HeadPoseBranch(cfg, self.backbone.out_channels)
        self.eyes = EyeBranch(cfg)
        self.disentangler = Disentangler(cfg, self.backbone.out_channels)
        self.msglam = MSGLAM(cfg)  # shared by both branches
        self.eye_head = BranchHead(cfg)
        self.rest_head = BranchHead(cfg)
        self.decoder = Decoder(cfg)  # shared by both reconstructions
        gaze_in = 2 * cfg.embed_dim + cfg.branch_channels  # 32 + 128 + 32 = 192
        self.yaw = _gaze_mlp(gaze_in, cfg.gaze_hidden)
        self.pitch = _gaze_mlp(gaze_in, cfg.gaze_hidden)
        # Pixel-centre coordinates for the eye mask (not parameters, not saved).
        coords = torch.arange(cfg.face_size, dtype=torch.float32) + 0.5
        self.register_buffer("pixel_x", coords.view(1, 1, 1, -1), persistent=False)  # (1, 1, 1, F)
        self.register_buffer("pixel_y", coords.view(1, 1, -1, 1), persistent=False)  # (1, 1, F, 1)

    def eye_mask(self, eye_boxes: torch.Tensor) -> torch.Tensor:
        """(B, 2, 4) boxes (x0, y0, x1, y1) -> (B, 1, F, F) float mask, 1 inside either box."""
        x0, y0, x1, y1 = (eye_boxes[:, :, i, None, None] for i in range(4))  # each (B, 2, 1, 1)
        inside = (self.pixel_x >= x0) & (self.pixel_x < x1) & (self.pixel_y >= y0) & (self.pixel_y < y1)
        return inside.any(dim=1, keepdim=True).to(eye_boxes.dtype)  # (B, 1, F, F)

    def forward(
        self, face: torch.Tensor, left_eye: torch.Tensor, right_eye: torch.Tensor, eye_boxes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.backbone(face)  # (B, 512, 7, 7)
        head = self.head_pose(f)  # (B, 32)
        eyes = self.eyes(left_eye, right_eye)  # (B, 32)
        eye_part, rest_part = self.disentangler(f)  # 2 x (B, 256, 7, 7)
        p_eye = self.eye_head(self.msglam(eye_part))  # (B, 128)
        p_rest = self.rest_head(self.msglam(rest_part))  # (B, 128)
        recon_eye, recon_rest = self.decoder(p_eye), self.decoder(p_rest)  # 2 x (B, 3, 224, 224)
        z = torch.cat([eyes, p_eye, head], dim=1)  # (B, 192)
        gaze = torch.cat([self.yaw(z), self.pitch(z)], dim=1)  # (B, 2) radians
        return gaze, recon_eye, recon_rest, self.eye_mask(eye_boxes)


# ----------------------------------------------------------------------------------------------------------------
# Loss, metric, synthetic data, registry
# ----------------------------------------------------------------------------------------------------------------


def dmagaze_loss(output: tuple[torch.Tensor, ...], targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """1:1:1 of L1(gaze), masked MSE(recon_eye, face) inside the eye boxes, masked MSE(recon_rest, face) outside.

    output = model(...) = (gaze (B, 2), recon_eye (B, 3, F, F), recon_rest (B, 3, F, F), eye_mask (B, 1, F, F));
    targets = (gaze (B, 2) radians, face (B, 3, F, F) in [0, 1]). Each MSE is a mean over its region's pixels and
    channels (a region with no pixels contributes 0).
    """
    gaze, recon_eye, recon_rest, mask = output
    target_gaze, face = targets
    channels = face.shape[1]
    eye_mse = ((recon_eye - face).pow(2) * mask).sum() / (mask.sum() * channels).clamp_min(1.0)
    rest = 1.0 - mask
    rest_mse = ((recon_rest - face).pow(2) * rest).sum() / (rest.sum() * channels).clamp_min(1.0)
    return F.l1_loss(gaze, target_gaze) + eye_mse + rest_mse


def gaze_to_vector(gaze: torch.Tensor) -> torch.Tensor:
    """(..., 2) [yaw, pitch] radians -> (..., 3) unit vectors (-cos p sin y, -sin p, -cos p cos y), as in gtools."""
    yaw, pitch = gaze[..., 0], gaze[..., 1]
    return torch.stack([-torch.cos(pitch) * torch.sin(yaw), -torch.sin(pitch), -torch.cos(pitch) * torch.cos(yaw)], -1)


def angular_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Angle in degrees between gaze directions, per sample: (..., 2) [yaw, pitch] radians or (..., 3) vectors."""
    a = gaze_to_vector(pred) if pred.shape[-1] == 2 else pred
    b = gaze_to_vector(target) if target.shape[-1] == 2 else target
    cos = F.cosine_similarity(a, b, dim=-1).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.acos(cos))


def _synthetic(cfg: DMAGazeConfig, batch: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic batch: random faces in [0, 1], eye boxes around (0.3 F, 0.4 F) and (0.7 F, 0.4 F) with a
    little jitter, eye crops cut from the faces at those boxes and resized, gaze uniform in [-0.5, 0.5] rad."""
    Fs, (h, w) = cfg.face_size, cfg.eye_size
    if device.type == "meta":
        empty = lambda *shape: torch.empty(*shape, device=device)  # noqa: E731
        return dict(
            face=empty(batch, 3, Fs, Fs),
            left=empty(batch, 3, h, w),
            right=empty(batch, 3, h, w),
            boxes=empty(batch, 2, 4),
            gaze=empty(batch, 2),
        )
    gen = torch.Generator(device="cpu").manual_seed(seed)
    face = torch.rand(batch, 3, Fs, Fs, generator=gen)
    box_w, box_h = max(2, round(0.25 * Fs)), max(2, round(0.15 * Fs))
    jitter = torch.randint(-Fs // 32, Fs // 32 + 1, (batch, 2, 2), generator=gen)
    centres = torch.tensor([[0.3 * Fs, 0.4 * Fs], [0.7 * Fs, 0.4 * Fs]]).round().long() + jitter  # (B, 2, 2) x, y
    x0, y0 = centres[..., 0] - box_w // 2, centres[..., 1] - box_h // 2
    boxes = torch.stack([x0, y0, x0 + box_w, y0 + box_h], dim=-1)  # (B, 2, 4)
    crops = [
        [
            F.interpolate(
                face[b : b + 1, :, y0[b, e] : y0[b, e] + box_h, x0[b, e] : x0[b, e] + box_w],
                size=(h, w),
                mode="bilinear",
                align_corners=False,
            )
            for e in range(2)
        ]
        for b in range(batch)
    ]
    left = torch.cat([c[0] for c in crops]) if batch else torch.empty(0, 3, h, w)
    right = torch.cat([c[1] for c in crops]) if batch else torch.empty(0, 3, h, w)
    gaze = torch.rand(batch, 2, generator=gen) - 0.5
    out = dict(face=face, left=left, right=right, boxes=boxes.float(), gaze=gaze)
    return {k: v.to(device) for k, v in out.items()}


def example_inputs(cfg: DMAGazeConfig, batch: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """(face (B, 3, F, F), left_eye (B, 3, h, w), right_eye (B, 3, h, w), eye_boxes (B, 2, 4)), deterministic."""
    d = _synthetic(cfg, batch, device, seed)
    return d["face"], d["left"], d["right"], d["boxes"]


def example_targets(
    cfg: DMAGazeConfig, batch: int, device: torch.device, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gaze (B, 2) radians, face (B, 3, F, F)) matching `example_inputs` with the same arguments."""
    d = _synthetic(cfg, batch, device, seed)
    return d["gaze"], d["face"]


def _config(name: str, overrides: dict[str, Any]) -> DMAGazeConfig:
    return preset_config(DMAGazeConfig, PRESETS, name, overrides)


def _register(name: str) -> None:
    cfg = _config(name, {})
    register(
        ModelEntry(
            name=name,
            family="dmagaze",
            build=lambda **kw: DMAGaze(_config(name, kw)),
            # Keyword overrides other than `seed` are config fields, as for `build`.
            example_inputs=lambda batch, device, seed=0, **kw: example_inputs(_config(name, kw), batch, device, seed),
            example_targets=lambda batch, device, seed=0, **kw: example_targets(_config(name, kw), batch, device, seed),
            loss=dmagaze_loss,
            description=(
                f"DMAGaze: {cfg.face_size}px face, {cfg.eye_size[0]}x{cfg.eye_size[1]} eyes, ResNet "
                f"{list(cfg.backbone_blocks)} width {cfg.backbone_width}, MS-GLAM C={cfg.disentangle_channels} in "
                f"{cfg.glam_groups} groups x {cfg.glam_iterations} passes"
            ),
            config=dataclasses.asdict(cfg),
        )
    )


for _name in PRESETS:
    _register(_name)
