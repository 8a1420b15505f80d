"""`compress run` on a decoder read and written one layer at a time, so that memory follows the largest layer and
not the model (llama.cpp's quantize, llm-compressor's sequential onloading).

Per layer: its tensors are read from disk (compressor.streaming.weights), it becomes a torch module of its own
under its whole-model names (compressor.streaming.layers), every torch pass of the recipe runs on it with the
calibration activations that reach it (each layer sees the compressed layers before it: GPTQ's sequential
order), the held-out activations move on through it twice (as given: the reference; compressed: the metric
before export and the parity logits), and its part of the graph is lowered and appended to model.onnx.data
(exporters.streamed_writer). The token table comes first (the compressed activations start from its rows), an
untied head last (compressor.streaming.parts).

Resumable: after each part its graph nodes, the activations and the data file's length are saved in --out's
progress folder; the same command after a kill continues from the last finished part, to the same bytes.
"""
import json
import os
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from compressor.artifact import ARTIFACT_NAME, assemble_report, pause_point, staged
from compressor.atomic import atomic_write_text
from compressor.errors import UserError
from compressor.onnx_file import EXTERNAL_DATA_ABOVE, data_path
from compressor.recipes import Recipe
from compressor.report import write_reports
from compressor.run_options import RunOptions
from compressor.run_record import artifact_metadata, side_files
from compressor.streaming import parts
from compressor.streaming.layers import PREFIX, Family, family_of
from compressor.streaming.memory import check_fits, peak_rss_bytes
from compressor.streaming.progress import Progress
from compressor.streaming.weights import WeightStore, open_weights, skeleton_folder
from compressor.tasks import TASKS
from compressor.validate import Tolerances, validate
from compressor.version import __version__
from exporters import metadata_keys
from exporters.decoder_graph import Decoder, Flow, decoder_io
from exporters.lowering import Lowered
from exporters.onnx_export import finalize
from exporters.streamed_writer import ExternalData, Part, assemble, merge_records
from passes.registry import PASSES, TORCH

FAMILY = "hf-causal-lm"
STREAM_ABOVE = EXTERNAL_DATA_ABOVE  # fp32 weight bytes past which a decoder is streamed (its artifact too is split)
# passes that need the whole model at once (training through every layer, a budget spread over all layers)
WHOLE_MODEL = {"heal": "it trains through every layer at once"}


def streamed_store(path: Path, adapter_kind: str, skeleton, options: RunOptions) -> WeightStore | None:
    """The input's weights, opened for a streamed run, or None for the whole-model path. The rule: a Llama-family
    decoder (safetensors folder or GGUF) whose fp32 weights pass STREAM_ABOVE (counted on `skeleton`, the model
    on the meta device) is streamed; anything smaller keeps the whole-model path and its one-file artifact.
    --stream / --no-stream decide instead when given."""
    if options.stream is False:
        return None
    if options.stream is None:
        params = sum(p.numel() for p in skeleton.parameters()) if skeleton is not None else 0
        if adapter_kind != "hugging-face" or 4 * params <= STREAM_ABOVE:
            return None
    elif adapter_kind != "hugging-face":
        raise UserError("--stream takes a Hugging Face decoder folder (safetensors) or a GGUF file of "
                        "llama / mistral / qwen2")
    try:
        return open_weights(path)
    except UserError:
        if options.stream:
            raise
        return None  # e.g. a pickled checkpoint: the whole-model path reads it (or says why not)


def refusal(recipe: Recipe) -> str | None:
    """Why the recipe cannot run streamed, or None."""
    for name, config in recipe.passes:
        if name in WHOLE_MODEL:
            return f"{name} cannot run on a streamed model: {WHOLE_MODEL[name]} (drop it, or --no-stream on a " \
                   f"machine that holds the whole model)"
        if name == "quantize" and config.budget_bits_per_param is not None:
            return "quantize.budget_bits_per_param cannot run on a streamed model yet: the allocator scores " \
                   "every layer before it quantizes any (give fixed bits, or --no-stream)"
    if recipe.export.dtype != "float32":
        return f"export.dtype {recipe.export.dtype} is not written by the streamed exporter yet (float32 only)"
    return None


