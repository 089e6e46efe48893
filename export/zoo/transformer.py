"""A small transformer encoder classifier with a dynamic sequence length.

inputs:  input_ids INT64 [B,S], attention_mask INT64 [B,S] (1 = token, 0 = padding)
outputs: logits FP32 [B,4] (masked mean pool -> linear), hidden FP32 [B,S,64]

Hand-written attention (no nn.MultiheadAttention fast path) so that eager,
torch.export, ONNX and AOTInductor all see the same ops. Masked keys get a large
finite negative score, so a fully padded row gives finite (uniform) attention
instead of NaN. S may be 1..MAX_LEN.
"""

from __future__ import annotations

import math

import torch
from torch import nn

VOCAB_SIZE = 1000
MAX_LEN = 128
D_MODEL = 64
N_HEADS = 4
N_LAYERS = 2
D_FF = 128
NUM_CLASSES = 4
_MASK_VALUE = -1e4


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q = q.reshape(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim)) + key_bias
        attn = torch.matmul(torch.softmax(scores, dim=-1), v)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, d))
        return x + self.ff(self.norm2(x))


class TinyEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB_SIZE, D_MODEL)
        self.pos = nn.Embedding(MAX_LEN, D_MODEL)
        self.layers = nn.ModuleList(EncoderLayer(D_MODEL, N_HEADS, D_FF) for _ in range(N_LAYERS))
        self.norm = nn.LayerNorm(D_MODEL)
        self.head = nn.Linear(D_MODEL, NUM_CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = input_ids.shape[1]
        positions = torch.arange(s, device=input_ids.device)
        x = self.tok(input_ids) + self.pos(positions).unsqueeze(0)
        mask = attention_mask.to(x.dtype)  # [B,S]
        key_bias = ((1.0 - mask) * _MASK_VALUE)[:, None, None, :]  # [B,1,1,S]
        for layer in self.layers:
            x = layer(x, key_bias)
        hidden = self.norm(x)
        weights = mask.unsqueeze(-1)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.head(pooled), hidden


def build_transformer(seed: int = 0) -> TinyEncoder:
    """TinyEncoder (2 layers, d=64, 4 heads, vocab 1000, max length 128) in eval mode, seeded."""
    torch.manual_seed(seed)
    return TinyEncoder().eval()
