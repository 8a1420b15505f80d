"""Train the model family (samples/registry.py FAMILY, `fam-*`) and tabulate it.

    python benchmarks/train_family.py train --device cuda --out DIR [NAME ...]   # all members by default
    python benchmarks/train_family.py results DIR [DIR ...]                      # -> benchmarks/results/family.*

`train` calls compressor.train.train_sample, the function behind `compress sample train NAME --device cuda`
(same seed, steps and corpus), and stores members above STORE_FP16_ABOVE parameters as float16 so the largest
fit through the lent GPU's file limits; each member's training record lands in DIR/NAME/config.json.
`results` reads those records (the first folder holding a member wins) and writes the table.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compressor.train import train_sample  # noqa: E402
from samples.registry import FAMILY, SHIPPED_DIR, build_model, count_params  # noqa: E402

STORE_FP16_ABOVE = 5_000_000
RESULTS = ROOT / "benchmarks" / "results"


def train(names: list[str], out: Path, device: str, steps: int | None) -> None:
    for name in names:
        spec = next(s for s in FAMILY if s.name == name)
        started = time.perf_counter()
        params = count_params(build_model("gpt", spec.config.to_dict()))
        dtype = torch.float16 if params > STORE_FP16_ABOVE else torch.float32
        record = train_sample(name, out / name, seed=0, steps=steps, device=device, stored_dtype=dtype,
                              progress=False)
        print(f"{name}: {record['params']:,} params, {record['steps']} steps x {record['batch_size']}, "
              f"{record['train_seconds']} s train ({time.perf_counter() - started:.1f} s in all), held-out "
              f"perplexity {record.get('heldout_perplexity')}, loss {record['final_train_loss']}, "
              f"stored {str(dtype).removeprefix('torch.')}", flush=True)


def results(folders: list[Path]) -> None:
    rows = []
    for spec in FAMILY:
        found = next((f / spec.name for f in folders if (f / spec.name / "config.json").is_file()), None)
        if found is None:
            print(f"{spec.name}: no checkpoint in {', '.join(map(str, folders))}", file=sys.stderr)
            continue
        config = json.loads((found / "config.json").read_text())
        training = config["training"]
        shipped = (SHIPPED_DIR / spec.name).is_dir()
        rows.append({
            "name": spec.name, "layers": spec.config.layers, "width": spec.config.width,
            "heads": spec.config.heads, "context": spec.config.context, "params": training["params"],
            "steps": training["steps"], "batch_size": training["batch_size"],
            "tokens_seen": training["steps"] * training["batch_size"] * spec.config.context,
            "learning_rate": training["learning_rate"], "train_seconds": training["train_seconds"],
            "device": training["device"], "precision": training.get("precision", "fp32"),
            "final_train_loss": training["final_train_loss"],
            "heldout_perplexity": round(training["heldout_perplexity"], 4),
            "heldout_windows": training["heldout_windows"], "stored_dtype": config["stored_dtype"],
            "weights_bytes": (found / "model.safetensors").stat().st_size,
            "weights": f"samples/weights/{spec.name}" if shipped else f"~/.cache/compressor/family/{spec.name}",
            "corpus": training["corpus"],
        })
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "family.json").write_text(json.dumps({"members": rows}, indent=2) + "\n")
    lines = ["# The model family (`fam-*`) on the text corpus", "",
             "Byte-level GPT decoders (samples/gpt.py), context 128, trained with `benchmarks/train_family.py "
             "train` (= `compress sample train NAME --device cuda`, seed 0) on the train split of "
             "docs/corpus.md's corpus; held-out perplexity per byte on the whole held-out split "
             f"({rows[0]['heldout_windows'] if rows else '?'} windows of 128), measured in torch at the end "
             "of training.", "",
             "| member | layers x width (heads) | params | steps x batch | tokens | train s | precision | "
             "held-out ppl | stored | weights |",
             "|---|---|---:|---:|---:|---:|---|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['layers']} x {r['width']} ({r['heads']}) | {r['params']:,} | "
                     f"{r['steps']} x {r['batch_size']} | {r['tokens_seen'] / 1e6:.1f}M | {r['train_seconds']} | "
                     f"{r['precision']} ({r['device']}) | {r['heldout_perplexity']:.3f} | {r['stored_dtype']} "
                     f"({r['weights_bytes'] / 1e6:.1f} MB) | {r['weights']} |")
    (RESULTS / "family.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train_cmd = commands.add_parser("train")
    train_cmd.add_argument("names", nargs="*", default=[s.name for s in FAMILY])
    train_cmd.add_argument("--out", type=Path, required=True)
    train_cmd.add_argument("--device", default="cuda")
    train_cmd.add_argument("--steps", type=int, default=None, help="override (timing probes only)")
    results_cmd = commands.add_parser("results")
    results_cmd.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args()
    if args.command == "train":
        unknown = set(args.names) - {s.name for s in FAMILY}
        if unknown:
            parser.error(f"not family members: {', '.join(sorted(unknown))}")
        train(args.names, args.out, args.device, args.steps)
    else:
        results(args.folders)


if __name__ == "__main__":
    main()
