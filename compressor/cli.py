"""The `compress` command: parses, calls the library, prints. User-fixable errors: one line, exit 2."""
import os
import re
import signal
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from compressor.version import __version__
from compressor.errors import UserError


EXIT_OK, EXIT_GATE, EXIT_USER_ERROR, EXIT_BUG = 0, 1, 2, 3


def _fail(message: str):
    click.echo(f"error: {' '.join(message.splitlines())}", err=True)
    sys.exit(EXIT_USER_ERROR)


def _bug(exc: BaseException):
    """An exception nobody anticipated: the traceback goes to a log file, the terminal gets one line."""
    import tempfile
    import time
    import traceback

    log = Path(tempfile.gettempdir()) / f"compress-bug-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        log.write_text("".join(traceback.format_exception(exc)), encoding="utf-8")
        where = f"traceback saved to {log}"
    except OSError:
        where = "the traceback could not be saved"
    from passes.calibration import first_line

    first = first_line(exc) if str(exc).strip() else ""
    click.echo(f"bug: unexpected {type(exc).__name__}{': ' + first if first else ''} ({where}; please report it)",
               err=True)
    sys.exit(EXIT_BUG)


def _usage_error(exc: click.UsageError):
    if isinstance(exc, getattr(click.exceptions, "NoArgsIsHelpError", ())):  # click >= 8.2: a bare group's help
        raise exc
    hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
    _fail(exc.format_message() + hint)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


