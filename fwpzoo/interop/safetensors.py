"""The safetensors format, read and written with numpy alone: an 8-byte little-endian header
length N, N bytes of JSON ({name: {"dtype", "shape", "data_offsets": [begin, end]}, optional
"__metadata__"}), then the tensors' bytes, offsets counted from the end of the header.

Reading checks every offset against the file's size before touching data, so a truncated or
damaged file is one line naming the file and the tensor (InteropError), never a crash.
"""

import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from fwpzoo.config_file import ConfigError

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class InteropError(ConfigError):
    """A checkpoint that cannot be converted; the message is one line naming the file or
    tensor and the problem."""


def read_header(path: Path) -> tuple[dict, int]:
    """({name: entry}, where the data begins) of one safetensors file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InteropError(f"{path.name} is truncated: {size} bytes, no header")
        (length,) = struct.unpack("<Q", head)
        if 8 + length > size:
            raise InteropError(
                f"{path.name} is truncated: its header needs {8 + length} bytes, the file "
                f"has {size}"
            )
        try:
            header = json.loads(f.read(length))
        except ValueError as error:
            raise InteropError(f"{path.name} has an unreadable header: {error}") from None
    if not isinstance(header, dict):
        raise InteropError(f"{path.name} has an unreadable header: not a JSON object")
    header.pop("__metadata__", None)
    return header, 8 + length


def read_file(path: Path, names=None) -> dict[str, np.ndarray]:
    """{name: array} of the tensors of one file (those in `names`, or all)."""
    header, start = read_header(path)
    size = path.stat().st_size
    out = {}
    data = np.memmap(path, np.uint8, "r") if size > 0 else np.zeros(0, np.uint8)
    for name, entry in header.items():
        if names is not None and name not in names:
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise InteropError(f"{path.name}: tensor {name!r} has a malformed entry") from None
        if start + end > size:
            raise InteropError(
                f"{path.name} is truncated: tensor {name!r} ends at byte {start + end}, the file "
                f"has {size}"
            )
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise InteropError(
                f"{path.name}: tensor {name!r} has {end - begin} bytes for shape {list(shape)} "
                f"of {entry['dtype']}"
            )
        out[name] = np.array(data[start + begin : start + end].view(dtype).reshape(shape))
    return out


def read_folder(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a Hugging Face folder: model.safetensors, or the shards its index names."""
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise InteropError(f"{INDEX} has no readable weight_map") from None
        tensors = {}
        for file in sorted(set(weight_map.values())):
            if not (folder / file).is_file():
                raise InteropError(f"{INDEX} names {file}, which is not in {folder}")
            wanted = {name for name, f in weight_map.items() if f == file}
            found = read_file(folder / file, wanted)
            missing = sorted(wanted - set(found))
            if missing:
                raise InteropError(f"{file}: tensor {missing[0]!r} named by {INDEX} is not in it")
            tensors.update(found)
        return tensors
    if not (folder / SINGLE).is_file():
        raise InteropError(f"{folder} has neither {SINGLE} nor {INDEX}")
    return read_file(folder / SINGLE)


def write_file(path: Path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    """One safetensors file of `tensors` (C order, names sorted as the format's writers do)."""
    header, offset = {}, 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        header[name] = {
            "dtype": NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in sorted(tensors):
            f.write(np.ascontiguousarray(tensors[name]).tobytes())