def run_streamed(store: WeightStore, path: Path, out_dir: Path, recipe: Recipe, options: RunOptions, log) -> dict:
    """The run, with --out already locked and cleared of stale files (compressor.pipeline.run)."""
    reason = refusal(recipe)
    if reason:
        raise UserError(reason)
    started = time.monotonic()
    family = family_of(store.config)
    task = TASKS[FAMILY]
    config = _task_config(store, skeleton_folder(path))
    heldout = task.heldout_data(config, options.eval_limit)
    parity_windows = len(task.parity_inputs(heldout)["input_ids"])
    samples = max((c.calibration_samples for n, c in recipe.passes if PASSES[n].rewrites == TORCH and
                   c.needs_calibration), default=0)
    stream_bytes = (2 * len(heldout) + samples) * config["context"] * int(store.config.hidden_size) * 4
    budget = check_fits(store, stream_bytes, options.max_memory)
    files = sorted({entry.file for entry in store.entries.values()})
    progress = Progress(out_dir, _fingerprint(files, recipe, options))
    resumed = progress.resume()
    state = progress.state
    if resumed:
        log(f"resuming: {progress.parts_done} of {family.layers + (1 if store.tied else 2)} parts were finished by "
            f"an earlier run")
    name = _source_name(path)
    source_sha256 = progress.source_sha256(files)
    log(f"streaming {name} ({store.config.model_type}, {family.layers} layers, {len(heldout)} held-out windows, "
        f"budget {budget / 2**30:.1f} GiB) one layer at a time; recipe {recipe.name}")
    if not resumed:
        state.update(seconds=[], bytes_read=0, pass_records={}, layer_shapes=[],
                     bits={"total_model_bits": 0, "params": 0, "quantized_params": 0})
    data = ExternalData(progress.data_file, state["data_offset"])
    try:
        if resumed:
            streams = progress.load_streams()
        else:  # part 0: the token table (and a tied head), first: the compressed windows start from its rows
            begun, read_before = time.monotonic(), store.bytes_read
            part, records, bits, streams = parts.table_part(store, family, recipe, state, data, heldout, samples,
                                                            task, config, options.seed, log)
            _account(state, records, bits, begun, store.bytes_read - read_before)
            progress.finish_part(part, streams, data.flush())
            pause_point(f"part-{progress.parts_done}")
            log(f"token table{' and head' if store.tied else ''}: {state['seconds'][-1]:.1f} s, peak RSS "
                f"{peak_rss_bytes() / 2**30:.2f} GiB")
        for index in range(progress.parts_done - 1, family.layers):
            begun, read_before = time.monotonic(), store.bytes_read
            part, records, bits = parts.layer_part(store, index, family, recipe, streams, state, data)
            _account(state, records, bits, begun, store.bytes_read - read_before)
            progress.finish_part(part, streams, data.flush())
            pause_point(f"part-{progress.parts_done}")  # a test hook: the interrupt tests kill the run here
            log(f"layer {index + 1}/{family.layers}: {state['seconds'][-1]:.1f} s, peak RSS "
                f"{peak_rss_bytes() / 2**30:.2f} GiB")
        if "measured" not in state:
            begun, read_before = time.monotonic(), store.bytes_read
            if store.tied:
                parity = parts.measure_tied(store, family, recipe, streams, state, task, heldout, parity_windows)
            else:  # the last part: the final norm and the head, calibrated on what leaves the last layer
                part, records, bits, parity = parts.head_part(store, family, recipe, streams, state, data, task,
                                                              heldout, parity_windows)
                _account(state, records, bits, begun, store.bytes_read - read_before)
                progress.finish_part(part, None, data.flush())
                log(f"final norm and head: {state['seconds'][-1]:.1f} s, peak RSS "
                    f"{peak_rss_bytes() / 2**30:.2f} GiB")
            progress.finish_measured(parity)
        del streams
    finally:
        data.close()
    return _write_and_validate(path, out_dir, recipe, options, log, progress, family, task, config, heldout,
                               name, source_sha256, "gguf" if files[0].suffix == ".gguf" else "hugging-face",
                               resumed, started, budget)


