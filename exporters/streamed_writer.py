"""An artifact written part by part (a streamed run: one decoder layer at a time), never held whole in memory.

Each part is a piece of the fp32 decoder graph (exporters.decoder_graph's prologue, one layer, the head) with its
initializers. It is lowered on its own (exporters.lowering.lower_artifact on a graph of just that part: the QDQ
placement, the recipe's graph passes and the packing are all local to a layer), then its initializers go to the
end of `model.onnx.data` and only its nodes and the initializers' external references stay in memory. The last
step writes `model.onnx` (nodes + references: a few MB) and checks the pair.

Initializers of LARGE_TENSOR bytes or more go to the data file at offsets aligned to ALIGNMENT (ONNX Runtime maps
aligned external data instead of copying it); smaller ones stay inside model.onnx.
"""
import heapq
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from exporters.decoder_graph import decoder_model
from exporters.lowering import Lowered, lower_artifact

LARGE_TENSOR = 1024
ALIGNMENT = 4096


class ExternalData:
    """model.onnx.data opened for appending at `offset` (a resumed run cuts off what a killed one wrote after its
    last finished part)."""

    def __init__(self, path: Path, offset: int = 0):
        self.path, self.location = Path(path), Path(path).name
        mode = "r+b" if self.path.exists() else "w+b"
        self.file = open(self.path, mode)
        self.file.truncate(offset)
        self.offset = offset
        self.written = 0  # bytes this process wrote

    def add(self, tensor: TensorProto) -> TensorProto:
        """`tensor` itself (small) or a copy whose data is now in the file (external reference)."""
        if not tensor.HasField("raw_data"):  # typed fields (int32_data, ...): as raw bytes, which readers prefer
            tensor = onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor), tensor.name)
        data = tensor.raw_data
        if len(data) < LARGE_TENSOR:
            return tensor
        start = -(-self.offset // ALIGNMENT) * ALIGNMENT
        self.file.seek(start)
        self.file.write(data)
        self.offset = start + len(data)
        self.written += len(data)
        # the reference alone: copying the tensor and clearing its data would hold its bytes twice meanwhile
        stub = TensorProto(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type,
                           data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.location), ("offset", str(start)), ("length", str(len(data)))):
            entry = stub.external_data.add()
            entry.key, entry.value = key, value
        return stub

    def flush(self) -> int:
        """Everything written so far on disk; returns the offset a resumed run restarts from."""
        self.file.flush()
        return self.offset

    def close(self) -> None:
        self.file.close()


@dataclass
class Part:
    """One lowered part of the graph: its nodes, its initializers (references once written), what the lowering
    recorded, and the opsets it needs."""
    nodes: list[onnx.NodeProto]
    initializers: list[TensorProto]
    record: dict | None
    lowered: Lowered
    opsets: dict[str, int] = field(default_factory=dict)
    ir_version: int = 0


INT_INPUTS = {"input_ids": TensorProto.INT64, "attention_mask": TensorProto.INT64}


def lower_part(nodes: list[onnx.NodeProto], initializers: list[TensorProto], outputs: list[str],
               quantized: dict | None, dtype: str, graph_passes,
               types: dict[str, int] | None = None) -> tuple[onnx.ModelProto, Lowered]:
    """Lower one part as a graph of its own: its inputs are whatever it reads and does not make, its outputs
    `outputs` (what later parts and the model's outputs read); float tensors unless `types` says otherwise.
    Takes `initializers` over (the list is emptied)."""
    types = {**INT_INPUTS, **(types or {})}
    # initializers only later parts read (the rotary tables) pass by the lowering, which drops what its graph
    # does not read
    passing = [init for init in initializers if init.name in outputs]
    given, initializers = initializers, [init for init in initializers if init.name not in outputs]
    given.clear()  # taken over: each one is freed once the part's model holds its copy
    outputs = [name for name in outputs if name not in {init.name for init in passing}]
    made = {out for node in nodes for out in node.output} | {init.name for init in initializers}
    inputs, seen = [], set()
    for node in nodes:
        for name in node.input:
            if name and name not in made and name not in seen:
                seen.add(name)
                inputs.append(helper.make_tensor_value_info(name, types.get(name, TensorProto.FLOAT), None))
    graph_outputs = [helper.make_tensor_value_info(name, types.get(name, TensorProto.FLOAT), None) for name in outputs]
    proto = decoder_model(helper.make_graph(nodes, "part", inputs, graph_outputs))
    for index, init in enumerate(initializers):  # moved in one at a time: never two copies of the part's weights
        proto.graph.initializer.append(init)
        initializers[index] = None
    proto, lowered = lower_artifact(proto, quantized, dtype, graph_passes)
    proto.graph.initializer.extend(passing)
    return proto, lowered


def write_part(proto: onnx.ModelProto, lowered: Lowered, data: ExternalData) -> Part:
    """A lowered part's initializers appended to the data file; the Part keeps the references."""
    stubs = [data.add(init) for init in proto.graph.initializer]
    opsets = {op.domain or "": op.version for op in proto.opset_import}
    return Part(list(proto.graph.node), stubs, lowered.record, lowered, opsets, proto.ir_version)


def merge_records(records: list[dict | None]) -> dict | None:
    """The parts' QDQ records as one: lists joined, counts summed."""
    records = [r for r in records if r is not None]
    if not records:
        return None
    merged = {"lowered": [], "left_fp32": []}
    for record in records:
        merged["lowered"] += record.get("lowered", [])
        merged["left_fp32"] += record.get("left_fp32", [])
        for key, value in record.items():
            if isinstance(value, dict):
                into = merged.setdefault(key, {})
                for k, v in value.items():
                    into[k] = into.get(k, 0) + v
    return merged


def topological(nodes: list[onnx.NodeProto], available: set[str]) -> list[onnx.NodeProto]:
    """`nodes` in an order where each comes after what it reads (ties kept in the given order); ValueError names a
    node whose input nothing makes."""
    producers = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    waiting = [sum(1 for name in set(node.input) if name and name not in available) for node in nodes]
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in set(node.input):
            if name and name not in available:
                if name not in producers:
                    raise ValueError(f"node {node.name} reads {name!r}, which no node, input or initializer makes")
                readers.setdefault(name, []).append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for out in nodes[i].output:
            for j in readers.get(out, []):
                waiting[j] -= 1
                if waiting[j] == 0:
                    heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise ValueError("the streamed graph has a cycle")
    return order


def assemble(parts: list[Part], inputs: list, outputs: list, renames: dict[str, str]) -> onnx.ModelProto:
    """The model from its written parts (nodes + external references): small, whatever the model's size.
    `renames`: tensors a part read under a placeholder name, by the name of what makes them."""
    nodes = [node for part in parts for node in part.nodes]
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    initializers = [init for part in parts for init in part.initializers]
    available = {i.name for i in inputs} | {init.name for init in initializers}
    graph = helper.make_graph(topological(nodes, available), "decoder", inputs, outputs, initializers)
    opsets: dict[str, int] = {}
    for part in parts:
        for domain, version in part.opsets.items():
            opsets[domain] = max(opsets.get(domain, 0), version)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
                              producer_name="compressor")
    proto.ir_version = max(part.ir_version for part in parts)
    return proto
