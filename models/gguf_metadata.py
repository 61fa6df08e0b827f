"""Read a GGUF file's header: its metadata key-values and its tensor directory, without touching tensor data.

The router and the OpenAI front end need only the configuration and the tokenizer. `gguf.GGUFReader` builds a
numpy view per array element while it opens a file (seconds and hundreds of MiB for a 150k-token vocabulary), so
this module parses the header itself from a memory map (GGUF v2/v3, little-endian): strings and string arrays
become Python lists, numeric arrays come out of one `numpy.frombuffer` each.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pdserve.models.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF value type -> (struct format, numpy dtype) for the fixed-size scalars
_SCALARS = {0: ("<B", np.uint8), 1: ("<b", np.int8), 2: ("<H", np.uint16), 3: ("<h", np.int16),
            4: ("<I", np.uint32), 5: ("<i", np.int32), 6: ("<f", np.float32), 7: ("<?", np.bool_),
            10: ("<Q", np.uint64), 11: ("<q", np.int64), 12: ("<d", np.float64)}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor directory: ggml type id, shape in torch order (outermost first), and the byte
    offset of its data from the start of the file."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's metadata (key -> str, int, float, bool or list) and tensors (name -> TensorInfo)."""

    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse `path`'s header; ModelLoadError naming the file when it is not GGUF, is truncated, or its tensor
    data would run past the end of the file."""
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _parse(data, path)
    except (OSError, ValueError, struct.error, UnicodeDecodeError, KeyError, IndexError) as exc:
        if isinstance(exc, ModelLoadError):
            raise
        raise ModelLoadError(f"{path}: not a readable GGUF file ({exc})") from exc


class _Cursor:
    """Reads little-endian GGUF values from a buffer, advancing an offset."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data = data
        self.pos = 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.scalar("<Q")
        if self.pos + length > len(self.data):
            raise ValueError(f"a string of {length} bytes runs past the end of the file")
        text = self.data[self.pos:self.pos + length].decode("utf-8")
        self.pos += length
        return text

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.scalar("<I"), self.scalar("<Q")
            if item_kind == _STRING:
                return [self.string() for _ in range(count)]
            if item_kind == _ARRAY:
                return [self.value(_ARRAY) for _ in range(count)]
            dtype = np.dtype(_SCALARS[item_kind][1]).newbyteorder("<")
            items = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.pos)
            self.pos += count * dtype.itemsize
            return items.tolist()
        return self.scalar(_SCALARS[kind][0])


def _parse(data: mmap.mmap, path: Path) -> GGUFHeader:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    cursor = _Cursor(data)
    if data[:4] != GGUF_MAGIC:
        raise ModelLoadError(f"{path}: not a GGUF file (no GGUF magic)")
    cursor.pos = 4
    version = cursor.scalar("<I")
    if version not in (2, 3):
        raise ModelLoadError(f"{path}: GGUF version {version} is not supported (2 or 3; big-endian files are not)")
    num_tensors, num_keys = cursor.scalar("<Q"), cursor.scalar("<Q")
    metadata = {}
    for _ in range(num_keys):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.scalar("<I"))
    infos = []
    for _ in range(num_tensors):
        name = cursor.string()
        dims = [cursor.scalar("<Q") for _ in range(cursor.scalar("<I"))]
        infos.append((name, dims, cursor.scalar("<I"), cursor.scalar("<Q")))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    data_start = -(-cursor.pos // alignment) * alignment
    tensors = {}
    for name, dims, ggml_type, offset in infos:
        elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):  # a type gguf does not know: the loader names it when it gets there
            block, block_bytes = 1, 0
        end = data_start + offset + elements // block * block_bytes
        if end > len(data):
            raise ModelLoadError(f"{path}: truncated GGUF file: tensor '{name}' ends at byte {end}, "
                                 f"the file has {len(data)}")
        tensors[name] = TensorInfo(name, ggml_type, tuple(reversed(dims)), data_start + offset)
    return GGUFHeader(metadata, tensors)