class _Group(click.Group):
    """Turns a UserError (or a usage error, an interrupt, an OSError) anywhere below into one line on stderr and
    exit code 2."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            _usage_error(exc)

    def invoke(self, ctx):
        for name in ("SIGTERM", "SIGHUP"):  # ended by a scheduler or a closed terminal: clean up as for Ctrl-C
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), _interrupt)
        try:
            return super().invoke(ctx)
        except click.exceptions.Exit:  # a subcommand's --help (or --version): click's normal way out
            raise
        except click.UsageError as exc:
            _usage_error(exc)
        except UserError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted (no partial artifact was left)")
        except OSError as exc:  # e.g. disk full or permission denied mid-run: the environment, not a bug
            _fail(f"{exc.filename}: {exc.strerror or exc}" if exc.filename else str(exc.strerror or exc))
        except Exception as exc:  # noqa: BLE001  (anything else is ours to fix)
            _bug(exc)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="compress")
def main():
    """Compress trained Transformers into QDQ ONNX validated under ONNX Runtime.

    \b
    Exit codes: 0 ok; 1 a gate failed or `compress check` found a regression;
    2 a user error (one line naming the problem); 3 a bug (one line, traceback saved to a log file)."""


@main.command("run")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--recipe", default="fp32", show_default=True,
              help="A preset (fp32, int8, int4, int4-gptq, nf4, kmeans4, prune50-int4, lowrank-int4, chain-int4, ...; "
                   "see `compress passes`) or a YAML recipe file.")
@click.option("--set", "overrides", multiple=True, metavar="PASS.KEY=VALUE",
              help="Override a recipe field, e.g. --set quantize.bits=3 --set quantize.block_size=128.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Seed for calibration sampling.")
@click.option("--provider", "providers", multiple=True, default=("cpu",), show_default=True,
              type=click.Choice(["cpu", "cuda"]), help="ONNX Runtime execution provider(s) to validate on.")
@click.option("--eval-limit", type=click.IntRange(min=1), default=None,
              help="Score only the first N held-out examples (default: all).")
@click.option("--bench-runs", type=click.IntRange(min=1), default=50, show_default=True,
              help="Timed runs per batch size.")
@click.option("--no-bench", is_flag=True,
              help="Skip the latency and generation benchmarks: the report has accuracy, parity and size only.")
@click.option("--force", is_flag=True, help="Overwrite an existing artifact in --out.")
@click.option("--stream/--no-stream", default=None,
              help="Read, compress and write a Llama-family decoder one layer at a time (default: past 1 GiB of "
                   "fp32 weights). A killed streamed run resumes when the same command is run again.")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Memory a streamed run may use, e.g. 3GB or 2.5GiB (default: what the machine has available).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def run_command(checkpoint, out_dir, recipe, overrides, seed, providers, eval_limit, bench_runs, no_bench, force,
                stream, max_memory, quiet):
    """Export CHECKPOINT to OUT/model.onnx and validate it (report.json, report.md).

    CHECKPOINT is a checkpoint folder (config.json + model.safetensors), a weights file with config.json beside
    it, or the name of a shipped sample (see `compress sample list`)."""
    from compressor.api import compress
    from compressor.ort_runtime import headline_provider
    from compressor.report import summary_text
    from compressor.validate import BenchmarkSettings

    if no_bench and click.get_current_context().get_parameter_source("bench_runs") is ParameterSource.COMMANDLINE:
        raise UserError("--no-bench skips the benchmark that --bench-runs sets: pass one of them")
    bench = BenchmarkSettings(runs=bench_runs, warmup=min(10, bench_runs))  # a 135M LM's b16 run takes seconds
    report = compress(checkpoint, recipe, out_dir, overrides=overrides, seed=seed, providers=providers,
                      eval_limit=eval_limit, bench=None if no_bench else bench, force=force, progress=not quiet,
                      stream=stream, max_memory=parse_size("--max-memory", max_memory),
                      log=lambda m: click.echo(m, err=True))
    accuracy = report["accuracy"]
    click.echo(f"{report['model']['name']} [{report['recipe']['name']}]: {accuracy['metric']} fp32 "
               f"{accuracy['reference']:.4f}, compressed torch {accuracy['torch']:.4f}, " + ", ".join(
                   f"onnxruntime-{p} {v:.4f}" for p, v in accuracy["onnxruntime"].items())
               + f"; {report['bits_per_param']:.3f} bits/param")
    parity_line = f"parity max_rel {report['parity']['max_rel']:.2e}"
    if not report["parity"]["gated"]:  # W8A8: no session is exact; the accuracy agreement gates
        parity_line += " (integer activations: reported, the accuracy agreement gates)"
    else:
        ungated = [f"{p} {v['max_rel']:.2e}" for p, v in report["parity"]["by_provider"].items()
                   if not v.get("gated", True)]
        parity_line += f" (default kernel, not gated: {', '.join(ungated)})" if ungated else ""
    if report["latency"]:
        latency = report["latency"][headline_provider(report["latency"])]
        parity_line += "; latency p50 " + ", ".join(f"{key} {stats['p50_ms']:.3f} ms"
                                                    for key, stats in latency.items() if key.startswith("batch"))
        if latency.get("skipped_batches"):  # over the logits budget (compressor.tasks.logits_budget)
            parity_line += f" ({', '.join(latency['skipped_batches'])} not run: logits over budget)"
    else:
        parity_line += "; latency not measured (--no-bench)"
    click.echo(parity_line + f"; artifact {report['artifact']['bytes']:,} bytes")
    click.echo(f"wrote {out_dir / 'model.onnx'}, {out_dir / 'report.json'}, {out_dir / 'report.md'}")
    failed = [c for c in report["gates"]["checks"] if not c["passed"]]
    for check in failed:
        click.echo(f"gate failed: {check['gate']} {check['value']:.4g} (threshold {check['threshold']:.4g})", err=True)
    click.echo(f"summary: {summary_text(report['summary'])}")
    if failed:
        sys.exit(EXIT_GATE)


@main.command("scaling")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Output folder: scaling.json, scaling.md, plots, runs/ (reused by a rerun).")
@click.option("--dtypes", default="int,nf,float,quantile,kmeans,log2", show_default=True, help="Data types.")
@click.option("--bits", default="2,3,4,5,6,8", show_default=True, help="Bit widths k (2..8).")
@click.option("--block-sizes", default="32,64,128,channel", show_default=True,
              help="Block sizes B (powers of two 16..1024) or 'channel' (one scale per output row).")
@click.option("--budget", "budgets", multiple=True, metavar="BITS_PER_PARAM",
              help="Also run the bit-budget allocator at this many bits/param (repeatable or a comma list).")
@click.option("--eval-limit", type=click.IntRange(min=1), default=None,
              help="Score the first N held-out examples  [default: 64].")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Ray workers on this machine (2 or more needs `pip install compressor[scaling]`).")
@click.option("--ray-address", default=None, help="Join this Ray cluster instead of starting one.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Calibration seed.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def scaling_command(checkpoint, out_dir, dtypes, bits, block_sizes, budgets, eval_limit, workers, ray_address, seed,
                    quiet):
    """Sweep CHECKPOINT over data types x bits x block sizes (and bit budgets): every configuration through
    `compress run`'s pipeline, scored in ONNX Runtime; writes OUT/scaling.json, OUT/scaling.md and plots."""
    from compressor.scaling import DEFAULT_EVAL_LIMIT, Settings, parse_grid, sweep

    grid = parse_grid(dtypes, bits, block_sizes, budgets)
    settings = Settings(eval_limit=eval_limit or DEFAULT_EVAL_LIMIT, seed=seed)
    result = sweep(checkpoint, out_dir, grid, settings, workers, ray_address, progress=not quiet,
                   log=lambda m: click.echo(m, err=True))
    ok = [r for r in result["runs"] if r["status"] == "ok"]
    front = ", ".join(r["label"] for r in result["pareto"])
    click.echo(f"{len(ok)} of {len(result['runs'])} configurations measured ({len(result['runs']) - len(ok)} "
               f"skipped) in {result['timing']['seconds']:.0f} s; Pareto front: {front or 'none'}")


