"""How an ONNX model goes to disk: one file while its tensors fit one protobuf message comfortably, else the graph
in `model.onnx` and every tensor in `model.onnx.data` beside it (ONNX external data, as ONNX Runtime GenAI's Model
Builder writes any model): protobuf refuses to serialize a message over 2 GiB, which any decoder past ~536M fp32
parameters is. ONNX Runtime, ONNX Runtime GenAI and onnx.checker read either form from the model's path."""
from pathlib import Path

import onnx

from compressor.atomic import atomic_path, sha256_file

# tensor bytes above which the model is written with external data: half of protobuf's 2 GiB limit, so that the
# graph's other fields and the serializer's own buffers never reach it
EXTERNAL_DATA_ABOVE = 1 << 30
DATA_SUFFIX = ".data"


def data_path(model_path: Path) -> Path:
    """Where a model's external data goes: model.onnx -> model.onnx.data (Model Builder's name too)."""
    return Path(model_path).with_name(Path(model_path).name + DATA_SUFFIX)


def tensor_bytes(proto: onnx.ModelProto) -> int:
    return sum(tensor.ByteSize() for tensor in proto.graph.initializer)


def serialized_if_one_file(proto: onnx.ModelProto) -> onnx.ModelProto | bytes:
    """What save_onnx writes with the least memory: a model written as one file as its bytes (the caller then
    drops the proto: one copy in memory, not two), one with external data as the proto itself."""
    return proto if tensor_bytes(proto) > EXTERNAL_DATA_ABOVE else proto.SerializeToString()


def save_onnx(model: onnx.ModelProto | bytes, path: Path) -> None:
    """Write `model` to `path` (with external data when its tensors pass EXTERNAL_DATA_ABOVE), atomically, after
    the full ONNX checker passed on the written files. Pass the serialized bytes to let the caller free the proto
    first (one file then). The data file is written under its final name: write into a staging folder (the
    pipeline does) when a reader must never see it half-written. The proto's tensors become external references."""
    path = Path(path)
    external = not isinstance(model, bytes) and tensor_bytes(model) > EXTERNAL_DATA_ABOVE
    data = data_path(path)
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    with atomic_path(path) as tmp:
        if external:
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
        else:
            tmp.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
        del model
        onnx.checker.check_model(str(tmp), full_check=True)


def file_record(path: Path) -> dict:
    """The report's description of a written model: its files' bytes (the data file's included) and sha256s."""
    path, data = Path(path), data_path(path)
    record = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    if data.is_file():
        record["bytes"] += data.stat().st_size
        record["external_data"] = {"file": data.name, "bytes": data.stat().st_size, "sha256": sha256_file(data)}
    return record
