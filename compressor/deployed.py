"""An artifact as deployed: a folder (or model.onnx) that `compress generate` and `compress bench` open, its
family and model config read back from its metadata."""
import json
from dataclasses import dataclass
from pathlib import Path

import onnx

from compressor.errors import UserError
from exporters import metadata_keys
from passes.calibration import excerpt, first_line

ARTIFACT_NAME = "model.onnx"  # compressor.artifact's, without importing its report and plotting modules


@dataclass(frozen=True)
class Deployed:
    path: Path  # the model.onnx
    folder: Path  # where its tokenizer / genai_config sit
    family: str | None
    config: dict  # compressor.model_config
    decodes: bool  # has a KV cache (past_key_values inputs)


def open_artifact(path: Path) -> Deployed:
    path = Path(path)
    model = path / ARTIFACT_NAME if path.is_dir() else path
    if not model.is_file():
        raise UserError(f"no artifact at {model} (give an out folder of `compress run` or its model.onnx)")
    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as exc:  # noqa: BLE001  (onnx raises DecodeError, ValueError, ... on a bad file)
        raise UserError(f"{model}: not an ONNX model ({first_line(exc, 120)})") from None
    if not proto.graph.node and not proto.graph.output:  # a zero-byte or empty file parses as an empty model
        raise UserError(f"{model}: not an ONNX model (it holds no graph)")
    metadata = {p.key: p.value for p in proto.metadata_props}
    try:
        config = json.loads(metadata.get(metadata_keys.MODEL_CONFIG, "{}"))
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the JSON reader goes
        config = {}
    _check_genai_config(model.parent)
    decodes = any(i.name.startswith("past_key_values.") for i in proto.graph.input)
    config = config if isinstance(config, dict) else {}
    if not decodes:
        _check_sizes(config, model)
    return Deployed(path=model, folder=model.parent, family=metadata.get(metadata_keys.FAMILY), config=config,
                    decodes=decodes)


def _check_genai_config(folder: Path) -> None:
    """genai_config.json beside the artifact is read for the cache's layout and the stop tokens, where text that is
    not JSON counts as no file; JSON nested past what Python's reader takes (a RecursionError there) is refused
    here, once."""
    path = folder / "genai_config.json"
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a genai_config.json") from None
    except (OSError, ValueError):
        return


def _check_sizes(config: dict, model: Path) -> None:
    """`compress bench` makes a non-decoder's inputs from these values (context 10**9 would be a 7.45 GiB batch):
    each in the range an ONNX input's metadata is held to (compressor.inputs.onnx). A decoder's lengths come from
    its graph instead (compressor.generation.graph_limits)."""
    from compressor.inputs.onnx import CONFIG_INTS

    for key, high in CONFIG_INTS.items():
        value = config.get(key)
        if key in config and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high):
            raise UserError(f"{model}: compressor.model_config {key} must be an integer in 1..{high:,}, not "
                            f"{excerpt(value)}")
