"""Small MLP: x [B,256] -> Linear(256,128) -> ReLU -> Linear(128,10) -> y [B,10]."""

from __future__ import annotations

import torch
from torch import nn

IN_FEATURES = 256
HIDDEN = 128
OUT_FEATURES = 10


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, HIDDEN)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(HIDDEN, OUT_FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def build_mlp(seed: int = 0) -> MLP:
    """Return an MLP in eval mode with weights fixed by ``seed``."""
    torch.manual_seed(seed)
    return MLP().eval()
