"""Checkpoints: a folder with config.json + model.safetensors (or a torch state dict loaded weights_only).

Loading never unpickles code: safetensors, or torch.load(weights_only=True). Every way a checkpoint can be
wrong becomes a UserError naming the file and the problem.
"""
import contextlib
import errno
import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from compressor.atomic import atomic_path, atomic_write_text, sha256_file
from compressor.errors import UserError
from compressor.inputs.source import Checkpoint, Source
from compressor.inputs.torch_source import torch_source
from passes.calibration import first_line
from samples.registry import SAMPLES, build_model, trained_dir

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TORCH_WEIGHT_NAMES = ("model.pt", "model.pth", "pytorch_model.bin")
FORMAT = "compressor-checkpoint"
STORED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def save_checkpoint(folder: Path, name: str, family: str, model: nn.Module, extra: dict | None = None,
                    dtype: torch.dtype = torch.float32) -> Path:
    """Write config.json and model.safetensors into `folder` (created), each atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS_NAME) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    record = {"format": FORMAT, "format_version": 1, "name": name, "family": family,
              "config": model.config.to_dict(), "stored_dtype": str(dtype).removeprefix("torch."),
              **(extra or {})}
    atomic_write_text(folder / CONFIG_NAME, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return folder


def _find_files(path: Path) -> tuple[Path, Path]:
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_dir():
        candidates = [path / WEIGHTS_NAME] + [path / n for n in TORCH_WEIGHT_NAMES]
        weights = next((c for c in candidates if c.is_file()), None)
        if weights is None:
            raise UserError(f"{path}: no {WEIGHTS_NAME} (or {', '.join(TORCH_WEIGHT_NAMES)}) in the folder")
        return path / CONFIG_NAME, weights
    if not path.is_file():  # a FIFO or a device would block the reader forever
        raise UserError(f"{path} is not a regular file")
    return path.parent / CONFIG_NAME, path


def _read_config(config_path: Path) -> dict:
    if not config_path.is_file():
        raise UserError(f"{config_path} is missing: a checkpoint needs its config.json beside the weights")
    try:
        record = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{config_path} is not valid JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UserError(f"{config_path} is not a compressor checkpoint config (expected \"format\": \"{FORMAT}\")")
    for key in ("family", "config"):
        if key not in record:
            raise UserError(f"{config_path} lacks the key {key!r}")
    return record


def out_of_memory(exc: BaseException) -> bool:
    """Whether a load failed for want of address space or memory (ENOMEM), not because of the file: safetensors'
    own mmap raises MemoryError ("Cannot allocate memory (os error 12)"), torch's mmap of the tensors' storage a
    RuntimeError ("unable to mmap N bytes from file <...>: Cannot allocate memory (12)")."""
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
        return True
    text = str(exc)
    return isinstance(exc, (RuntimeError, OSError)) and any(
        marker in text for marker in ("Cannot allocate memory", "can't allocate memory"))


def out_of_memory_error(weights: Path, verb: str = "map") -> UserError:
    """One line for out_of_memory(): the file, its size and the address-space limit (RLIMIT_AS, `ulimit -v`)."""
    try:
        size = f"{Path(weights).stat().st_size / 2**30:.2f} GiB file"
    except OSError:
        size = "file"
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        limit = "" if soft == resource.RLIM_INFINITY else f", address-space limit {soft / 2**30:.2f} GiB"
    except (ImportError, OSError, ValueError):
        limit = ""
    return UserError(f"cannot {verb} weights file {weights}: out of address space/memory ({size}{limit}); raise "
                     f"the limit (ulimit -v) or free memory")


def _read_state_dict(weights: Path) -> dict[str, torch.Tensor]:
    if weights.suffix == ".safetensors":
        try:
            return load_file(str(weights))
        except Exception as exc:
            if out_of_memory(exc):  # the file is mapped, not read: its size counts against the address space
                raise out_of_memory_error(weights) from None
            if isinstance(exc, (SafetensorError, OSError, ValueError)):
                raise UserError(f"{weights} is not a readable safetensors file ({first_line(exc)})") from None
            raise
    return read_torch_state_dict(weights)


def read_torch_state_dict(weights: Path, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """A torch state dict unpickled weights_only (never code); map_location "meta": names, dtypes and shapes
    without reading a tensor."""
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says what matters
            warnings.simplefilter("ignore")
            state = torch.load(weights, map_location=map_location, weights_only=True)
    except Exception as exc:  # weights_only refuses code; any failure here means the file is unusable
        if out_of_memory(exc):
            raise out_of_memory_error(weights, "read") from None
        raise UserError(f"{weights} could not be loaded as a plain tensor state dict (weights_only): "
                        f"{_unpickling_reason(exc)[:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{weights} does not hold a flat name -> tensor state dict")
    return state


def _build(record: dict, config_path: Path, device: str | None = None) -> nn.Module:
    try:
        with torch.device(device) if device else contextlib.nullcontext():
            return build_model(record["family"], record["config"])
    except (TypeError, ValueError, ArithmeticError, RuntimeError) as exc:  # e.g. heads 0, a negative width
        raise UserError(f"{config_path}: invalid model config ({first_line(exc)})") from None


def expected_params(build, config: dict, layer_keys: list[str]) -> int:
    """Parameters a config implies, from two small models built on the meta device (every layer count at 1, then
    each at 2 in turn): no model of the config's own depth is built, so an absurd depth costs nothing."""
    def count(overrides: dict) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in build({**config, **overrides}).parameters())

    base = {key: 1 for key in layer_keys}
    one = count(base)
    return one + sum((count({**base, key: 2}) - one) * (int(config[key]) - 1) for key in layer_keys)


