"""Heal: a short, seeded recovery fine-tune after structured pruning or low-rank, on calibration batches from
the training distribution (never held-out data). Off unless a recipe lists it.

Loss: next-token prediction on each batch's last input (the GPT's tokens; the seq2seq decoder's target tokens,
teacher-forced), ignoring padding (id 0)."""
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from passes.calibration import MAX_CALIBRATION_SAMPLES, check_int, excerpt


BATCH = 16  # calibration batches come in 16s (compressor.tasks)
# each step draws a fresh batch of BATCH calibration windows, all drawn up front: the calibration limit bounds steps
MAX_STEPS = MAX_CALIBRATION_SAMPLES // BATCH  # 6,250
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class HealConfig:
    steps: int = 200
    learning_rate: float = 5e-5
    seed: int = 0

    def __post_init__(self):
        check_int("heal.steps", self.steps, 1, MAX_STEPS)
        if isinstance(self.learning_rate, bool) or not 0 < self.learning_rate < math.inf:  # also refuses NaN
            raise ValueError(f"heal.learning_rate must be a positive number, not {excerpt(self.learning_rate)}")
        check_int("heal.seed", self.seed, 0, MAX_SEED)

    needs_calibration = True

    @property
    def calibration_samples(self) -> int:
        """A fresh batch for every step: cycling a few batches over-fits them (measured on gpt-s: 256 windows
        for 200 steps took low-rank perplexity from 5.00 to 6.44)."""
        return self.steps * BATCH

    def label(self) -> str:
        return f"heal-{self.steps}"


def heal_model(model: nn.Module, config: HealConfig, calibration: list[tuple] | None, progress: bool = False) -> dict:
    if not calibration:
        raise ValueError("heal needs calibration batches and none were given")
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0)
    model.train()
    losses = []
    for step in tqdm(range(config.steps), desc="heal", disable=not progress, leave=False):
        batch = calibration[step % len(calibration)]  # len == steps unless the caller gave fewer
        tokens = batch[-1]
        logits = model(*batch)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), ignore_index=0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return {"name": "heal", "config": asdict(config), "label": config.label(), "first_loss": losses[0],
            "last_loss": losses[-1], "params": sum(p.numel() for p in model.parameters())}
