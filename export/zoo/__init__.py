"""Example models: hand-written architectures with reproducible (seeded) weights."""

from export.zoo.digits_cnn import DigitsCNN, build_digits_cnn
from export.zoo.mlp import MLP, build_mlp
from export.zoo.mlp_wide import MLPWide, build_mlp_wide

__all__ = ["MLP", "build_mlp", "DigitsCNN", "build_digits_cnn", "MLPWide", "build_mlp_wide"]