def check_plausible_size(params: int, weights: list[Path], where: Path) -> None:
    """A config that implies more parameters than the weights files could hold even at 8 bits is refused before
    anything of that size is built."""
    stored = sum(w.stat().st_size for w in weights if w.is_file())
    if params > stored * 1.05 + (1 << 20):
        raise UserError(f"{where} implies {params:,} parameters ({params / 2**30:.2f} GiB even at 8 bits) but the "
                        f"weights hold {stored:,} bytes: the config does not describe these weights")


def mismatch_error(weights, config_name: str, missing: list[str], unexpected: list[str],
                   mistyped: list[str] = (), misshaped: list[str] = ()) -> UserError | None:
    """One line naming what the weights lack, hold beyond and hold wrongly against what the config implies (the
    first of each kind and how many more), or None when they match."""
    def first(kind: str, items: list[str]) -> str:
        items = sorted(items)
        return f"{kind}{items[0]}" + (f" (+{len(items) - 1} more)" if len(items) > 1 else "")

    parts = [first(kind, items) for kind, items in (("missing ", missing), ("unexpected ", unexpected),
                                                     ("", mistyped), ("", misshaped)) if items]
    return UserError(f"{weights} does not match {config_name}: {'; '.join(parts)}") if parts else None


def _check_size(record: dict, config_path: Path, weights: Path) -> None:
    config = record["config"]
    if not isinstance(config, dict):
        return  # _build says what is wrong with it
    layer_keys = [k for k, v in config.items() if k.endswith("layers") and isinstance(v, int) and v > 0]
    try:
        params = expected_params(lambda c: build_model(record["family"], c), config, layer_keys)
    except (TypeError, ValueError, ArithmeticError, RuntimeError):
        return  # _build says what is wrong with the config
    check_plausible_size(params, [weights], config_path)


def model_skeleton(path: Path) -> nn.Module:
    """The checkpoint's model built on the meta device from config.json alone: its layer shapes without memory
    or weights, so that a recipe can be checked against it before the weights are read."""
    config_path, weights = _find_files(Path(path))
    record = _read_config(config_path)
    _check_size(record, config_path, weights)
    return _build(record, config_path, "meta")


def _check_against_config(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], weights: Path,
                          config_name: str) -> None:
    error = mismatch_error(weights, config_name, list(set(expected) - set(state)), list(set(state) - set(expected)))
    if error:
        raise error
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise UserError(f"{weights}: tensor {key} has shape {tuple(tensor.shape)} but {config_name} implies "
                            f"{tuple(expected[key].shape)}")
        if expected[key].is_floating_point() and not tensor.is_floating_point():
            raise UserError(f"{weights}: tensor {key} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                            f"not a floating-point type")
        if tensor.is_floating_point() and tensor.dtype not in STORED_DTYPES:
            raise UserError(f"{weights}: tensor {key} is stored as {str(tensor.dtype).removeprefix('torch.')}; "
                            f"checkpoints hold float16, bfloat16, float32 or float64 weights")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"{weights}: tensor {key} contains NaN or Inf values")


def _unpickling_reason(exc: Exception) -> str:
    """torch's weights_only errors wrap the one line that matters (e.g. "unsupported GLOBAL posix.system") in a
    paragraph of advice, part of which is to load with weights_only=False: keep only that line."""
    boilerplate = ("Weights only load failed", "Check the documentation", "Please file an issue")
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith(boilerplate)]
    kept += [line.split("WeightsUnpickler error:", 1)[1].strip() for line in lines if "WeightsUnpickler error:" in line]
    return " ".join(line for line in kept if line) or type(exc).__name__


def load_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    config_path, weights = _find_files(path)
    record = _read_config(config_path)
    _check_size(record, config_path, weights)
    skeleton = _build(record, config_path, "meta")  # a config that does not fit the weights allocates nothing
    state = _read_state_dict(weights)
    expected = skeleton.state_dict()
    _check_against_config(state, expected, weights, config_path.name)
    model = _build(record, config_path)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    model.eval()
    return Checkpoint(
        name=str(record.get("name") or path.stem), family=record["family"], config=record["config"],
        model=model, weights_path=weights, weights_sha256=sha256_file(weights), metadata=record,
    )


def resolve_sample(path: Path) -> Path:
    """A path as given, or the name of a trained sample (e.g. `gpt-s`, or a family member in the cache:
    samples.registry.trained_dir) when no such path exists."""
    if not path.exists() and str(path) in SAMPLES and trained_dir(str(path)) is not None:
        return trained_dir(str(path))
    return path


def is_checkpoint(path: Path) -> bool:
    """Our own checkpoints are what is left once the other adapters have declined: their loader says what is
    wrong with anything else."""
    return True


def checkpoint_source(path: Path, progress: bool = False) -> Source:
    return torch_source(load_checkpoint(path), path, "compressor-checkpoint")
