"""The seed's encoder-decoder Transformer (Vaswani et al.): post-LayerNorm, ReLU FFN, learned positions,
padding masks on every attention and a causal mask on decoder self-attention."""
from dataclasses import asdict, dataclass

import torch
from torch import nn

from samples.layers import FeedForward, MultiHeadAttention, causal_blocked

PAD_ID = 0


@dataclass(frozen=True)
class Seq2SeqConfig:
    vocab_size: int = 19
    max_length: int = 16
    width: int = 64
    heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    ffn_hidden: int = 128
    dropout: float = 0.0

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if min(self.vocab_size, self.max_length, self.width, self.heads, self.ffn_hidden) < 1:
            raise ValueError("vocab_size, max_length, width, heads and ffn_hidden must be positive")

    def to_dict(self) -> dict:
        return asdict(self)


class EncoderLayer(nn.Module):
    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(config.width, config.heads)
        self.ln_attn = nn.LayerNorm(config.width)
        self.ffn = FeedForward(config.width, config.ffn_hidden, "relu")
        self.ln_ffn = nn.LayerNorm(config.width)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, src_blocked: torch.Tensor) -> torch.Tensor:
        x = self.ln_attn(x + self.dropout(self.self_attn(x, x, src_blocked)))
        return self.ln_ffn(x + self.dropout(self.ffn(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.self_attn = MultiHeadAttention(config.width, config.heads)
        self.ln_self = nn.LayerNorm(config.width)
        self.cross_attn = MultiHeadAttention(config.width, config.heads)
        self.ln_cross = nn.LayerNorm(config.width)
        self.ffn = FeedForward(config.width, config.ffn_hidden, "relu")
        self.ln_ffn = nn.LayerNorm(config.width)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, y, memory, tgt_blocked, src_blocked):
        y = self.ln_self(y + self.dropout(self.self_attn(y, y, tgt_blocked)))
        y = self.ln_cross(y + self.dropout(self.cross_attn(y, memory, src_blocked)))
        return self.ln_ffn(y + self.dropout(self.ffn(y)))


class Seq2SeqTransformer(nn.Module):
    """(src_ids [B, S], tgt_ids [B, T]) -> logits [B, T, vocab] for the token after each target position."""

    def __init__(self, config: Seq2SeqConfig):
        super().__init__()
        self.config = config
        self.src_emb = nn.Embedding(config.vocab_size, config.width)
        self.tgt_emb = nn.Embedding(config.vocab_size, config.width)
        self.pos_emb = nn.Embedding(config.max_length, config.width)
        self.encoder = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_layers))
        self.lm_head = nn.Linear(config.width, config.vocab_size)

    def _embed(self, table: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return table(ids) * self.config.width**0.5 + self.pos_emb(positions)[None]

    def encode(self, src_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        src_blocked = (src_ids == PAD_ID)[:, None, None, :]  # [B, 1, 1, S]: padded keys
        x = self._embed(self.src_emb, src_ids)
        for layer in self.encoder:
            x = layer(x, src_blocked)
        return x, src_blocked

    def forward(self, src_ids: torch.Tensor, tgt_ids: torch.Tensor) -> torch.Tensor:
        memory, src_blocked = self.encode(src_ids)
        tgt_blocked = causal_blocked(tgt_ids.shape[1], tgt_ids.device) | (tgt_ids == PAD_ID)[:, None, None, :]
        y = self._embed(self.tgt_emb, tgt_ids)
        for layer in self.decoder:
            y = layer(y, memory, tgt_blocked, src_blocked)
        return self.lm_head(y)