@main.command("check")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--baseline", required=True, type=click.Path(path_type=Path), help="A report.json to hold it to.")
@click.option("--tolerance", default=0.01, show_default=True, type=click.FloatRange(min=0),
              help="Allowed worsening: relative for perplexity, absolute for exact match.")
def check_command(artifact, baseline, tolerance):
    """Re-measure ARTIFACT's held-out accuracy in ONNX Runtime; exit 1 if it regressed past the baseline."""
    from compressor.check import check_artifact

    result = check_artifact(artifact, baseline, tolerance)
    click.echo(result.line())
    if not result.passed:
        sys.exit(EXIT_GATE)


@main.command("generate")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="The text to continue.")
@click.option("--max-new-tokens", default=64, show_default=True, type=click.IntRange(min=1, max=1_000_000))
@click.option("--provider", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0: greedy.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0: no cut.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Sampling seed.")
@click.option("--stats", is_flag=True, help="Print prefill ms and decode tokens/s on stderr at the end.")
def generate_command(artifact, prompt, max_new_tokens, provider, temperature, top_k, top_p, seed, stats):
    """Continue PROMPT with the decoder ARTIFACT (an out folder or its model.onnx), streaming tokens."""
    from compressor.deployed import open_artifact
    from compressor.generation import Sampling, generate, require_cache
    from compressor.kv_cache import keeps_cache_in_place
    from compressor.ort_runtime import check_providers, create_session
    from compressor.text_codec import load_text_codec

    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    _check_utf8("--prompt", prompt)
    deployed = open_artifact(artifact)
    check_providers((provider,))
    session = create_session(deployed.path, provider)
    require_cache(session)  # an encoder or seq2seq artifact: say so, not that it lacks a tokenizer
    try:
        codec = load_text_codec(deployed.folder, deployed.family)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001  (the tokenizers package raises a bare Exception for a file it cannot parse)
        from passes.calibration import first_line

        raise UserError(f"{deployed.folder / 'tokenizer.json'}: not a tokenizer that can be read "
                        f"({first_line(exc, 120)})") from None
    tokens, shown = [], ""

    def stream(token: int) -> None:
        nonlocal shown
        if not tokens:  # the prompt once the first token is chosen: after every check, so a refusal prints nothing
            click.echo(prompt, nl=False)
        tokens.append(token)
        text = codec.decode(tokens)
        if text.startswith(shown):  # print what the new token added (a multi-byte character may need several)
            click.echo(text[len(shown):], nl=False)
            shown = text

    result = generate(session, codec.encode(prompt), max_new_tokens, provider, sampling, codec.stop_ids, stream,
                      in_place=keeps_cache_in_place(session, deployed.folder))
    click.echo()
    if stats:
        click.echo(f"{len(result.tokens)} tokens; prefill {result.prefill_ms:.1f} ms; decode "
                   f"{result.decode_tokens_per_s:.1f} tokens/s ({provider})", err=True)


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
              "GIB": 2**30, "TIB": 2**40}


def parse_size(option: str, text: str | None) -> int | None:
    """'3GB', '2.5GiB', '800MB', or bytes -> bytes; UserError for anything else."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in SIZE_UNITS or float(match.group(1)) * SIZE_UNITS[unit] < 2**20:
        raise UserError(f"{option} takes a size of at least 1 MiB such as 3GB or 2.5GiB, not {text[:40]!r}")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def _check_utf8(option: str, text: str) -> None:
    """Arguments that are not UTF-8 reach Python as lone surrogates (PEP 383), which no tokenizer or terminal takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = ord(text[exc.start]) - 0xDC00 if 0xDC80 <= ord(text[exc.start]) <= 0xDCFF else None
        what = f"the byte 0x{byte:02x}" if byte is not None else f"U+{ord(text[exc.start]):04X}"
        raise UserError(f"{option} is not UTF-8 text ({what} at character {exc.start + 1}): give it as UTF-8") \
            from None


MAX_THREADS = 1024  # ONNX Runtime makes each one up front: 10^6 of them would exhaust the process, not time it


@main.command("bench")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--provider", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--prompt-tokens", default=128, show_default=True, type=click.IntRange(min=1, max=1_000_000))
@click.option("--new-tokens", default=128, show_default=True, type=click.IntRange(min=2, max=1_000_000))
@click.option("--runs", default=3, show_default=True, type=click.IntRange(min=1, max=10_000),
              help="Timed runs after one warm-up run.")
