"""Every preset (and a few variants) on gpt-s, with the sha256 of each artifact's graph without its metadata and of
its initializers: run it before and after a refactor that must not change what the artifacts hold.

    python benchmarks/preset_hashes.py runs/hashes > before.json    # then again after, and diff the two

The SmoothQuant variant is spelled the old way (quantize.smoothquant_alpha), which every version reads.
"""
import hashlib
import json
import sys
from pathlib import Path

import onnx

from compressor.pipeline import RunOptions, run
from compressor.recipes import PRESETS

VARIANTS = ("int4@export.dtype=float16", "w8a8@quantize.smoothquant_alpha=0.5", "int4@quantize.budget_bits_per_param=4.5",
            "int4@quantize.overrides={re:lm_head: {bits: 8}}", "kmeans4@quantize.sequential=block",
            "int4-gptq@quantize.sequential=none", "int8@quantize.integer_weights=uint8",
            "w8a8@quantize.integer_weights=uint8")


def hashes(path: Path) -> dict:
    model = onnx.load(str(path))
    initializers = hashlib.sha256()
    for tensor in sorted(model.graph.initializer, key=lambda t: t.name):
        initializers.update(tensor.SerializeToString())
    del model.metadata_props[:]
    return {"initializers": initializers.hexdigest(), "graph": hashlib.sha256(model.SerializeToString()).hexdigest()}


def main(out: Path) -> None:
    found = {}
    for name in (*PRESETS, *VARIANTS):
        recipe, *sets = name.split("@")
        folder = out / name.replace("/", "_")
        run(Path("gpt-s"), folder, RunOptions(recipe=recipe, overrides=tuple(sets), bench=None, progress=False,
                                              eval_limit=32, force=True, plots=False), log=lambda *_: None)
        found[name] = hashes(folder / "model.onnx")
        print(f"{name:48s} {found[name]['initializers'][:16]} {found[name]['graph'][:16]}", file=sys.stderr)
    print(json.dumps(found, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/preset-hashes"))
