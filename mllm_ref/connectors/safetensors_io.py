"""A NumPy-only reader of the safetensors file format (no pickle, no torch).

Format (Hugging Face, https://github.com/huggingface/safetensors, "Format" section of its README):

    [8 bytes]  N, the header length, an unsigned 64-bit little-endian integer
    [N bytes]  a UTF-8 JSON object: tensor name -> {"dtype": "F32", "shape": [d0, d1, ...],
               "data_offsets": [begin, end]}, plus an optional "__metadata__" object of string -> string
    [rest]     the byte buffer; tensor bytes are buffer[begin:end], row-major (C order), little-endian

Supported dtypes: F64, F32, F16 (kept as float16), BF16 (widened exactly to float32: a bfloat16 is the top 16 bits
of a float32), I64, I32, I16, I8, U8 and BOOL. Every array returned is a fresh, writeable, native-byte-order copy
that owns its memory (the file is not kept open or mapped).

Checks: the header length fits in the file, the header is a JSON object, every entry has a known dtype, a
non-negative integer shape and offsets with ``0 <= begin <= end <= len(buffer)`` and ``end - begin`` equal to the
shape's element count times the item size. A malformed file raises ``ValueError`` naming the path and the tensor.

Deviations from the format: none for reading; tensors may overlap or leave gaps in the buffer without an error
(the reference implementation rejects both when it validates a file; here only each tensor's own bounds matter).
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

__all__ = ["load_safetensors", "DTYPES"]

#: safetensors dtype name -> NumPy dtype of the stored bytes (little-endian).
DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # widened to float32 after reading
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly: the 16 bits become the high half of a float32."""
    return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)


def load_safetensors(path) -> dict[str, np.ndarray]:
    """Read every tensor of a ``.safetensors`` file into a dict ``name -> np.ndarray`` (in header order).

    Args:
        path: a file path (str or ``os.PathLike``).

    Returns:
        ``{name: array}`` with the stored shapes; F32/F64/F16/integer/bool dtypes as stored, BF16 as float32.
        The ``__metadata__`` entry, if any, is not returned.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"path {path!s}: {len(data)} bytes, too short for a safetensors header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ValueError(f"path {path!s}: header length {n} exceeds the file's {len(data) - 8} remaining bytes")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"path {path!s}: the header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"path {path!s}: the header must be a JSON object, got {type(header).__name__}")
    buffer = memoryview(data)[8 + n :]
    out: dict[str, np.ndarray] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"path {path!s}, tensor {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise ValueError(f"{where}: entry must have dtype, shape and data_offsets, got {entry!r}")
        dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype_name not in DTYPES:
            raise ValueError(f"{where}: unsupported dtype {dtype_name!r} (supported: {sorted(DTYPES)})")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                   for s in shape):  # fmt: skip
            raise ValueError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= len(buffer)
        ):
            raise ValueError(f"{where}: data_offsets {offsets!r} outside the {len(buffer)}-byte buffer")
        stored = DTYPES[dtype_name]
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if offsets[1] - offsets[0] != count * stored.itemsize:
            raise ValueError(
                f"{where}: {offsets[1] - offsets[0]} bytes for shape {shape} of {dtype_name} "
                f"({count * stored.itemsize} expected)"
            )
        if dtype_name == "BOOL":  # bytes other than 0 and 1 would be invalid NumPy booleans
            as_bytes = np.frombuffer(buffer[offsets[0] : offsets[1]], dtype=np.uint8, count=count)
            if np.any(as_bytes > 1):
                raise ValueError(f"{where}: BOOL bytes must be 0 or 1")
        raw = np.frombuffer(buffer[offsets[0] : offsets[1]], dtype=stored, count=count).reshape(shape)
        if dtype_name == "BF16":
            arr = _bf16_to_f32(raw)
        else:
            arr = raw.astype(stored.newbyteorder("="), copy=True)  # native order, writeable, owns its memory
        out[name] = arr
    return out
