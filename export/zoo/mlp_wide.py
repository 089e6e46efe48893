"""Wide MLP for throughput tests: x [B,1024] -> 4096 -> 4096 -> y [B,1024], GELU.

About 25.2M parameters, ~100 MB in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

IN_FEATURES = 1024
HIDDEN = 4096
OUT_FEATURES = 1024


class MLPWide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN_FEATURES, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.fc3 = nn.Linear(HIDDEN, OUT_FEATURES)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))
        x = self.act(self.fc2(x))
        return self.fc3(x)


def build_mlp_wide(seed: int = 0) -> MLPWide:
    """Return an MLPWide in eval mode with weights fixed by ``seed``."""
    torch.manual_seed(seed)
    return MLPWide().eval()
