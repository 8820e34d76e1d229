"""torch's pre-1.6 format (`_use_new_zipfile_serialization=False`) and plain pickles.

A legacy file is pickles in a row: a magic number, a protocol version, a
sys-info dict, the object, the list of storage keys; then, for each key, an
8-byte element count and the raw bytes. The pickles are read through the
machine; the storage section is walked by its counts, never read.
"""

from __future__ import annotations

import sys
from pathlib import Path

from surgery.errors import CorruptCheckpoint, NotACheckpoint
from surgery.formats import pickle_vm
from surgery.formats.base import Scan, carrying, check_storages, is_mapped, prefetch, run_pickle
from surgery.formats.numpy_pickle import NumpyArrays
from surgery.formats.safety import findings_for
from surgery.formats.torch_pickle import KNOWN, DataLocation, StorageTable
from surgery.values import Finding

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


def scan_legacy(path: Path, data: memoryview) -> Scan:
    findings: list[Finding] = []
    with carrying(findings):
        return _scan_legacy(path, data, findings)


def _scan_legacy(path: Path, data: memoryview, findings: list[Finding]) -> Scan:
    where = str(path)
    table = StorageTable()

    def step(start: int, what: str, persistent=None) -> pickle_vm.Result:
        def attempt(view: memoryview) -> pickle_vm.Result:
            return pickle_vm.run(view, start=start, known=KNOWN, persistent_load=persistent, size=len(data))

        try:
            result = run_pickle(data, attempt)
        except pickle_vm.PickleError as exc:
            findings.extend(findings_for(exc.partial, f"{where}: {what}", known=KNOWN))  # type: ignore[attr-defined]
            raise CorruptCheckpoint(path, f"{what} pickle is broken: {exc}") from None
        findings.extend(findings_for(result, f"{where}: {what}", known=KNOWN))
        return result

    magic = step(0, "magic number")
    if magic.value != MAGIC_NUMBER:
        raise CorruptCheckpoint(path, "starts like a legacy torch file but the magic number differs")
    version = step(magic.end, "protocol version")
    if version.value != PROTOCOL_VERSION:
        findings.append(
            Finding(
                "corrupt",
                f"legacy protocol version {version.value!r}, torch expects {PROTOCOL_VERSION}",
                where,
            )
        )
    sys_info = step(version.end, "sys info")
    little = not isinstance(sys_info.value, dict) or sys_info.value.get("little_endian", True) is not False
    main = step(sys_info.end, "object", table)
    keys = step(main.end, "storage keys")
    key_list = keys.value if isinstance(keys.value, list) else []
    if not isinstance(keys.value, list) or not all(isinstance(k, str) for k in key_list):
        findings.append(
            Finding(
                "corrupt", "the storage key list is not a list of strings: no storage can be located", where
            )
        )
        key_list = []

    byteswap = little != (sys.byteorder == "little")
    prefetch(data, _counts_expected(keys.end, key_list, table))
    pos = keys.end
    for key in key_list:
        storage = table.storages.get(key)
        if storage is None:
            findings.append(
                Finding(
                    "corrupt",
                    f"storage {key!r} is listed but never used: its size is unknown, torch cannot load past it",
                    where,
                )
            )
            break
        if pos + 8 > len(data):
            findings.append(Finding("corrupt", f"file ends before storage {key!r}: truncated", where))
            break
        count = int.from_bytes(data[pos : pos + 8], "little" if little else "big")
        itemsize = storage.dtype.itemsize if storage.dtype else 1
        size = count * itemsize
        if count != storage.numel:
            findings.append(
                Finding(
                    "corrupt",
                    f"storage {key!r} holds {count} elements, the pickle declares {storage.numel}",
                    where,
                )
            )
        if pos + 8 + size > len(data):
            findings.append(
                Finding("corrupt", f"storage {key!r} runs past the end of the file: truncated", where)
            )
            break
        storage.data = DataLocation(where, pos + 8, size, byteswap)
        pos += 8 + size
    else:
        if pos < len(data):
            findings.append(
                Finding(
                    "notice", f"{len(data) - pos} bytes follow the last storage: torch ignores them", where
                )
            )

    findings.extend(check_storages(main.value, table.storages, where, {}))
    metadata = {"pickle_protocol": main.protocol, "storages": len(table.storages)}
    return Scan(
        path,
        "torch-legacy",
        "torch legacy (pre-1.6 torch.save format)",
        main.value,
        findings,
        metadata,
        [path],
        dict_states=main.dict_states,
    )


def _counts_expected(start: int, keys: list[str], table: StorageTable) -> list[tuple[int, int]]:
    """Where each storage's 8-byte element count lies when every storage holds what the pickle
    declares: read next, so a remote file fetches them together (a wrong guess costs a request)."""
    out, pos = [], start
    for key in keys:
        storage = table.storages.get(key)
        if storage is None:
            break
        out.append((pos, 8))
        pos += 8 + storage.numel * (storage.dtype.itemsize if storage.dtype else 1)
    return out


def scan_pickle(path: Path, data: memoryview) -> Scan:
    """A pickle stream: torch legacy when its first pickle is the magic number,
    otherwise a plain pickle read for its globals and any tensors."""
    where = str(path)

    def attempt(view: memoryview) -> tuple[pickle_vm.Result, StorageTable, NumpyArrays]:
        table = StorageTable()
        arrays = NumpyArrays()  # plain pickles (detectron2's .pkl) hold numpy arrays: read as tensors
        known = {**KNOWN, **arrays.known}
        return pickle_vm.run(view, known=known, persistent_load=table, size=len(data)), table, arrays

    try:
        result, table, arrays = run_pickle(data, attempt)
    except pickle_vm.PickleError as exc:
        # Failing within its first bytes before calling anything: these bytes are not a pickle.
        if exc.offset < 64 and not exc.partial.calls:  # type: ignore[attr-defined]
            raise NotACheckpoint(path, f"not a checkpoint: does not parse as a pickle ({exc})") from None
        error = CorruptCheckpoint(path, f"broken pickle: {exc}")
        error.findings = findings_for(exc.partial, where, known=KNOWN)  # type: ignore[attr-defined]
        raise error from None
    if result.value == MAGIC_NUMBER and not result.globals and not table.storages:
        return scan_legacy(path, data)
    findings = findings_for(result, where, known=KNOWN)
    findings.extend(arrays.place(path, where, search=is_mapped(data)))
    if result.end < len(data):
        findings.append(Finding("notice", f"{len(data) - result.end} bytes follow the pickle's STOP", where))
    findings.extend(check_storages(result.value, table.storages, where, {}))
    metadata = {"pickle_protocol": result.protocol}
    return Scan(
        path, "pickle", "a plain pickle, not written by torch.save", result.value, findings, metadata, [path]
    )
