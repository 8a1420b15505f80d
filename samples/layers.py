"""Building blocks shared by the sample Transformers: multi-head attention and the feed-forward block.

Written out by hand (no nn.MultiheadAttention / SDPA) so the exported ONNX graph is plain MatMul/Softmax that
every later pass can see, and so structured pruning can shrink `heads` and `hidden` directly.
"""
import math

import torch
from torch import nn


class MultiHeadAttention(nn.Module):
    """softmax(Q Kᵀ / √d_k) V over `heads` heads of size `head_dim`; `blocked` marks keys a query may not see."""

    def __init__(self, width: int, heads: int, head_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim or width // heads
        inner = self.heads * self.head_dim
        self.q_proj = nn.Linear(width, inner)
        self.k_proj = nn.Linear(width, inner)
        self.v_proj = nn.Linear(width, inner)
        self.out_proj = nn.Linear(inner, width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, query: torch.Tensor, memory: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        """query [B, Tq, W], memory [B, Tk, W], blocked bool broadcastable to [B, heads, Tq, Tk]."""
        q = self._split(self.q_proj(query))
        k = self._split(self.k_proj(memory))
        v = self._split(self.v_proj(memory))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(blocked, float("-inf"))
        context = torch.softmax(scores, dim=-1) @ v
        batch, _, length, _ = context.shape
        return self.out_proj(context.transpose(1, 2).reshape(batch, length, self.heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int, activation: str):
        super().__init__()
        self.fc_in = nn.Linear(width, hidden)
        self.fc_out = nn.Linear(hidden, width)
        self.activation = {"relu": nn.ReLU(), "gelu": nn.GELU()}[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.activation(self.fc_in(x)))


def causal_blocked(length: int, device: torch.device) -> torch.Tensor:
    """[1, 1, T, T] bool, True above the diagonal: position i may not attend to j > i."""
    positions = torch.arange(length, device=device)
    return (positions[None, :] > positions[:, None])[None, None]