@click.option("--threads", default=None, type=click.IntRange(min=1, max=MAX_THREADS),
              help="ONNX Runtime intra-op threads.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def bench_command(artifact, provider, prompt_tokens, new_tokens, runs, threads, as_json):
    """Time ARTIFACT under ONNX Runtime: prefill ms, decode tokens/s and peak RSS for a decoder with a KV cache,
    batch latency for anything else (each in a fresh child process)."""
    import json

    from compressor.deployed import open_artifact
    from compressor.ort_runtime import check_providers
    from compressor.tasks import TASKS
    from compressor.validate import BenchmarkSettings, run_benchmark, run_generation_benchmark

    deployed = open_artifact(artifact)
    check_providers((provider,))
    settings = BenchmarkSettings(warmup=min(10, runs), runs=runs, threads=threads, prompt_tokens=prompt_tokens,
                                 new_tokens=new_tokens, generation_runs=runs)
    if deployed.decodes:
        result = run_generation_benchmark(deployed.path, provider, settings)
        line = (f"{deployed.path}: prefill {result['prompt_tokens']} tokens {result['prefill_ms']:.2f} ms; decode "
                f"{result['decode_tokens_per_s']:.1f} tokens/s ({result['new_tokens']} new); peak RSS "
                f"{result['peak_rss_mb']:.0f} MiB ({provider})")
    else:
        if deployed.family not in TASKS or not deployed.config:
            raise UserError(f"{deployed.path}: no compressor metadata (family, model config): cannot make inputs")
        measured = run_benchmark(deployed.path, TASKS[deployed.family], deployed.config, provider, settings)
        result = {"provider": provider, **{k: v for k, v in measured.items() if k.startswith("batch")},
                  "peak_rss_mb": round(measured["memory"]["peak_rss_bytes"] / 2**20, 1)}
        skipped = measured.get("skipped_batches", {})
        if skipped:
            result["skipped_batches"] = skipped
        line = f"{deployed.path}: " + ", ".join(f"{k} p50 {v['p50_ms']:.3f} ms" for k, v in result.items()
                                              if k.startswith("batch")) + f"; peak RSS {result['peak_rss_mb']:.0f} MiB"
        line += "".join(f"; {k} {why}" for k, why in skipped.items())
    click.echo(json.dumps(result) if as_json else line)


@main.command("passes")
def passes_command():
    """List the passes, in stage order, with their fields and defaults, then the presets."""
    import dataclasses

    from compressor.recipes import PRESETS, Gates
    from passes.registry import PASSES

    for spec in sorted(PASSES.values(), key=lambda spec: spec.stage):
        summary = (sys.modules[spec.config.__module__].__doc__ or "").strip().splitlines()[0]
        click.echo(f"{spec.name} (stage {spec.stage}, rewrites the {spec.rewrites} model): {summary}")
        for f in dataclasses.fields(spec.config):
            kind = getattr(f.type, "__name__", str(f.type))
            click.echo(f"    {f.name}: {kind} = {f.default!r}")
    click.echo("gates:")
    for f in dataclasses.fields(Gates):
        click.echo(f"    {f.name}: {getattr(f.type, '__name__', str(f.type))} = {f.default!r}")
    click.echo("presets:")
    for name, passes in PRESETS.items():
        click.echo(f"    {name}: " + ("; ".join(f"{p} {fields}" for p, fields in passes.items()) or "no passes"))


@main.group("sample")
def sample_group():
    """The sample Transformers that ship with compressor."""


@sample_group.command("list")
def sample_list():
    """Name the samples, their sizes and whether trained weights ship."""
    from samples.registry import SAMPLES, SHIPPED_DIR, build_model, count_params

    for spec in SAMPLES.values():
        params = count_params(build_model(spec.family, spec.config.to_dict()))
        shipped = SHIPPED_DIR / spec.name
        where = f"shipped: {shipped}" if shipped.is_dir() else "train with `compress sample train`"
        click.echo(f"{spec.name:<16} {spec.family:<8} {params:>11,} params  {spec.description}  [{where}]")


@sample_group.command("train")
@click.argument("name")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Checkpoint folder.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0, max=2**32 - 1))
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Override the sample's step count.")
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu or cuda.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sample_train(name, out_dir, seed, steps, device, quiet):
    """Train sample NAME (seeded, deterministic) and write its checkpoint to OUT."""
    from samples.registry import SAMPLES
    from compressor.train import train_sample

    if name not in SAMPLES:
        raise UserError(f"unknown sample {name!r} (available: {', '.join(SAMPLES)})")
    _check_device(device)
    record = train_sample(name, out_dir, seed=seed, steps=steps, device=device, progress=not quiet)
    metric = {k: v for k, v in record.items() if k.startswith("heldout_") and isinstance(v, float)}
    click.echo(f"trained {name} ({record['params']:,} params, {record['steps']} steps, "
               f"{record['train_seconds']} s): {metric} -> {out_dir}")


def _check_device(device: str) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device[:40]!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: this torch build or machine has no CUDA device")
    if kind not in ("cpu", "cuda"):
        raise UserError(f"--device {device[:40]!r}: training runs on cpu or cuda")


if __name__ == "__main__":
    main()
