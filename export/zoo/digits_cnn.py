"""Small CNN for the 8x8 sklearn digits: image [B,1,8,8] -> logits [B,10]."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),  # 16x8x8
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),  # 32x8x8
            nn.ReLU(),
            nn.MaxPool2d(2),  # 32x4x4
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, 10),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(image))


def build_digits_cnn(seed: int = 0) -> DigitsCNN:
    """Return an untrained DigitsCNN with initial weights fixed by ``seed``.

    Training lives in ``export.make_bundled`` (``train_digits_cnn``).
    """
    torch.manual_seed(seed)
    return DigitsCNN()
