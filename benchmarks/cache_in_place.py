"""A decoder's cache kept in place (one bound buffer per layer: compressor.generation) against the same cache
copied every step, in one process, alternating: the tokens must be the same; decode speed of both.

    python benchmarks/cache_in_place.py FOLDER [FOLDER ...] [--provider cpu|cuda] [--prompt-tokens 64]
        [--new-tokens 60] [--rounds 4] [--name cache_in_place]

Writes benchmarks/results/NAME.json (the first round of each is a warm-up, left out of the medians).
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--name", default="cache_in_place")
    args = parser.parse_args()
    if args.provider == "cuda":
        import torch  # noqa: F401  (the CUDA libraries onnxruntime-gpu links against, before the session)
    from compressor.generation import generate
    from compressor.kv_cache import keeps_cache_in_place
    from compressor.ort_runtime import create_session

    rows = []
    for folder in args.folders:
        session = create_session(Path(folder) / "model.onnx", args.provider)
        prompt = list(range(40, 40 + args.prompt_tokens))
        speed, tokens = {False: [], True: []}, {}
        for _ in range(args.rounds):
            for in_place in (False, True):
                result = generate(session, prompt, args.new_tokens, args.provider, in_place=in_place)
                assert tokens.setdefault(in_place, result.tokens) == result.tokens  # greedy: the same every round
                speed[in_place].append(result.decode_tokens_per_s)
        row = {"folder": str(folder), "provider": args.provider,
               "kept_in_place": keeps_cache_in_place(session, folder),
               "same_tokens": tokens[False] == tokens[True], "new_tokens": len(tokens[True]),
               "copied_tokens_per_s": round(statistics.median(speed[False][1:]), 1),
               "in_place_tokens_per_s": round(statistics.median(speed[True][1:]), 1)}
        rows.append(row)
        print(json.dumps(row))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
