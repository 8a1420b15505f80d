"""Decoder-only GPT language model (pre-LayerNorm, learned positions, GELU MLP), nanoGPT-shaped."""
from dataclasses import asdict, dataclass

import torch
from torch import nn

from samples.layers import FeedForward, MultiHeadAttention, causal_blocked

CORPORA = ("wiki", "text")  # samples/wiki_corpus.py, samples/text_corpus.py: the text a model trains and scores on


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256
    context: int = 128
    layers: int = 2
    width: int = 64
    heads: int = 4
    mlp_hidden: int | None = None  # default 4 * width
    dropout: float = 0.0
    corpus: str = "wiki"

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if min(self.vocab_size, self.context, self.layers, self.width, self.heads) < 1:
            raise ValueError("vocab_size, context, layers, width and heads must be positive")
        if self.corpus not in CORPORA:
            raise ValueError(f"unknown corpus {self.corpus!r} (known: {', '.join(CORPORA)})")

    @property
    def hidden(self) -> int:
        return self.mlp_hidden or 4 * self.width

    def to_dict(self) -> dict:
        return asdict(self)


class GPTBlock(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.width)
        self.attn = MultiHeadAttention(config.width, config.heads)
        self.ln_mlp = nn.LayerNorm(config.width)
        self.mlp = FeedForward(config.width, config.hidden, "gelu")
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
        h = self.ln_attn(x)
        x = x + self.dropout(self.attn(h, h, blocked))
        return x + self.dropout(self.mlp(self.ln_mlp(x)))


class GPT(nn.Module):
    """input_ids [B, T] (T <= context) -> next-token logits [B, T, vocab]."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.token_emb = nn.Embedding(config.vocab_size, config.width)
        self.pos_emb = nn.Embedding(config.context, config.width)
        self.blocks = nn.ModuleList(GPTBlock(config) for _ in range(config.layers))
        self.ln_final = nn.LayerNorm(config.width)
        self.lm_head = nn.Linear(config.width, config.vocab_size, bias=False)
        self.apply(_init_weights)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)
        x = self.token_emb(input_ids) + self.pos_emb(positions)[None]
        blocked = causal_blocked(length, input_ids.device)
        for block in self.blocks:
            x = block(x, blocked)
        return self.lm_head(self.ln_final(x))


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
