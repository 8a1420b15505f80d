"""Latency and peak memory of an ONNX model under ONNX Runtime, run in a child process of its own so that the
peak RSS is the ORT deployment's (python + onnxruntime + session), not the torch process's.

Usage (internal): python -m compressor.ort_benchmark MODEL.onnx INPUTS.npz --provider cpu --warmup 10 --runs 50
INPUTS.npz holds, per batch size b, arrays named "b{b}/{input name}". Prints one JSON object. With --progress it
also prints PROGRESS_LINE on stderr after each warm-up or timed run, which the parent turns into a progress bar.
"""
import argparse
import json
import resource
import statistics
import sys
import time

import numpy as np


def peak_rss_bytes() -> int:
    """Peak RSS of this process image. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent
    across fork+exec, which would charge the whole torch process to the ORT child."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, bytes on macOS


PROGRESS_LINE = "compressor.ort_benchmark: run done"


def _tick() -> None:
    print(PROGRESS_LINE, file=sys.stderr, flush=True)


def _cpu_timer(session, feeds):
    def run():
        session.run(None, feeds)

    return run


def _cuda_timer(session, feeds):
    """I/O binding: inputs copied to the GPU once, outputs left there, so we time the model, not PCIe."""
    import onnxruntime as ort

    binding = session.io_binding()
    for name, array in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda", 0)

    def run():
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return run


def benchmark(model_path: str, inputs_path: str, provider: str, warmup: int, runs: int, threads: int | None,
              progress: bool = False):
    from compressor.ort_runtime import create_session, to_ort_feeds

    baseline = peak_rss_bytes()
    session = create_session(model_path, provider, threads)
    stored = np.load(inputs_path)
    batches = sorted({int(key.split("/")[0][1:]) for key in stored.files})
    result = {"provider": provider, "warmup": warmup, "runs": runs, "threads": threads}
    tick = _tick if progress else lambda: None
    for batch in batches:
        feeds = to_ort_feeds({key.split("/", 1)[1]: stored[key] for key in stored.files
                              if key.startswith(f"b{batch}/")}, session)
        run = (_cuda_timer if provider == "cuda" else _cpu_timer)(session, feeds)
        for _ in range(warmup):
            run()
            tick()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
            tick()  # outside the timed span
        times.sort()
        result[f"batch{batch}"] = {
            "p50_ms": round(statistics.median(times), 4),
            "p90_ms": round(times[min(len(times) - 1, int(0.9 * len(times)))], 4),
            "mean_ms": round(statistics.fmean(times), 4),
            "runs": runs,
        }
    result["memory"] = {"peak_rss_bytes": peak_rss_bytes(), "rss_baseline_bytes": baseline}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("inputs")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    print(json.dumps(benchmark(args.model, args.inputs, args.provider, args.warmup, args.runs, args.threads,
                               args.progress)))


if __name__ == "__main__":
    main()
