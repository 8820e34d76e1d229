"""safetensors: an 8-byte header length, a JSON header, then the raw data.

The header is validated as strictly as the safetensors library does (and says
more precisely what is wrong): size limit, UTF-8 JSON without duplicate keys,
known dtypes, byte ranges that match shape x dtype and tile the data exactly,
metadata that maps str to str.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from surgery.dtypes import BY_SAFETENSORS, SAFETENSORS_EXTRA_BITS, DType
from surgery.errors import CorruptCheckpoint
from surgery.formats.base import Scan
from surgery.formats.torch_pickle import (
    INT64_MAX,
    MAX_DIMS,
    DataLocation,
    StorageRef,
    TensorRef,
    checked_numel,
    describe_value,
)

MAX_HEADER = 100_000_000  # the safetensors library's own limit


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Duplicate(key)
        out[key] = value
    return out


def read_header(path: Path, data: memoryview) -> tuple[int, dict[str, Any]]:
    """The header length and the parsed header, or a CorruptCheckpoint saying why not."""
    if len(data) < 8:
        raise CorruptCheckpoint(path, f"{len(data)} bytes: too short for a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER:
        raise CorruptCheckpoint(
            path, f"safetensors header declares {n} bytes, over the {MAX_HEADER}-byte limit"
        )
    if 8 + n > len(data):
        raise CorruptCheckpoint(
            path,
            f"safetensors header declares {n} bytes, the file has {len(data) - 8} after the length: truncated?",
        )
    try:
        header = json.loads(bytes(data[8 : 8 + n]).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise CorruptCheckpoint(path, "safetensors header is not UTF-8") from None
    except _Duplicate as dup:
        raise CorruptCheckpoint(path, f"safetensors header names {dup.args[0]!r} twice") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, and ints over 4300 digits
        raise CorruptCheckpoint(path, f"safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CorruptCheckpoint(path, "safetensors header is not a JSON object")
    return n, header


def _dtype(path: Path, name: str, code: Any) -> DType:
    if isinstance(code, str) and code in BY_SAFETENSORS:
        return BY_SAFETENSORS[code]
    if isinstance(code, str) and code in SAFETENSORS_EXTRA_BITS:
        return DType(f"safetensors:{code}", SAFETENSORS_EXTRA_BITS[code], code)
    raise CorruptCheckpoint(path, f"tensor {name!r} has unknown dtype {code!r}")


def _spec(path: Path, name: str, spec: Any) -> tuple[DType, tuple[int, ...], int, int]:
    if not isinstance(spec, dict) or not {"dtype", "shape", "data_offsets"} <= spec.keys():
        raise CorruptCheckpoint(path, f"tensor {name!r} needs dtype, shape and data_offsets")
    dtype = _dtype(path, name, spec["dtype"])
    shape, offsets = spec["shape"], spec["data_offsets"]
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(type(d) is int and 0 <= d <= INT64_MAX for d in shape)
    ):
        raise CorruptCheckpoint(
            path,
            f"tensor {name!r} has shape {describe_value(shape)}: not a list of at most {MAX_DIMS} ints in 0..2**63-1",
        )
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and 0 <= o <= INT64_MAX for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CorruptCheckpoint(
            path, f"tensor {name!r} has data_offsets {describe_value(offsets)}: not [begin, end]"
        )
    try:
        need = (checked_numel(tuple(shape)) * dtype.bits + 7) // 8
    except ValueError as exc:
        raise CorruptCheckpoint(path, f"tensor {name!r}: {exc}") from None
    if offsets[1] - offsets[0] != need:
        raise CorruptCheckpoint(
            path,
            f"tensor {name!r}: shape {shape} of {dtype.safetensors} needs {need} bytes, "
            f"data_offsets {offsets} give {offsets[1] - offsets[0]}",
        )
    return dtype, tuple(shape), offsets[0], offsets[1]


def scan_safetensors(path: Path, data: memoryview) -> Scan:
    n, header = read_header(path, data)
    metadata = header.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise CorruptCheckpoint(path, "safetensors __metadata__ must map strings to strings")
    specs = sorted(
        ((name, *_spec(path, name, spec)) for name, spec in header.items()),
        key=lambda s: (s[3], s[4]),
    )
    data_size = len(data) - 8 - n
    covered, last = 0, None
    for name, _, _, begin, end in specs:
        if end > data_size:
            raise CorruptCheckpoint(
                path,
                f"tensor {name!r} ends at data byte {end}, past the end of the file ({data_size} data bytes)",
            )
        if begin < covered:
            raise CorruptCheckpoint(
                path, f"tensors {last!r} and {name!r} overlap in the data (bytes {begin}-{covered})"
            )
        if begin > covered:
            raise CorruptCheckpoint(
                path, f"data bytes {covered}-{begin} before tensor {name!r} belong to no tensor"
            )
        covered, last = end, name
    if covered != data_size:
        raise CorruptCheckpoint(
            path, f"{data_size - covered} data bytes after the last tensor belong to no tensor"
        )

    root: dict[str, TensorRef] = {}
    where = str(path)
    for name, dtype, shape, begin, end in specs:
        storage = StorageRef(name, None, "cpu", end - begin)
        storage.data = DataLocation(where, 8 + n + begin, end - begin, sys.byteorder == "big")
        stride = tuple(math.prod(max(d, 1) for d in shape[i + 1 :]) for i in range(len(shape)))  # as torch
        unusual = None if dtype.name in BY_NAME_TORCH else f"{dtype.safetensors} has no torch dtype"
        root[name] = TensorRef(storage, 0, shape, stride, dtype, unusual=unusual)
    meta = {"header_bytes": n, "metadata": metadata or {}}
    return Scan(path, "safetensors", "safetensors", root, [], meta, [path])


BY_NAME_TORCH = {d.name for d in BY_SAFETENSORS.values()}
