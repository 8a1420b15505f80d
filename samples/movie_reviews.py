"""Movie-review snippets with human sentiment scores (Hutto & Gilbert, ICWSM 2014), a real labelled task for
sentence embeddings. The file ships here byte for byte as it is in vaderSentiment 3.3.2's source archive (MIT):
`pip download --no-binary :all: --no-deps vaderSentiment==3.3.2` (sdist sha256 5d7c06e0…49632f9), then
additional_resources/hutto_ICWSM_2014.tar.gz -> hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt
(sha256 c8293b0d…bd13350), gzipped. Each line: id, mean human score in [-4, 4], snippet.

Label = sign of the score (37 neutral snippets dropped). Split by id: every 5th snippet is held out, the rest
trains the linear probe (and serves as calibration data), so nothing scored was seen by the probe. The file lists
all positive snippets first, so each split comes in a fixed shuffled order: any prefix is balanced."""
import gzip
import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np

DATA_FILE = Path(__file__).parent / "data" / "movieReviewSnippets_GroundTruth.txt.gz"
SOURCE_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
HELDOUT_EVERY = 5
SHUFFLE_SEED = 0


@lru_cache(maxsize=1)
def _snippets() -> tuple[tuple[int, float, str], ...]:
    raw = gzip.decompress(DATA_FILE.read_bytes())
    if hashlib.sha256(raw).hexdigest() != SOURCE_SHA256:
        raise ValueError(f"{DATA_FILE} does not match the vaderSentiment 3.3.2 original")
    rows = []
    for line in raw.decode("utf-8").splitlines():
        snippet_id, score, text = line.split("\t", 2)
        rows.append((int(snippet_id), float(score), text.strip()))
    return tuple(rows)


def split(name: str) -> tuple[list[str], np.ndarray]:
    """('train' | 'heldout') -> (snippets, labels 1 = positive / 0 = negative)."""
    if name not in ("train", "heldout"):
        raise ValueError(f"unknown split {name!r}")
    chosen = [(text, score) for snippet_id, score, text in _snippets()
              if score != 0 and (snippet_id % HELDOUT_EVERY == 0) == (name == "heldout")]
    order = np.random.default_rng(SHUFFLE_SEED).permutation(len(chosen))
    return [chosen[i][0] for i in order], np.array([chosen[i][1] > 0 for i in order], dtype=np.int64)
