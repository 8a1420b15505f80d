"""Validate an exported artifact against the torch model it came from, on held-out data:
task accuracy side by side, logit parity, latency percentiles and peak memory per execution provider."""
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from compressor.errors import UserError
from compressor.ort_benchmark import PROGRESS_LINE
from compressor.kv_cache import PRESENT_PREFIX, empty_cache, has_cache, past_name
from compressor.ort_runtime import create_session, logits_fn
from compressor.tasks import logits_budget, measure, worsening
from compressor.tasks.protocol import Task

BENCHMARK_BATCHES = (1, 16)  # the smallest always runs; a larger one whose outputs pass the logits budget is skipped
SKIPPED_BATCHES = "skipped_batches"  # latency.<ep>.skipped_batches: {"batch16": why}, only where one was skipped


@dataclass(frozen=True)
class Tolerances:
    """fp32 torch vs fp32 ORT differ only by kernel summation order: ~1e-6 relative on logits (measured 7.6e-6
    absolute on logits of magnitude ~10). 1e-4 leaves headroom for other CPUs yet any real graph error (a wrong
    mask, a dropped bias) shows up at 1e-2 or more. Accuracy must then agree to 1e-4 relative for perplexity and
    to 0.5 points for exact match (a near-tie argmax may flip on one or two of 1000 examples)."""

    parity_max_rel: float = 1e-4
    perplexity_rel: float = 1e-4
    exact_match_abs: float = 0.005
    gate_logits: bool = True  # False: logits parity is reported against parity_max_rel, accuracy agreement gates

    @classmethod
    def for_artifact(cls, int_weights: bool, float16: bool = False, activations: bool = False) -> "Tolerances":
        """With k-bit int weights ONNX Runtime runs MatMulNBits at its default accuracy level 4, which quantizes
        activations to int8 on the fly: ~5e-3 relative error per MatMul (ort-facts), compounding over layers.
        Those artifacts are held to the fp32 tolerances with accuracy level 0 (exact; measured 1.4e-6), reported
        as parity.by_provider.<ep>_exact, and at the default session to 1e-2 on perplexity (measured 1e-4 on
        gpt-s, 3.4e-3 on SmolLM2 q4_1). Their default-session logits are compared at 6e-2 (gpt-s int4 2.6e-2)
        but not gated: on SmolLM2, whose activations have outliers in the hundreds, the int8 activations move
        them by ~0.1 while perplexity moves by 0.3%.

        Quantized activations (W8A8) round each Linear input to 256 levels: where ONNX Runtime's fused LayerNorm
        or attention differs from torch in the last float bit, a value can land one level apart, and those steps
        compound over the layers: once one value differs, the next layers' inputs differ by more than float
        noise and more of them flip. The gap grows with depth to the order of the activation quantization's own
        effect (measured: gpt-s 2.0e-2 static / 1.5e-2 dynamic; MiniLM 8.2e-2, and 4.5e-2 even against unfused
        QDQ, where quantizing the activations moves the embeddings by 1.1e-1; SmolLM2's 30 layers 0.49, with
        torch and ONNX Runtime perplexities 59.51 and 59.87). So their logits are reported against 0.15 but not
        gated, and what gates them is the accuracy agreement: perplexity to 1e-2, exact match and probe accuracy
        to 1 point. Logits cannot tell a subtly wrong kernel from this noise (u8 x s8 saturation on an AVX2 CPU
        measured 8.9e-2 on gpt-s): the kernels are tested exact layer by layer instead
        (tests/exporters/test_activation_qdq.py, test_integer_matmul.py), and the presets store 7-bit weight
        codes, which cannot saturate."""
        if activations:
            return cls(parity_max_rel=0.15, perplexity_rel=1e-2, exact_match_abs=0.01, gate_logits=False)
        if float16:  # float16 activations: ~1e-3 relative per op (measured on the GPT samples), so 1e-2
            return cls(parity_max_rel=6e-2 if int_weights else 1e-2, perplexity_rel=1e-2, exact_match_abs=0.01)
        if not int_weights:
            return cls()
        return cls(parity_max_rel=6e-2, perplexity_rel=1e-2, exact_match_abs=0.01)

    @classmethod
    def for_lowered(cls, lowered) -> "Tolerances":
        """For an artifact as exporters.lowering.lower_artifact describes it (its Lowered), default session."""
        return cls.for_artifact(lowered.int_weights, lowered.float16, lowered.integer_activations)

    @classmethod
    def exact_for_lowered(cls, lowered) -> "Tolerances":
        """For the exact session (accuracy level 0). Integer GEMMs have no approximate mode: the default session is
        the exact one."""
        return cls.for_artifact(lowered.int_weights and lowered.integer_activations, lowered.float16,
                                lowered.integer_activations)


