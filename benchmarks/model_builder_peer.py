"""ONNX Runtime GenAI Model Builder as the peer of our runs (issue 24's benchmark, benchmarks/scale.py): its int4
build of a model with the build's wall time and peak RSS, the artifact's bytes, held-out perplexity, and decode
tok/s in a fresh process.

    from model_builder_peer import build_int4, decode, perplexity
    built = build_int4(source, out)   # {"folder", "wall_s", "peak_rss_bytes", "bytes", "hf_folder", "dequantize", ...}
    speed = decode(built["folder"])   # {"decode_tokens_per_s", "prefill_ms", ...}: benchmarks/genai_cpu_generation.py
    ppl = perplexity(built["folder"], built["hf_folder"], windows=8)

`source` is a Hugging Face folder or a GGUF file. Model Builder 0.18 takes a GGUF only when its tensors are float
(builders/base.py load_weights -> loaders/gguf.py GGUFModel: `torch.tensor(tensor.data)` then a reshape to the float
shape, no dequantization; the config and tokenizer come from `-m`, a Hub name), so a GGUF with quantized tensors
(Q4_K, Q6_K, ...) is first dequantized once into a Hugging Face folder (`hf_folder`: transformers' GGUF loader,
bf16 safetensors by default, config + tokenizer), a step timed and reported apart (`dequantize`) and reused on later
calls. Every step runs as a child under `/usr/bin/time -v` (peak RSS: its "Maximum resident set size") and is
killed if its process tree passes `limit_bytes` of RSS.

Model Builder's own int4 step (Model.to_nbits) serializes the whole model, every weight as fp32, into one ModelProto
before quantizing; on Qwen2.5-Coder-1.5B that passed 10 GB and was killed. `per_weight=True` runs Model Builder
with that step done one weight at a time (_to_nbits_per_matmul: the same ONNX Runtime quantizer and settings on a
one-node model per weight), which writes the same artifact (SmolLM2-135M: model.onnx.data byte-identical, model.onnx
identical but for producer_version, which stamps `git rev-parse HEAD` of the checkout the venv lives in); its wall
time and peak RSS are then that variant's, not stock Model Builder's: say so beside them.

As a command (the pieces one by one):
    python benchmarks/model_builder_peer.py dequantize GGUF OUT [--dtype bfloat16]
    python benchmarks/model_builder_peer.py build SOURCE OUT [--threads 2] [--per-weight]
    python benchmarks/model_builder_peer.py decode FOLDER [--threads 2] [--runs 3]
    python benchmarks/model_builder_peer.py perplexity FOLDER --tokenizer HF_FOLDER [--windows 8]
    python benchmarks/model_builder_peer.py builder-per-matmul MODEL-BUILDER-ARGS...
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIMIT_BYTES = 10 * 10**9  # a child whose process tree passes this RSS is killed (shared 24 GiB machine)
FLOAT_GGUF_TYPES = {"F32", "F16", "BF16"}
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def run_measured(command: list[str], env: dict | None = None, limit_bytes: int = LIMIT_BYTES,
                 log: Path | None = None) -> dict:
    """`command` under /usr/bin/time -v: {"returncode", "wall_s", "peak_rss_bytes", "killed", "tail"}. A watcher
    polls the process tree's summed RSS every 0.5 s and kills the tree past `limit_bytes` (killed: True)."""
    import psutil

    with tempfile.NamedTemporaryFile("w+", suffix=".time", delete=False) as stats:
        stats_path = stats.name
    full = ["/usr/bin/time", "-v", "-o", stats_path, *command]
    output = open(log, "w") if log else tempfile.TemporaryFile("w+")
    start = time.perf_counter()
    process = subprocess.Popen(full, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                               start_new_session=True)
    killed, tree_peak = [False], [0]

    def watch() -> None:
        try:
            parent = psutil.Process(process.pid)
        except psutil.Error:
            return
        while process.poll() is None:
            try:
                tree = [parent, *parent.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in tree if p.is_running())
            except psutil.Error:
                rss = 0
            tree_peak[0] = max(tree_peak[0], rss)
            if rss > limit_bytes:
                killed[0] = True
                os.killpg(process.pid, 9)  # the session this call started: the child and its own children only
                return
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    returncode = process.wait()
    wall = time.perf_counter() - start
    watcher.join()
    text = Path(stats_path).read_text()
    os.unlink(stats_path)
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if log:
        tail = Path(log).read_text()[-2000:]
    else:
        output.seek(0)
        tail = output.read()[-2000:]
    output.close()
    return {"returncode": returncode, "wall_s": wall, "peak_rss_bytes": int(found.group(1)) * 1024 if found else None,
            "tree_peak_rss_bytes": tree_peak[0], "killed": killed[0], "tail": tail}


