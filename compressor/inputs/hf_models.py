"""The exported signature of Hugging Face models: plain tensors in, one float tensor out.

Encoders (BERT family) become sentence embedders: (input_ids, attention_mask) -> mean-pooled last hidden state,
the pooling sentence-transformers uses for all-MiniLM-L6-v2. Decoder LMs take input_ids alone, as the project's
own GPT export does, and return next-token logits; no KV cache, so one pass scores a whole window.
"""
import inspect

import torch
from torch import nn


class SentenceEmbedder(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # the [CLS] pooler is unused by mean pooling: no dead layer to quantize or count
        self.encoder = encoder
        self.config = encoder.config
        # BERT-style encoders take segment ids (all 0 for one sentence); DistilBERT and others have none
        self.takes_token_types = "token_type_ids" in inspect.signature(encoder.forward).parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        extra = {"token_type_ids": torch.zeros_like(input_ids)} if self.takes_token_types else {}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class CausalLMLogits(nn.Module):
    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder
        self.config = decoder.config

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder(input_ids=input_ids, use_cache=False).logits


def conv1d_to_linear(model: nn.Module) -> int:
    """GPT-2 stores its projections as transformers' Conv1D (y = x W + b, W [in, out]); the passes and the QDQ
    lowering work on nn.Linear, so each becomes the identical Linear (weight Wᵀ). Returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "Conv1D" and hasattr(child, "nf"):
                linear = nn.Linear(child.weight.shape[0], child.nf, bias=child.bias is not None,
                                   device=child.weight.device, dtype=child.weight.dtype)
                linear.weight = nn.Parameter(child.weight.detach().T.contiguous())  # also on the meta device
                if child.bias is not None:
                    linear.bias = nn.Parameter(child.bias.detach().clone())
                setattr(parent, name, linear)
                swapped += 1
    return swapped

