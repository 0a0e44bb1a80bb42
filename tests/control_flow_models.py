"""Models whose own forward branches or loops on tensor values (issue #20): no graph capture holds them, so compile
places their modules (capture "module-placement"). Small, deterministic for a seed, CPU float32."""

from __future__ import annotations

import torch
from torch import nn

WIDTH = 16


class Branch(nn.Module):
    """A data-dependent branch in the top-level forward (the issue's example)."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        x = self.b(x) if x.sum() > 0 else -self.b(x)
        return self.d(torch.relu(self.c(x)))


class Loop(nn.Module):
    """A loop whose trip count depends on the activations' values (at most `max_steps` block calls)."""

    def __init__(self, width: int = WIDTH, max_steps: int = 6):
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.block = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.head = nn.Linear(width, width)
        self.max_steps = max_steps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        steps = 0
        while steps < self.max_steps and h.norm() > 0.5 * h.shape[0]:
            h = 0.5 * self.block(h) + 0.5 * h
            steps += 1
        return self.head(h)


class EarlyReturn(nn.Module):
    """Returns from the middle of its forward when the activations say so."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)
        self.short_head = nn.Linear(width, width)
        self.long_head = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if h.mean() > 0.25:  # the example batch (8 rows) goes on; of its halves, one returns here
            return self.short_head(h)
        h = torch.relu(self.b(h))
        return self.long_head(h)


class TiedHead(nn.Module):
    """The top-level code multiplies by a placed module's weight (a tied LM head): on two stages, the weight is used by
    both the driver and the stage holding `proj`."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.body = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(torch.relu(self.body(x))))
        h = h if h.mean() > -1 else -h
        return nn.functional.linear(h, self.proj.weight)  # the tied head, in top-level code


class Mix(nn.Module):
    """Three matrix products in its own code (no submodule, so module placement never splits it)."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, width, width) / width**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for w in self.weight:
            x = torch.tanh(x @ w)
        return x


class Nested(nn.Module):
    """A module called by the top-level code and again inside another module's call: at 2 stages, `inner` and
    `outer` land on different stages whichever split wins, so `inner`'s weight is used on both."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.mix = Mix(width)
        self.outer = nn.Sequential(self.inner, nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mix(self.inner(x))
        return self.outer(h) if h.sum() > -1e9 else h


class InPlace(nn.Module):
    """An activation writes its input in place and the code reads that input after: placed on another stage, the
    write would land on a copy (module placement keeps such a module with its caller)."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.a, self.act, self.b = nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, width)
        self.block = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True))  # writes inside its own call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        g = self.act(h)  # h itself is now the activation's output: the code below reads it
        h = self.block(h + g) if h.sum() > -1e9 else h
        return self.b(h * 2 + g)


MODELS = {
    "branch": Branch,
    "loop": Loop,
    "early-return": EarlyReturn,
    "tied-head": TiedHead,
    "nested": Nested,
    "in-place": InPlace,
}


def build(name: str, seed: int = 0) -> nn.Module:
    """The model `name` with weights drawn from `seed`."""
    torch.manual_seed(seed)
    return MODELS[name]()


def batch(rows: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and regression targets."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, WIDTH, generator=g), torch.randn(rows, WIDTH, generator=g)