def artifact_bytes(folder: Path) -> int:
    """model.onnx plus its external data (model.onnx.data, or whatever model.onnx* Model Builder wrote)."""
    return sum(p.stat().st_size for p in Path(folder).glob("model.onnx*"))


def gguf_is_float(gguf: Path) -> bool:
    from gguf import GGUFReader

    return all(t.tensor_type.name in FLOAT_GGUF_TYPES for t in GGUFReader(str(gguf)).tensors)


def _dequantize_here(gguf: Path, out: Path, dtype: str) -> None:
    """In this process: transformers' GGUF loader (each tensor cast to `dtype` right after dequantization), saved as
    safetensors with config and tokenizer; written beside `out` and renamed into place."""
    import torch

    from compressor.hf_offline import offline_transformers

    transformers = offline_transformers()
    torch_dtype = getattr(torch, dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch_dtype)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None  # plain float weights now: save as an ordinary model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(str(scratch))
        tokenizer.save_pretrained(str(scratch))
        (scratch / "gguf_source.json").write_text(json.dumps({"file": str(gguf), "dtype": dtype}) + "\n")
        os.replace(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def hf_folder(gguf: Path, out: Path, dtype: str = "bfloat16", limit_bytes: int = LIMIT_BYTES) -> dict:
    """The Hugging Face folder `out` made from `gguf` in a child process (reused when gguf_source.json is there):
    {"folder", "wall_s", "peak_rss_bytes", "reused"}."""
    out = Path(out)
    if (out / "gguf_source.json").is_file():
        return {"folder": str(out), "wall_s": None, "peak_rss_bytes": None, "reused": True}
    command = [sys.executable, str(Path(__file__).resolve()), "dequantize", str(gguf), str(out), "--dtype", dtype]
    done = run_measured(command, OFFLINE, limit_bytes)
    if done["returncode"] != 0:
        raise RuntimeError(f"dequantizing {gguf} failed (exit {done['returncode']}, killed at the RSS limit: "
                           f"{done['killed']}): {done['tail'][-600:]}")
    return {"folder": str(out), "wall_s": done["wall_s"], "peak_rss_bytes": done["peak_rss_bytes"], "reused": False}


def build_int4(source: Path, out: Path, threads: int | None = None, extra: list[str] | None = None,
               limit_bytes: int = LIMIT_BYTES, dtype: str = "bfloat16", hf_dir: Path | None = None,
               per_weight: bool = False) -> dict:
    """Model Builder's `-p int4 -e cpu` of `source` (a Hugging Face folder, or a GGUF: see the module's text) into
    `out` (made afresh), timed in a child: {"folder", "wall_s", "peak_rss_bytes", "bytes", "hf_folder",
    "dequantize", "command", "int4_step"}. `hf_dir`: where a quantized GGUF's Hugging Face folder goes (default:
    beside out). per_weight: Model Builder with its int4 step one weight at a time (_to_nbits_per_matmul: the
    same artifact bytes, checked on SmolLM2-135M; its wall time and peak RSS are then not stock Model Builder's)."""
    source, out = Path(source), Path(out)
    dequantize, model_args = None, ["-i", str(source)]
    if source.suffix == ".gguf" and not gguf_is_float(source):
        hf_dir = Path(hf_dir) if hf_dir else out.parent / f"{source.stem}-hf-{dtype}"
        dequantize = hf_folder(source, hf_dir, dtype, limit_bytes)
        model_args = ["-i", str(hf_dir)]
    elif source.suffix == ".gguf":  # float GGUF: Model Builder reads it, the config and tokenizer from -m
        raise NotImplementedError("a float GGUF needs -m with its config: pass its Hugging Face folder instead")
    if out.exists():
        shutil.rmtree(out)
    cache = out.parent / f".{out.name}-cache"
    runner = [str(Path(__file__).resolve()), "builder-per-matmul"] if per_weight else \
        ["-m", "onnxruntime_genai.models.builder"]
    command = [sys.executable, *runner, *model_args, "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(cache),
               *(extra or [])]
    env = {**OFFLINE, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    done = run_measured(command, env, limit_bytes)
    shutil.rmtree(cache, ignore_errors=True)
    if done["returncode"] != 0 or not (out / "model.onnx").is_file():
        raise RuntimeError(f"Model Builder failed (exit {done['returncode']}, killed at the RSS limit: "
                           f"{done['killed']}): {done['tail'][-800:]}")
    return {"folder": str(out), "wall_s": done["wall_s"], "peak_rss_bytes": done["peak_rss_bytes"],
            "bytes": artifact_bytes(out), "hf_folder": model_args[1], "dequantize": dequantize,
            "command": " ".join(command), "int4_step": "per weight" if per_weight else "Model Builder's own"}


def decode(folder: Path, threads: int = 2, runs: int = 3, rounds: int = 1) -> dict:
    """Decode speed of `folder` under ONNX Runtime GenAI in a fresh process (benchmarks/genai_cpu_generation.py:
    seeded 128-token prompt, 128 greedy tokens, first run discarded, medians): {"decode_tokens_per_s",
    "prefill_ms", "new_tokens", "rounds": [...]}."""
    import statistics

    command = [sys.executable, str(HERE / "genai_cpu_generation.py"), f"x={folder}", "--threads", str(threads),
               "--runs", str(runs), "--rounds", str(rounds)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if done.returncode != 0:
        raise RuntimeError(f"decoding {folder} failed: {done.stderr.strip()[-600:]}")
    rows = json.loads(done.stdout.strip().splitlines()[-1])["x"]
    return {"decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in rows),
            "prefill_ms": statistics.median(r["prefill_ms"] for r in rows), "new_tokens": rows[0]["new_tokens"],
            "threads": threads, "rounds": rows}


def perplexity(folder: Path, tokenizer: Path, windows: int = 8, threads: int = 2, context: int = 256) -> dict:
    """Held-out perplexity of an artifact folder through ONNX Runtime (benchmarks/generation.py's _perplexity, the
    project's evaluation code: one window a batch where the vocabulary is large) on the first `windows` held-out
    windows of `context` tokens, tokenized with `tokenizer` (a folder transformers reads): {"perplexity",
    "windows", "window_tokens"}. In this process: call it from a child where its memory matters."""
    sys.path[:0] = [str(HERE), str(HERE.parent)]
    from generation import _perplexity

    from compressor.tasks import hf_language_modeling

    vocab = json.loads((Path(folder) / "genai_config.json").read_text())["model"]["vocab_size"]
    data = hf_language_modeling.heldout_data({"tokenizer": str(tokenizer), "context": context, "vocab_size": vocab},
                                             windows)
    return {"perplexity": float(_perplexity(str(folder), data, threads)), "windows": int(data.shape[0]),
            "window_tokens": int(data.shape[1] - 1)}


def _to_nbits_per_matmul(original):
    """Model Builder's int4 step one weight at a time: each MatMul / Gather goes alone (a one-node model holding only
    its weight) through the same MatMulNBitsQuantizer with the same settings, and the MatMulNBits /
    GatherBlockQuantized node and initializers it makes take the node's place. Model Builder's own to_nbits first
    serializes the whole fp32 model into one ModelProto (1.5B parameters: past 10 GB). Only the plain case (default
    algorithm, QOperator, no per-node overrides, no CUDA prepacking); anything else goes to Model Builder's own."""
    def to_nbits(self):
        import onnx
        import onnx_ir as ir
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
        from onnxruntime.quantization.quant_utils import QuantFormat

        attrs = self.quant_attrs
        op_types = tuple(attrs["op_types_to_quantize"])
        graph = self.model.graph
        if (getattr(self, "exact_quant_override_names", None) or getattr(self, "int4_customized_weight_config", None)
                or getattr(self, "quantization_algo", "default") != "default" or attrs["use_qdq"]
                or not set(op_types) <= {"MatMul", "Gather"}
                or (self.ep == "cuda" and self.matmul_attrs["weights_prepacked"] > 0)
                or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for n in graph
                       for a in n.attributes.values())):
            print(f"int4 step: Model Builder's own (not the per-weight one): {attrs}", file=sys.stderr)
            return original(self)
        exclude = set(attrs["nodes_to_exclude"])
        for node in list(graph):
            if node.op_type not in op_types or node.domain != "" or node.name in exclude:
                continue
            weight = node.inputs[0 if node.op_type == "Gather" else 1]
            if weight is None or not weight.is_initializer() or weight.const_value is None:
                continue
            tensor = ir.serde.serialize_tensor(weight.const_value)
            tensor.name = weight.name
            inputs = [onnx.helper.make_tensor_value_info(v.name, int(v.dtype) if v.dtype else tensor.data_type, None)
                      for v in node.inputs if v is not None and v is not weight]
            outputs = [onnx.helper.make_tensor_value_info(v.name, tensor.data_type, None) for v in node.outputs]
            mini = onnx.helper.make_model(
                onnx.helper.make_graph([ir.serde.serialize_node(node)], "one", inputs, outputs, [tensor]),
                opset_imports=[onnx.helper.make_opsetid("", self.model.opset_imports.get("", 21))])
            mini.ir_version = self.model.ir_version or 10
            quant = MatMulNBitsQuantizer(model=mini, bits=attrs["bits"], block_size=attrs["matmul_block_size"],
                                         is_symmetric=attrs["is_symmetric"], accuracy_level=attrs["accuracy_level"],
                                         nodes_to_exclude=[], quant_format=QuantFormat.QOperator,
                                         op_types_to_quantize=op_types, algo_config=None)
            quant.process()
            made_proto = quant.model.model
            values = {v.name: v for v in node.inputs if v is not None}
            for init in made_proto.graph.initializer:
                # a copy of its own: a tensor read from made_proto would keep that whole protobuf (with the fp32
                # weight it held) alive, about the fp32 model in all by the last layer
                alone = onnx.TensorProto()
                alone.CopyFrom(init)
                tensor_ir = ir.serde.deserialize_tensor(alone)
                value = ir.Value(name=init.name, shape=tensor_ir.shape,
                                 type=ir.TensorType(tensor_ir.dtype), const_value=tensor_ir)
                graph.register_initializer(value)
                values[init.name] = value
            made_proto.graph.ClearField("initializer")
            done = ir.from_proto(made_proto)
            del quant, mini, tensor, made_proto
            new_nodes = []
            for made in done.graph:
                new = ir.Node(made.domain, made.op_type, [values[v.name] if v is not None else None
                                                          for v in made.inputs],
                              attributes=list(made.attributes.values()), name=made.name,
                              num_outputs=len(made.outputs), version=made.version)
                for old, out in zip(made.outputs, new.outputs):
                    out.name, values[old.name] = old.name + ".q", out
                new_nodes.append(new)
            old_outputs = list(node.outputs)
            ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, old_outputs,
                                                    [values[v.name] for v in old_outputs])
            if not weight.uses():
                graph.initializers.pop(weight.name)
            for domain, version in done.opset_imports.items():  # com.microsoft 1; "" 21 where Gather is quantized
                if domain not in self.model.opset_imports or self.model.opset_imports[domain] < version:
                    self.model.opset_imports[domain] = version
            if self.model.ir_version is not None and self.model.ir_version < done.ir_version:
                self.model.ir_version = done.ir_version
        return self.model

    return to_nbits


def _builder_per_matmul(argv: list[str]) -> None:
    """`python -m onnxruntime_genai.models.builder ARGV` in this process with to_nbits done per MatMul."""
    import runpy

    import onnxruntime_genai.models.builder  # noqa: F401  (puts its folder on sys.path: `builders` below)
    import builders.base  # noqa: E402

    builders.base.Model.to_nbits = _to_nbits_per_matmul(builders.base.Model.to_nbits)
    sys.argv = ["builder", *argv]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")


def main() -> None:
    if sys.argv[1:2] == ["builder-per-matmul"]:  # the rest is Model Builder's own command line
        return _builder_per_matmul(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    one = sub.add_parser("dequantize", help="GGUF -> Hugging Face folder, in this process")
    one.add_argument("gguf", type=Path)
    one.add_argument("out", type=Path)
    one.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    two = sub.add_parser("build", help="Model Builder int4 of SOURCE into OUT, timed")
    two.add_argument("source", type=Path)
    two.add_argument("out", type=Path)
    two.add_argument("--threads", type=int, default=None)
    two.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    two.add_argument("--per-weight", action="store_true", help="the int4 step one weight at a time (same bytes)")
    five = sub.add_parser("perplexity", help="held-out perplexity of FOLDER through ONNX Runtime")
    five.add_argument("folder", type=Path)
    five.add_argument("--tokenizer", type=Path, required=True, help="a folder with the model's tokenizer")
    five.add_argument("--windows", type=int, default=8)
    five.add_argument("--threads", type=int, default=2)
    three = sub.add_parser("decode", help="decode tok/s of FOLDER in a fresh process")
    three.add_argument("folder", type=Path)
    three.add_argument("--threads", type=int, default=2)
    three.add_argument("--runs", type=int, default=3)
    three.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    if args.what == "dequantize":
        sys.path.insert(0, str(HERE.parent))
        _dequantize_here(args.gguf, args.out, args.dtype)
    elif args.what == "perplexity":
        print(json.dumps(perplexity(args.folder, args.tokenizer, args.windows, args.threads)))
    elif args.what == "build":
        print(json.dumps(build_int4(args.source, args.out, args.threads, dtype=args.dtype,
                                    per_weight=args.per_weight)))
    else:
        print(json.dumps(decode(args.folder, args.threads, args.runs, args.rounds)))


if __name__ == "__main__":
    main()