def _write_and_validate(path, out_dir, recipe, options, log, progress, family, task, config, heldout, name,
                        source_sha256, kind, resumed, started, budget) -> dict:
    state, written = progress.state, progress.parts()
    inputs, outputs = decoder_io(_placeholder_ends(family), [tuple(shape) for shape in state["layer_shapes"]])
    last = Flow(**state["flow"])  # a tied head (part 0) reads the last layer's outputs under placeholder names
    proto = assemble(written, inputs, outputs, dict(zip(parts.HEAD_INPUTS, (last.x, last.residual))))
    files = side_files(config, proto, ARTIFACT_NAME)
    source_metadata = {metadata_keys.SOURCE: name, metadata_keys.SOURCE_SHA256: source_sha256}
    proto = finalize(proto, artifact_metadata(source_metadata, recipe, options, FAMILY, config, files))
    lowered = _merged_lowering(written)
    graph_facts = {"opset": max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")),
                   "ir_version": proto.ir_version}
    del written
    measured = state["measured"]
    bits = _bits(state["bits"], recipe.export.float_bits)
    input_bits = _bits({"total_model_bits": 32 * state["bits"]["params"], "params": state["bits"]["params"],
                        "quantized_params": 0}, 32)
    pass_records = [{**record, **bits, **measured["compressed"], "measured_after": "all passes (streamed)"}
                    for record in state["pass_records"].values()]
    written_peak = peak_rss_bytes()  # before validation opens ONNX Runtime sessions on the artifact
    with staged(out_dir) as stage:
        artifact = stage / ARTIFACT_NAME
        os.replace(progress.data_file, data_path(artifact))  # the progress folder lies in --out: same disk
        onnx.save_model(proto, str(artifact))
        del proto
        onnx.checker.check_model(str(artifact))
        for file_name, content in files.items():
            (stage / file_name).write_bytes(content)
        atomic_write_text(stage / "recipe.yaml", recipe.to_yaml() + f"# calibration sampling seed: --seed "
                                                                    f"{options.seed}\n")
        log(f"validating on {len(heldout)} held-out examples with ONNX Runtime ({', '.join(options.providers)})")
        results = validate(task, config, artifact, heldout, list(options.providers),
                           torch_accuracy=measured["compressed"][task.METRIC], reference_logits=progress.load_parity(),
                           tolerances=Tolerances.for_lowered(lowered), bench=options.bench, progress=options.progress,
                           input_artifact=None, exact=Tolerances.exact_for_lowered(lowered))
        results["memory"]["compress_peak_rss_mb"] = peak_rss_bytes() / 2**20
        model_record = {"name": name, "family": FAMILY, "source": str(path), "source_sha256": source_sha256,
                        "config": config, "input_format": kind, "params": bits["params"],
                        "input_params": input_bits["params"]}
        report = assemble_report(model_record, recipe, artifact, out_dir / ARTIFACT_NAME, graph_facts,
                                 lowered.record, bits, input_bits, pass_records, measured["reference"], results, None)
        report["run"] = {"seed": options.seed, "eval_limit": options.eval_limit, "providers": list(options.providers),
                         "bench_warmup": options.bench.warmup if options.bench else None,
                         "bench_runs": options.bench.runs if options.bench else None}
        report["streaming"] = {
            "streamed": True, "resumed": resumed, "layers": family.layers, "seconds_per_part": state["seconds"],
            "bytes_read": state["bytes_read"], "bytes_written": report["artifact"]["bytes"],
            "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1), "max_memory_mb": round(budget / 2**20, 1),
            # reading, compressing and writing, before validation's sessions (which hold the artifact itself)
            "peak_rss_mb_before_validation": round(written_peak / 2**20, 1),
            "wall_seconds": round(time.monotonic() - started, 1),
            "speed_baseline": "not written: ONNX Runtime would hold the input model's fp32 export whole, past the "
                              "run's memory budget"}
        write_reports(stage, report, plots=options.plots)
    progress.remove()
    return report


def _task_config(store: WeightStore, folder: Path) -> dict:
    from compressor.inputs.hf import DEFAULT_CONTEXT

    positions = int(getattr(store.config, "max_position_embeddings", 0) or DEFAULT_CONTEXT)
    return {"model_type": store.config.model_type, "tokenizer": str(folder.resolve()),
            "vocab_size": int(store.config.vocab_size), "context": int(min(DEFAULT_CONTEXT, positions)),
            "max_positions": positions}


def _source_name(path: Path) -> str:
    path = Path(path).resolve()
    if path.suffix == ".gguf":
        return path.stem
    return path.parent.name if path.name in ("model", "models", "checkpoint") else path.name


def _fingerprint(files: list[Path], recipe: Recipe, options: RunOptions) -> dict:
    """What a resumed run must share with the killed one for its saved parts to be reused."""
    return {"version": __version__, "recipe": recipe.to_dict(), "seed": options.seed,
            "eval_limit": options.eval_limit, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def _placeholder_ends(family: Family) -> Decoder:
    """The ends' description for names and shapes only (no table read)."""
    config = family.config
    return Decoder(vocab_size=int(config.vocab_size), max_positions=int(config.max_position_embeddings),
                   embed_name=f"{PREFIX}.embed_tokens.weight", embed=np.zeros((1, 1), np.float32), layers=[],
                   final_norm=None, lm_head=None, rotary_inv_freq=family.rotary.inv_freq.float().numpy(),
                   rotary_scaling=float(getattr(family.rotary, "attention_scaling", 1.0)))


def _account(state: dict, records: dict, bits: dict, begun: float, bytes_read: int) -> None:
    """A finished part's time, reads, bits and pass records added to the run's."""
    state["seconds"].append(round(time.monotonic() - begun, 3))
    state["bytes_read"] += bytes_read
    for key in ("total_model_bits", "params", "quantized_params"):
        state["bits"][key] += int(bits[key])
    for name, record in records.items():
        record = json.loads(json.dumps(record, default=str))
        merged = state["pass_records"].setdefault(name, {k: v for k, v in record.items()
                                                         if not isinstance(v, list)})
        for key, value in record.items():
            if isinstance(value, list):
                merged[key] = merged.get(key, []) + value


def _bits(totals: dict, float_bits: int) -> dict:
    return {**totals, "bits_per_param": totals["total_model_bits"] / totals["params"],
            "unquantized_bits_per_param": float_bits}


def _merged_lowering(parts: list[Part]) -> Lowered:
    return Lowered(merge_records([part.record for part in parts]), any(p.lowered.int_weights for p in parts),
                   any(p.lowered.integer_activations for p in parts), any(p.lowered.float16 for p in parts))
