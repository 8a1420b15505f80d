"""Real English text for the GPT samples: the Wikipedia dump that ships in gensim's wheel, byte-tokenized.

Articles are cleaned with gensim's filter_wiki, redirects dropped, and split by article: every 10th article
(in dump order) is held out. The cleaned text is cached (COMPRESSOR_CACHE, default ~/.cache/compressor) so the
~2 s parse happens once and machines without gensim can reuse it.
"""
import bz2
import hashlib
import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

DUMP_NAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
HELDOUT_EVERY = 10
CACHE_VERSION = 1


def cache_dir() -> Path:
    return Path(os.environ.get("COMPRESSOR_CACHE", Path.home() / ".cache" / "compressor"))


def _extract_articles() -> list[tuple[str, str]]:
    import gensim
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    dump = Path(gensim.__file__).parent / "test" / "test_data" / DUMP_NAME
    articles = []
    with bz2.BZ2File(dump) as stream:
        for title, text, _ in extract_pages(stream, filter_namespaces=("0",)):
            clean = "\n".join(line.strip() for line in filter_wiki(text).splitlines() if line.strip())
            if clean and not clean.lower().startswith("#redirect"):
                articles.append((title, clean))
    return articles


@lru_cache(maxsize=1)
def load_articles() -> tuple[tuple[str, str], ...]:
    cached = cache_dir() / f"wiki-articles-v{CACHE_VERSION}.json"
    if cached.exists():
        return tuple(tuple(a) for a in json.loads(cached.read_text(encoding="utf-8")))
    articles = _extract_articles()
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(articles), encoding="utf-8")
    tmp.replace(cached)
    return tuple(articles)


def split_tokens(split: str) -> np.ndarray:
    """All articles of `split` ('train' or 'heldout') as one uint8 byte stream, articles joined by blank lines."""
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}")
    keep_heldout = split == "heldout"
    texts = [text for i, (_, text) in enumerate(load_articles()) if (i % HELDOUT_EVERY == 0) == keep_heldout]
    return np.frombuffer("\n\n".join(texts).encode("utf-8"), dtype=np.uint8)


def corpus_fingerprint() -> str:
    """sha256 of the cleaned text, recorded with trained checkpoints."""
    digest = hashlib.sha256()
    for title, text in load_articles():
        digest.update(title.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()[:16]


def describe() -> dict:
    """What a training record says about the corpus."""
    return {"name": "gensim enwiki test dump", "sha": corpus_fingerprint(), "tokenizer": "bytes",
            "heldout": f"every {HELDOUT_EVERY}th article"}


def heldout_windows(context: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping [N, context + 1] int64 windows of held-out text: inputs are [:, :-1], targets [:, 1:]."""
    tokens = split_tokens("heldout")
    count = (len(tokens) - 1) // context
    if max_windows is not None:
        count = min(count, max_windows)
    starts = np.arange(count) * context
    return np.stack([tokens[s : s + context + 1] for s in starts]).astype(np.int64)
