"""Example models: hand-written architectures with reproducible (seeded) weights."""

from export.zoo.digits_cnn import DigitsCNN, build_digits_cnn
from export.zoo.mlp import MLP, build_mlp
from export.zoo.mlp_wide import MLPWide, build_mlp_wide
from export.zoo.resnet import ResNet, build_resnet18, build_resnet50
from export.zoo.transformer import TinyEncoder, build_transformer

__all__ = [
    "MLP", "build_mlp", "DigitsCNN", "build_digits_cnn", "MLPWide", "build_mlp_wide",
    "ResNet", "build_resnet18", "build_resnet50", "TinyEncoder", "build_transformer",
]
