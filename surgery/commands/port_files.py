"""The files a port writes and reads beside its output: the provenance it records (each
source file's sha256, hashed while the port works), the re-read of `--verify`, and the
plan files of `--plan-out` and `--plan`."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from surgery.errors import SurgeryError, UsageError
from surgery.formats.checkpoint import open_checkpoint
from surgery.formats.tensors import same_bytes, same_range
from surgery.plans.rules import RuleError, RuleSet, rules_from_doc

if TYPE_CHECKING:
    from surgery.models.loading import Output
    from surgery.plans.match import PortPlan

PLAN_VERSION = 1


class SourceDigests:
    """The sha256 of every source file, for the provenance, computed by a background thread
    that reads each file once, in order, while the main thread builds, plans and loads.

    File reads and hashlib release the GIL, so on a second core the hashing costs no wall
    time when there is other work (importing torch, building a model), and the pages it
    reads are warm for the loader. A template target has nothing to build: its port waits
    for the digests (the output's header holds them and is written first), then copies
    from the warm pages. Memory: one chunk. `result()` waits for the thread and
    raises what it met as a SurgeryError naming the file; leaving the `with` block stops
    and joins it, so a refused or failed port never leaves it running.

    Each file's identity, size and modification time are taken before any byte is hashed;
    `check_unchanged()` compares them once the output is written: a file modified, truncated
    or replaced meanwhile would have a digest that does not describe the bytes ported.
    """

    CHUNK = 1 << 20

    def __init__(self, files: Sequence[Path]):
        self.files = list(files)
        self.stamps: dict[Path, tuple[int, int, int, int]] = {}
        for path in self.files:
            try:
                self.stamps[path] = _stamp(path)
            except OSError as exc:
                raise SurgeryError(path, f"cannot read: {exc.strerror or exc}") from None
        self._digests: dict[Path, str] = {}
        self._failure: tuple[Path, Exception] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="surgery-sha256", daemon=True)
        if self.files:
            self._thread.start()

    def __enter__(self) -> SourceDigests:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop hashing (within a chunk) and wait for the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        for path in self.files:
            try:
                digest = _sha256(path, self._stop, self.CHUNK)
            except Exception as exc:  # every failure reaches result(), none dies with the thread
                self._failure = (path, exc)
                return
            if digest is None:  # stopped
                return
            self._digests[path] = digest

    def result(self) -> dict[Path, str]:
        """Every file's sha256, once the thread has read them all.

        Raises:
            SurgeryError: a file could not be read to its end (or hashing was stopped).
        """
        if self._thread.is_alive():
            self._thread.join()
        if self._failure is not None:
            path, exc = self._failure
            cause = (
                exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
            )
            raise SurgeryError(path, f"cannot read the file to hash it: {cause}")
        missing = [p for p in self.files if p not in self._digests]
        if missing:
            raise SurgeryError(missing[0], "hashing stopped before the end of the file")
        return dict(self._digests)

    def check_unchanged(self) -> None:
        """Raises SurgeryError if a source file is not as it was when hashing began."""
        for path in self.files:
            try:
                now = _stamp(path)
            except OSError:
                now = None
            if now != self.stamps[path]:
                raise SurgeryError(
                    path,
                    "the file changed while it was ported: its digest would not describe the bytes used",
                    hint="port it again once nothing writes to it",
                )


def _stamp(path: Path) -> tuple[int, int, int, int]:
    """What tells a file changed (as make and rsync judge): device, inode, size, modification time."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _sha256(path: Path, stop: threading.Event, chunk: int) -> str | None:
    """A file's sha256 read in order into one reused buffer; None when `stop` is set first."""
    digest = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := f.readinto(buf):
            if stop.is_set():
                return None
            digest.update(view[:n])
    return digest.hexdigest()


def verify_output(out: Path, output: Output, where: Path | None = None) -> int:
    """Re-read every tensor of `out` and compare its bytes with what was meant to be written,
    and every loaded tensor with its source (after any cast), one tensor at a time.

    A template target's tensor written as a file's bytes as they lie (from the source or
    the template) was meant to be exactly those bytes, which are its source's: one
    comparison of the two byte ranges keeps both promises, without torch. Other tensors
    are compared as tensors: a built target's with the module's and, when loaded, with the
    source's; a template target's (cast or rebuilt) with the source's or the template's.

    Returns:
        How many tensors were checked.

    Raises:
        SurgeryError: naming the first tensor that differs.
    """
    where = where or out
    reread = open_checkpoint(out)
    names = [t.name for t in reread.tensors]
    if names != [e.name for e in output.target.entries]:
        raise SurgeryError(where, "verify: the output's keys differ from the target's")
    for name in names:
        m = output.by_target.get(name)
        raw, written = output.file_bytes(name), reread.byte_range(name)
        if raw is not None and written is not None:
            if not same_range(written, (raw.path, raw.offset, raw.length)):
                raise _verify_failed(where, name, m.source if m else None)
            continue
        value = reread.tensor(name)
        if not same_bytes(value, output.get(name)):
            raise _verify_failed(where, name, m.source if m and output.state is None else None)
        source = output.source_of(name) if output.state is not None else None  # else get() was the source
        if source is not None and not same_bytes(value, source):
            raise _verify_failed(where, name, output.by_target[name].source)
        del value, source
        reread.release(name)
        output.release(name)
    return len(names)


def _verify_failed(where: Path, name: str, source: str | None) -> SurgeryError:
    against = f"its source {source!r}" if source is not None else "what was written"
    return SurgeryError(where, f"verify: tensor {name!r} differs from {against}")


def write_plan(path: Path, plan: PortPlan, source: str, target: str) -> None:
    """The final mapping as an editable file: review it, then `--plan` applies it as is.
    The rules' bindings are in it resolved (no placeholders, every op's parameters), and
    each key a rule drops as a rule of its own (`to = []`). The mapping holds the other
    pairs: what the rules make (loaded or mismatched) the rules make again."""
    from surgery.writers.outputs import atomic

    made = {name for d in plan.derived for name in d.names}
    doc = {
        "surgery_plan": PLAN_VERSION,
        "source": source,
        "target": target,
        "mapping": {m.source: m.target for m in plan.matched if m.how != "rule"}
        | {m.source: m.target for m in plan.mismatched if m.source not in made},
        "rules": [
            {"from": list(d.sources), "to": list(d.targets), "ops": [op.to_json() for op in d.ops]}
            for d in plan.derived
        ]
        + [{"from": [name], "to": [], "ops": []} for name in plan.dropped],
        "unused_source_keys": list(plan.unexpected),
        "unfilled_target_keys": list(plan.missing),
    }
    with atomic(path) as f:
        f.write((json.dumps(doc, indent=2) + "\n").encode())


def read_plan(path: str | Path) -> tuple[dict[str, str], RuleSet | None]:
    """The mapping of a plan file written by `--plan-out` (and perhaps edited), and its
    rules (None when it has none)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(path, "no such plan file") from None
    except (ValueError, RecursionError) as exc:
        raise UsageError(path, f"the plan is not valid JSON ({exc})") from None
    mapping = doc.get("mapping") if isinstance(doc, dict) else None
    if not isinstance(mapping, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
    ):
        raise UsageError(path, 'the plan needs a "mapping" object of source key -> target key')
    rules = doc.get("rules") or []
    if not rules:
        return mapping, None
    try:
        return mapping, rules_from_doc({"rule": rules}, path.name)
    except RuleError as exc:
        raise UsageError(path, str(exc)) from None