@dataclass(frozen=True)
class BenchmarkSettings:
    warmup: int = 10
    runs: int = 50
    threads: int | None = None  # None: ORT's default (all cores)
    prompt_tokens: int = 128  # decoders with a KV cache: generation speed on this prompt length
    new_tokens: int = 128
    generation_runs: int = 3  # after one warm-up run


def parity(reference: np.ndarray, candidate: np.ndarray, max_rel_tolerance: float) -> dict:
    """max_rel is normwise: max |a - b| / max |a|, stable where single logits are near zero. In float64, a few
    positions at a time (one 256-token window of a 152k-token vocabulary is 311 MB in float64): maxima, so the
    same figures whatever the chunk."""
    if reference.shape != candidate.shape:
        raise ValueError(f"logits of shape {candidate.shape} cannot be compared with {reference.shape}")
    max_abs = max((float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
                   for a, b in _chunks(reference, candidate)), default=0.0)
    max_rel = max_abs / max(max((float(np.abs(a).max()) for a, _ in _chunks(reference, candidate)), default=0.0),
                            1e-12)
    return {"max_abs": max_abs, "max_rel": max_rel, "tolerance_max_rel": max_rel_tolerance,
            "passed": max_rel <= max_rel_tolerance}


def _chunks(reference: np.ndarray, candidate: np.ndarray):
    """(reference, candidate) slices of at most ~16 MiB in float64: one row (window) at a time, split along its
    positions where it is larger."""
    for a, b in zip(reference, candidate):
        if a.ndim < 2:  # a row of embeddings or a position's logits: small
            yield a, b
            continue
        step = max(1, (logits_budget.LOGITS_BUDGET_BYTES // 16) // max(1, a[0].size * 8))
        for start in range(0, len(a), step):
            yield a[start : start + step], b[start : start + step]


def accuracy_agreement(task: Task, reference: float, candidate: float, tolerances: Tolerances) -> dict:
    delta = abs(worsening(reference, candidate, task.HIGHER_IS_BETTER))
    if task.HIGHER_IS_BETTER:
        limit, kind = tolerances.exact_match_abs, "absolute"
    else:
        limit, kind = tolerances.perplexity_rel, "relative"
    return {"delta": delta, "kind": kind, "tolerance": limit, "passed": delta <= limit}


def benchmark_batches(task: Task, config: dict) -> tuple[list[int], dict[str, str]]:
    """BENCHMARK_BATCHES whose outputs fit compressor.tasks.logits_budget (the smallest always), and
    {"batch<b>": why} for those skipped (e.g. batch 16 of a 152k-token vocabulary's 256-token rows: 2.5 GB)."""
    batches, skipped = [], {}
    for batch in BENCHMARK_BATCHES:
        why = logits_budget.over_budget(task.output_bytes(config, task.benchmark_inputs(config, batch)))
        if why and batches:
            skipped[f"batch{batch}"] = f"not run: {why}"
        else:
            batches.append(batch)
    return batches, skipped


def run_benchmark(artifact: Path, task: Task, config: dict, provider: str,
                  settings: BenchmarkSettings, progress: bool = False) -> dict:
    """Latency p50/p90 at each batch size and peak RSS, measured in a fresh child process. With `progress`, a bar
    on stderr counts the child's warm-up and timed runs (it reports each on its stderr). Batch sizes over the
    logits budget are not run: SKIPPED_BATCHES says which and why."""
    batches, skipped = benchmark_batches(task, config)
    with tempfile.TemporaryDirectory() as scratch:
        inputs_path = Path(scratch) / "inputs.npz"
        arrays = {f"b{b}/{name}": value for b in batches
                  for name, value in task.benchmark_inputs(config, b).items()}
        np.savez(inputs_path, **arrays)
        command = ["compressor.ort_benchmark", str(artifact), str(inputs_path), "--provider", provider,
                   "--warmup", str(settings.warmup), "--runs", str(settings.runs)]
        total = len(batches) * (settings.warmup + settings.runs)
        measured = _run_child(command, settings, total, f"benchmark {provider}", artifact, provider, progress)
    return {**measured, SKIPPED_BATCHES: skipped} if skipped else measured


def run_generation_benchmark(artifact: Path, provider: str, settings: BenchmarkSettings,
                             progress: bool = False) -> dict:
    """Prefill ms, decode tokens/s and peak RSS of a decoder artifact (compressor.generation_benchmark)."""
    command = ["compressor.generation_benchmark", str(artifact), "--provider", provider,
               "--prompt-tokens", str(settings.prompt_tokens), "--new-tokens", str(settings.new_tokens),
               "--runs", str(settings.generation_runs)]
    return _run_child(command, settings, settings.generation_runs + 1, f"generation {provider}", artifact,
                      provider, progress)


def _run_child(command: list[str], settings: BenchmarkSettings, total: int, desc: str, artifact: Path,
               provider: str, progress: bool) -> dict:
    """python -m COMMAND in a child process; its last stdout line is the JSON result. A bar counts the progress
    lines it prints on stderr."""
    command = [sys.executable, "-m", *command]
    if settings.threads:
        command += ["--threads", str(settings.threads)]
    if progress:
        command.append("--progress")
    with tempfile.TemporaryDirectory() as scratch:
        # stdout into a file, so that reading stderr line by line cannot block on a full stdout pipe
        with (open(Path(scratch) / "stdout.txt", "w+") as stdout,
              subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, text=True) as child,
              tqdm(total=total, desc=desc, unit="run", disable=not progress, leave=False) as bar):
            stderr_lines = []
            try:
                for line in child.stderr:
                    if line.rstrip("\n") == PROGRESS_LINE:
                        bar.update()
                    else:
                        stderr_lines.append(line)
                returncode = child.wait()
            except BaseException:  # interrupted or terminated: the child must not outlive us
                child.kill()
                raise
            stdout.seek(0)
            output = stdout.read()
    if returncode != 0:
        last = ("".join(stderr_lines).strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{desc} of {artifact.name} failed: {last[:200]}")
    return json.loads(output.strip().splitlines()[-1])


def cached_logits(session, ids: np.ndarray, steps: int) -> np.ndarray:
    """Logits of the last `steps` positions of `ids` [B, T] computed through the KV cache: a prefill of the
    first T - steps tokens, then one token per call with the presents fed back."""
    outputs = [o.name for o in session.get_outputs()]
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    batch, length = ids.shape
    feeds = {"input_ids": ids[:, :length - steps], "attention_mask": np.ones((batch, length - steps), np.int64),
             **empty_cache(session, batch)}
    logits = []
    for position in range(length - steps, length):
        values = session.run(None, feeds)
        feeds = {past_name(n): v for n, v in zip(outputs, values) if n.startswith(PRESENT_PREFIX)}
        feeds.update(input_ids=ids[:, position:position + 1],
                     attention_mask=np.ones((batch, position + 1), np.int64))
        if position > length - steps:
            logits.append(values[0][:, -1])
    logits.append(session.run(None, feeds)[0][:, -1])
    return np.stack(logits, axis=1)


def generation_side_by_side(artifact: Path, input_artifact: Path | None, provider: str,
                            settings: BenchmarkSettings, progress: bool) -> dict:
    """The artifact's generation figures and, interleaved with them (artifact, input, artifact, input), the
    input model's uncompressed export's; medians over both rounds; speed-ups = input time / artifact time."""
    models = {"artifact": artifact, **({"input": input_artifact} if input_artifact else {})}
    rounds = {name: [] for name in models}
    for _ in range(GENERATION_ROUNDS):
        for name, path in models.items():
            rounds[name].append(run_generation_benchmark(path, provider, settings, progress))
    result = {}
    for name, runs in rounds.items():
        result[name] = {**runs[0], "rounds": len(runs),
                        **{key: float(np.median([r[key] for r in runs]))
                           for key in ("prefill_ms", "decode_tokens_per_s", "decode_ms_per_token", "peak_rss_mb")}}
    if "input" in result:
        result["speedup"] = {
            "decode": result["artifact"]["decode_tokens_per_s"] / result["input"]["decode_tokens_per_s"],
            "prefill": result["input"]["prefill_ms"] / result["artifact"]["prefill_ms"]}
    return result


DECODE_STEPS = 8
GENERATION_ROUNDS = 2
EXACT_MATMULNBITS = {"session.qdq_matmulnbits_accuracy_level": "0"}


def validate(task: Task, config: dict, artifact: Path, heldout, providers: list[str],
             torch_accuracy: float, reference_logits: np.ndarray, tolerances: Tolerances = Tolerances(),
             bench: BenchmarkSettings | None = BenchmarkSettings(), progress: bool = False,
             input_artifact: Path | None = None, exact: Tolerances = Tolerances()) -> dict:
    """Everything the report says about one artifact, held to the model it came from: `torch_accuracy` is that
    model's held-out metric and `reference_logits` its logits on task.parity_inputs(heldout) (the torch model
    after the passes, or an ONNX input's fake-quantized graph), both measured before export. A decoder with a
    KV cache is also checked through its cache (the last DECODE_STEPS positions decoded one token at a time)
    and its generation speed measured, side by side with `input_artifact` (the input model's own export, uncompressed)."""
    parity_batch = task.parity_inputs(heldout)
    report = {"accuracy": {"metric": task.METRIC, "higher_is_better": task.HIGHER_IS_BETTER,
                           "heldout_examples": int(len(heldout)), "torch": torch_accuracy, "onnxruntime": {},
                           "agreement": {}},
              "parity": {}, "latency": {}, "memory": {}}
    for provider in providers:  # `exact`: what the artifact is held to with exact kernels
        # one session alive at a time: the default one's work is done and it is freed before the exact one opens
        session = create_session(artifact, provider)
        ort_fn = logits_fn(session)
        metrics = measure(task, ort_fn, heldout, progress)
        accuracy = metrics.pop(task.METRIC)
        report["accuracy"]["onnxruntime"][provider] = accuracy
        if metrics:  # side metrics, e.g. the embeddings' cosine to the fp32 model's
            report["accuracy"].setdefault("side_metrics", {})[provider] = metrics
        report["accuracy"]["agreement"][provider] = accuracy_agreement(task, torch_accuracy, accuracy, tolerances)
        report["parity"][provider] = parity(reference_logits, ort_fn(parity_batch), tolerances.parity_max_rel)
        decodes = has_cache(session)
        if tolerances != exact:  # the same artifact with exact kernels must match torch at fp32 tolerance
            # the default kernel is approximate by design (int8 activations): reported, not gated; it is held to
            # the accuracy agreement instead, and the artifact itself to the exact entry
            report["parity"][provider]["gated"] = False
            del session, ort_fn
            session = create_session(artifact, provider, options=EXACT_MATMULNBITS)
            report["parity"][f"{provider}_exact"] = parity(reference_logits, logits_fn(session)(parity_batch),
                                                           exact.parity_max_rel)
        if decodes:  # the cache path: prefill, then one token per step, against the same torch logits
            steps = min(DECODE_STEPS, parity_batch["input_ids"].shape[1] - 1)
            report["parity"][f"{provider}_decode"] = parity(
                reference_logits[:, -steps:], cached_logits(session, parity_batch["input_ids"], steps),
                exact.parity_max_rel)
        if not exact.gate_logits:  # W8A8: no session is exact (see Tolerances.for_artifact)
            for name in (provider, f"{provider}_decode"):
                if name in report["parity"]:
                    report["parity"][name]["gated"] = False
        del session
        if bench is None:  # a sweep's run: accuracy and parity only, no latency or generation speed
            continue
        measured = run_benchmark(artifact, task, config, provider, bench, progress)
        report["memory"][provider] = measured.pop("memory")
        report["latency"][provider] = measured
        if decodes:
            report.setdefault("generation", {})[provider] = generation_side_by_side(
                artifact, input_artifact, provider, bench, progress)
    report["parity"] = summarize_parity(report["parity"])
    return report


def summarize_parity(by_provider: dict) -> dict:
    """Top-level parity: the worst over the gated entries; each session's own figures stay under its name.
    With none gated (W8A8 artifacts) it passes, and the run's parity gate rests on the accuracy agreement."""
    gated = [p for p in by_provider.values() if p.get("gated", True)]
    shown = gated or list(by_provider.values())  # nothing gated (W8A8): the figures are still the worst ones
    return {"max_abs": max(p["max_abs"] for p in shown), "max_rel": max(p["max_rel"] for p in shown),
            "tolerance_max_rel": max(p["tolerance_max_rel"] for p in shown),
            "passed": all(p["passed"] for p in gated), "gated": bool(gated), "by_provider": by_provider}
