"""The sample Transformers: their families (config + module) and the named members `compress sample` trains."""
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from torch import nn

from samples.gpt import GPT, GPTConfig
from samples.reverse_task import MAX_LENGTH, VOCAB_SIZE
from samples.seq2seq import Seq2SeqConfig, Seq2SeqTransformer

FAMILIES: dict[str, tuple[type, type[nn.Module]]] = {
    "gpt": (GPTConfig, GPT),
    "seq2seq": (Seq2SeqConfig, Seq2SeqTransformer),
}

SHIPPED_DIR = Path(__file__).parent / "weights"


def family_dir() -> Path:
    """Where the family members too large to ship live once trained: COMPRESSOR_CACHE/family/NAME."""
    from samples.wiki_corpus import cache_dir

    return cache_dir() / "family"


def trained_dir(name: str) -> Path | None:
    """The folder of a sample's trained checkpoint: shipped, or (family members) in family_dir(); else None."""
    for folder in (SHIPPED_DIR / name, family_dir() / name):
        if (folder / "config.json").is_file():
            return folder
    return None


@dataclass(frozen=True)
class SampleSpec:
    name: str
    family: str
    config: GPTConfig | Seq2SeqConfig
    steps: int
    batch_size: int
    learning_rate: float
    description: str
    mixed_precision: bool = False  # bf16 autocast when training on CUDA (the fam-* members)


def _gpt(name: str, layers: int, width: int, heads: int, steps: int, lr: float, batch: int = 32,
         dropout: float = 0.0) -> SampleSpec:
    config = GPTConfig(layers=layers, width=width, heads=heads, dropout=dropout)
    return SampleSpec(name, "gpt", config, steps, batch, lr,
                      f"GPT byte-level LM on Wikipedia text: {layers} layers, width {width}, {heads} heads")


FAMILY_PREFIX = "fam-"


def _family(name: str, layers: int, width: int, heads: int, steps: int, lr: float, batch: int) -> SampleSpec:
    config = GPTConfig(layers=layers, width=width, heads=heads, corpus="text")
    return SampleSpec(name, "gpt", config, steps, batch, lr,
                      f"GPT byte-level LM on the text corpus (docs/corpus.md): {layers} layers, width {width}, "
                      f"{heads} heads", mixed_precision=True)


# The model family for the k-bit scaling study: roughly log-spaced sizes (x2.5-3.3 apart), one corpus, one recipe.
FAMILY: tuple[SampleSpec, ...] = (
    _family("fam-0.1m", layers=2, width=56, heads=4, steps=3000, lr=3e-3, batch=32),
    _family("fam-0.3m", layers=3, width=80, heads=4, steps=4000, lr=3e-3, batch=32),
    _family("fam-0.9m", layers=4, width=128, heads=4, steps=4000, lr=2e-3, batch=64),
    _family("fam-2.5m", layers=5, width=192, heads=6, steps=6000, lr=1.5e-3, batch=64),
    _family("fam-8m", layers=6, width=320, heads=5, steps=3000, lr=1e-3, batch=128),
    _family("fam-20m", layers=8, width=448, heads=7, steps=4000, lr=8e-4, batch=128),
    _family("fam-50m", layers=13, width=576, heads=9, steps=4000, lr=6e-4, batch=128),
)

SAMPLES: dict[str, SampleSpec] = {
    spec.name: spec
    for spec in [
        SampleSpec(
            "seq2seq-reverse", "seq2seq",
            Seq2SeqConfig(vocab_size=VOCAB_SIZE, max_length=MAX_LENGTH + 1),
            steps=1500, batch_size=128, learning_rate=2e-3,
            description="encoder-decoder Transformer reversing 1..12 symbols (exact match)",
        ),
        _gpt("gpt-xs", layers=2, width=64, heads=4, steps=600, lr=3e-3),
        _gpt("gpt-s", layers=4, width=128, heads=4, steps=1500, lr=2e-3),
        _gpt("gpt-m", layers=6, width=192, heads=6, steps=3000, lr=1e-3, dropout=0.1),
        _gpt("gpt-l", layers=8, width=256, heads=8, steps=4000, lr=8e-4, batch=64, dropout=0.1),
        _gpt("gpt-xl", layers=12, width=320, heads=10, steps=5000, lr=6e-4, batch=64, dropout=0.1),
        *FAMILY,
    ]
}


def build_model(family: str, config: dict) -> nn.Module:
    """A fresh module of `family` from a config dict; raises ValueError/TypeError on a bad config."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})")
    config_type, module_type = FAMILIES[family]
    return module_type(config_type(**config))


def corpus_module(name: str) -> ModuleType:
    """The corpus a GPT config names (GPTConfig.corpus): split_tokens, heldout_windows, describe."""
    from samples import text_corpus, wiki_corpus

    corpora = {"wiki": wiki_corpus, "text": text_corpus}
    if name not in corpora:
        raise ValueError(f"unknown corpus {name!r} (known: {', '.join(corpora)})")
    return corpora[name]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
