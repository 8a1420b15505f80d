"""A streamed run's progress in --out (PROGRESS_DIR), so that a killed run started again with the same command goes
on from its last finished part and writes the same bytes.

What is kept: state.json (the run's fingerprint, the parts done, the data file's length after the last of them,
what each part recorded), parts/NNNN.onnx (each part's lowered nodes with its initializers' external references),
model.onnx.data (grown part by part; cut back to the recorded length on resume), streams.safetensors (the
activations that reach the next part) and parity.npy. state.json is replaced last, atomically, after everything
it points to is on disk: a kill at any moment leaves the previous part's state, which is whole.
Nothing here is unpickled: safetensors, ONNX protobufs, JSON and .npy without pickles.
"""
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

from compressor.atomic import atomic_write_text, sha256_file
from compressor.onnx_file import data_path
from exporters.lowering import Lowered
from exporters.streamed_writer import Part

PROGRESS_DIR = ".compress-progress"


class Progress:
    def __init__(self, out_dir: Path, fingerprint: dict):
        self.folder = Path(out_dir) / PROGRESS_DIR
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        self.state: dict = {}

    @property
    def data_file(self) -> Path:
        return data_path(self.folder / "model.onnx")

    @property
    def parts_done(self) -> int:
        return self.state["parts_done"]

    def resume(self) -> bool:
        """Whether a killed run of the same command left parts to go on from; otherwise starts afresh."""
        state_file = self.folder / "state.json"
        if state_file.is_file():
            try:
                state = json.loads(state_file.read_text())
            except (OSError, ValueError):
                state = {}
            if state.get("fingerprint") == self.fingerprint and self.data_file.is_file() and \
                    self.data_file.stat().st_size >= state.get("data_offset", 0):
                self.state = state
                return state["parts_done"] > 0
        shutil.rmtree(self.folder, ignore_errors=True)
        (self.folder / "parts").mkdir(parents=True)
        self.state = {"fingerprint": self.fingerprint, "parts_done": 0, "data_offset": 0, "parts": []}
        return False

    def source_sha256(self, files: list[Path]) -> str:
        """The input's sha256 (one file's own; several files: of their names and sha256s), computed once."""
        if "source_sha256" not in self.state:
            if len(files) == 1:
                self.state["source_sha256"] = sha256_file(files[0])
            else:
                listing = "".join(f"{f.name} {sha256_file(f)}\n" for f in sorted(files))
                self.state["source_sha256"] = hashlib.sha256(listing.encode()).hexdigest()
        return self.state["source_sha256"]

    def finish_part(self, part: Part, streams: dict[str, torch.Tensor] | None, data_offset: int) -> None:
        """`streams`: the activations that reach the next part (None after the last part)."""
        index = self.state["parts_done"]
        graph = helper.make_graph(part.nodes, f"part{index}", [], [], part.initializers)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in
                                                        sorted(part.opsets.items())])
        proto.ir_version = part.ir_version
        _atomic_bytes(self.folder / "parts" / f"{index:04d}.onnx", proto.SerializeToString())
        if streams is not None:
            from safetensors.torch import save_file

            tmp = self.folder / "streams.safetensors.tmp"
            save_file({k: v.contiguous() for k, v in streams.items()}, str(tmp))
            os.replace(tmp, self.folder / "streams.safetensors")
        lowered = part.lowered
        self.state["parts"].append({"record": part.record, "int_weights": lowered.int_weights,
                                    "integer_activations": lowered.integer_activations, "float16": lowered.float16})
        self.state["parts_done"] = index + 1
        self.state["data_offset"] = data_offset
        atomic_write_text(self.folder / "state.json", json.dumps(self.state, sort_keys=True))

    def finish_measured(self, parity: np.ndarray) -> None:
        """The held-out metrics (in state) and the parity logits, after the last part."""
        tmp = self.folder / "parity.npy.tmp"
        with open(tmp, "wb") as handle:
            np.save(handle, parity, allow_pickle=False)
        os.replace(tmp, self.folder / "parity.npy")
        atomic_write_text(self.folder / "state.json", json.dumps(self.state, sort_keys=True))

    def load_streams(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.folder / "streams.safetensors"))

    def load_parity(self) -> np.ndarray:
        return np.load(self.folder / "parity.npy", allow_pickle=False)

    def parts(self) -> list[Part]:
        found = []
        for index, meta in enumerate(self.state["parts"]):
            proto = onnx.load(str(self.folder / "parts" / f"{index:04d}.onnx"), load_external_data=False)
            lowered = Lowered(meta["record"], meta["int_weights"], meta["integer_activations"], meta["float16"])
            found.append(Part(list(proto.graph.node), list(proto.graph.initializer), meta["record"], lowered,
                              {op.domain: op.version for op in proto.opset_import}, proto.ir_version))
        return found

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _atomic_bytes(path: Path, content: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(content)
    os.replace(tmp, path)
