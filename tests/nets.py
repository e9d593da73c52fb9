"""Small networks of a user's own, for ``backbone=custom`` tests (``backbone.target=tests.nets.X``)."""

from __future__ import annotations

import torch
from torch import nn


class Tiny(nn.Module):
    """A stem, a body and a classifier, with pooling and flattening between body and head."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width))
        self.body = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))  # code between units goes with the unit before
        x = self.body(x)
        return self.fc(torch.flatten(self.pool(x), 1))


class Skip(Tiny):
    """A skip connection around ``body``: stem and body cannot be cut apart."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(8, 16, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.body(x) + self.proj(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny(width: int = 8) -> nn.Module:
    """A builder function, as ``backbone.target`` usually names one."""
    return Tiny(width)


def not_a_module() -> str:
    return "a string"
