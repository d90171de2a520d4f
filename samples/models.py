"""The seed article's models (shared/seed-article.txt), and a size that suits the machine."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


class Model1(nn.Module):
    """Two strided convolutions: the heavy part."""

    def __init__(self) -> None:
        super().__init__()
        self.part0 = nn.Sequential(
            nn.Conv2d(3, 512, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(512, 1024, kernel_size=3, stride=2, padding=1),
            nn.GELU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.part0(x)


class Model2(nn.Module):
    """Pooling and a small MLP head: the light part."""

    def __init__(self) -> None:
        super().__init__()
        self.part1 = nn.Sequential(
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Flatten(),
            nn.Linear(1024, 2048),
            nn.GELU(),
            nn.Linear(2048, 512),
            nn.GELU(),
            nn.Linear(512, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.part1(x)


def setup() -> tuple[torch.device, torch.Tensor]:
    """The article's input on a GPU (32×3×224×224); a small one on the CPU."""
    if torch.cuda.is_available():
        dev = torch.device("cuda:0")
        return dev, torch.randn(32, 3, 224, 224, device=dev)
    torch.manual_seed(0)
    return torch.device("cpu"), torch.randn(2, 3, 32, 32)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def cpu_task(rng: np.random.Generator) -> None:
    """Pure host work, as in the article."""
    x = rng.standard_normal((1, 3, 512, 512)).astype(np.float32)
    x = x * 1024**0.5
