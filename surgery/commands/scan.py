"""`surgery scan`: inspect's safety verdict over many paths, for people and CI gates.

Each path is a checkpoint file, a folder (walked: every regular file is judged by its
bytes, never its name), a `*.index.json`, a sharded or torch.distributed.checkpoint
folder, or the Hugging Face Hub cache. Every checkpoint is read as `inspect` reads it:
headers and pickles only, through the restricted pickle machine; nothing is imported or
run, torch is not loaded, no tensor data is read. Each gets one verdict:

- danger: a finding that can run code (`os.system`, `eval`, an extension code, ...);
- unsafe: a global outside torch's `weights_only` allowlist (a pickled module, numpy
  scalars, classes of its own): loading it needs `weights_only=False`;
- corrupt: the file contradicts itself or is cut short: scan cannot vouch for the part
  it could not read;
- error: the file could not be read at all (permissions, a missing shard, a bug);
- safe: nothing but tensors and plain containers (notices allowed).

Anything but safe fails the scan: a gate passes only what it could read and vouch for.
Files that are not checkpoints are skipped and counted; a sharded checkpoint is one
checkpoint (its shards are not scanned again), and a file reached twice (the Hub
cache's snapshot symlinks into `blobs/`) is scanned once.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from surgery.errors import NotACheckpoint, SurgeryError
from surgery.formats.safety import Finding

VERDICTS = ("danger", "unsafe", "corrupt", "error", "safe")
FAILING = frozenset({"danger", "unsafe", "corrupt", "error"})
SKIPPED_FOLDERS = frozenset({".git"})
HUB_REPO_PREFIXES = ("models--", "datasets--", "spaces--")
_DCP_METADATA = ".metadata"


@dataclass(frozen=True)
class ScanResult:
    """The verdict on one checkpoint (a file, an index with its shards, or a DCP folder)."""

    path: str
    verdict: str  # danger | unsafe | corrupt | error | safe
    format: str | None = None
    description: str | None = None
    tensors: int = 0
    files: tuple[str, ...] = ()
    findings: tuple[Finding, ...] = ()
    error: str | None = None  # why reading stopped (verdict corrupt or error), else None

    @property
    def worst(self) -> Finding | None:
        """The first finding of the verdict's severity (None when safe or unreadable)."""
        return next((f for f in self.findings if f.severity == self.verdict), None)

    @property
    def reason(self) -> str:
        """One line: the worst finding, else why reading stopped, else what it holds."""
        worst = self.worst
        if worst is not None and (self.verdict in ("danger", "unsafe") or not self.error):
            more = sum(f.severity in FAILING for f in self.findings) - 1
            return worst.message + (f" (and {more} more)" if more > 0 else "")
        if self.error:
            return self.error
        return f"{self.tensors} tensor{'' if self.tensors == 1 else 's'}"

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "verdict": self.verdict,
            "format": self.format,
            "description": self.description,
            "tensors": self.tensors,
            "files": list(self.files),
            "findings": [f.to_json() for f in self.findings],
            "error": self.error,
        }


@dataclass(frozen=True)
class Skipped:
    """A file that is not a checkpoint, or a symlink or special file scan does not open."""

    path: str
    reason: str
    named: bool = False  # given on the command line, not found in a folder

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "reason": self.reason}


@dataclass(frozen=True)
class ScanReport:
    """Every checkpoint's verdict, in path order, and what was skipped."""

    results: tuple[ScanResult, ...]
    skipped: tuple[Skipped, ...] = ()
    seconds: float = 0.0
    paths: tuple[str, ...] = field(default=())

    @property
    def counts(self) -> dict[str, int]:
        return {v: sum(r.verdict == v for r in self.results) for v in VERDICTS}

    @property
    def failed(self) -> bool:
        """Whether any checkpoint is not safe (danger, unsafe, corrupt, or unreadable)."""
        return any(r.verdict in FAILING for r in self.results)

    def summary(self) -> str:
        """`scanned 7 checkpoints in 0.06 s: 4 safe, 1 danger, 1 unsafe, 1 corrupt; 2 files skipped`."""
        n = len(self.results)
        counts = ", ".join(f"{c} {v}" for v, c in self.counts.items() if c)
        text = f"scanned {n} checkpoint{'' if n == 1 else 's'} in {self.seconds:.2f} s"
        text += f": {counts}" if counts else ""
        if self.skipped:
            s = len(self.skipped)
            text += f"; {s} file{'' if s == 1 else 's'} skipped (not checkpoints)"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "surgery_json": 1,
            "paths": list(self.paths),
            "checkpoints": [r.to_json() for r in self.results],
            "skipped": [s.to_json() for s in self.skipped],
            "counts": self.counts,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
        }

    def to_sarif(self, base: Path | None = None) -> dict[str, Any]:
        """SARIF 2.1.0 for GitHub code scanning: one rule per kind of finding, one result per
        blocking finding (or per checkpoint that could not be read), at the checkpoint's file.

        Args:
            base: paths are written relative to this folder (default: the current one, the
                repository root when run in CI); paths outside it as absolute file URIs.
        """
        base = (base or Path.cwd()).resolve()
        results = [_sarif_result(kind, text, r, base) for r in self.results for kind, text in _problems(r)]
        from surgery import __version__

        return {
            "$schema": SARIF_SCHEMA,
            "version": "2.1.0",
            "runs": [
                {
                    "tool": {
                        "driver": {
                            "name": "surgery",
                            "version": __version__,
                            "semanticVersion": __version__,
                            "rules": [_sarif_rule(*rule) for rule in SARIF_RULES.values()],
                        }
                    },
                    "results": results,
                    "columnKind": "unicodeCodePoints",
                    "originalUriBaseIds": {"%SRCROOT%": {"uri": base.as_uri() + "/"}},
                }
            ],
        }


def write_sarif(report: ScanReport, out: Path) -> None:
    """The report's SARIF document written to `out` (atomically); never over a checkpoint it read.

    Raises:
        UsageError: `out` is one of the files scanned, or a folder.
    """
    import json

    from surgery.errors import UsageError
    from surgery.writers.outputs import atomic

    scanned = {_identity(Path(f)) for r in report.results for f in (r.path, *r.files)} - {None}
    if out.is_dir() or _identity(out) in scanned:
        raise UsageError(out, "the SARIF output would overwrite a scanned checkpoint or a folder")
    if not out.parent.is_dir():
        raise UsageError(out, f"the folder {str(out.parent)!r} does not exist")
    with atomic(out) as f:
        f.write(json.dumps(report.to_sarif(), indent=1).encode() + b"\n")


def verdict_of(findings: Iterable[Finding]) -> str:
    """The worst blocking severity among the findings, or safe."""
    severities = {f.severity for f in findings}
    return next((s for s in ("danger", "unsafe", "corrupt") if s in severities), "safe")


def scan(paths: Sequence[str | Path]) -> ScanReport:
    """The safety verdict of every checkpoint under `paths`; never runs or imports anything.

    Args:
        paths: files, folders (walked recursively, `.git` left out), `*.index.json` files,
            sharded or DCP folders, or the Hugging Face Hub cache (`~/.cache/huggingface/hub`).

    Returns:
        A `ScanReport`: one `ScanResult` per checkpoint in path order, the files skipped
        (not checkpoints, special files, symlinks leaving the folder), the time taken.

    Example:
        >>> report = scan(["fixtures"])
        >>> report.failed, report.counts["danger"]
        (True, 1)
    """
    from surgery.formats.base import is_remote

    start = time.perf_counter()
    remote = [str(p) for p in paths if is_remote(p)]  # read by ranges, as inspect reads them
    targets, skipped = _expand([Path(p) for p in paths if not is_remote(p)])
    results: list[ScanResult] = []
    for given in remote:
        for address in _remote_targets(given):
            outcome = _judged(address, address, named=True)
            (skipped if isinstance(outcome, Skipped) else results).append(outcome)  # type: ignore[arg-type]
    covered: set[tuple[int, int]] = set()
    for target in sorted(targets, key=_reading_order):
        if target.identity in covered:
            continue
        outcome = _read(target)
        if isinstance(outcome, Skipped):
            skipped.append(outcome)
            continue
        results.append(outcome)
        files = [Path(f) for f in outcome.files] + (_dcp_files(target.path) if target.folder else [])
        covered.update(filter(None, map(_identity, files)))
    results.sort(key=lambda r: r.path)
    skipped.sort(key=lambda s: s.path)
    return ScanReport(
        tuple(results), tuple(skipped), time.perf_counter() - start, tuple(str(p) for p in paths)
    )


# -- finding what to read ------------------------------------------------------------------


@dataclass(frozen=True)
class _Target:
    path: Path  # as shown: the name given or found, a symlink's own name
    identity: tuple[int, int] | None  # (device, inode) of what it leads to
    named: bool  # given on the command line
    folder: bool = False  # a DCP folder, read as one checkpoint


def _remote_targets(address: str) -> list[str]:
    """What to judge of a URL (itself) or an hf:// address: a file, or every checkpoint of the
    repo (or of its folder) when it names no file; a repo that cannot be listed is judged as
    the address, which says why."""
    from surgery.formats.base import is_hub

    if not is_hub(address):
        return [address]
    from surgery.formats.hub import is_checkpoint_file, parse, repo_checkpoints

    try:
        where = parse(address)
        if where.path is not None and is_checkpoint_file(where.path):
            return [address]
        return repo_checkpoints(address) or [address]
    except SurgeryError:  # a bad address, a repo not listed: judged as given, the error says why
        return [address]


def _reading_order(target: _Target) -> tuple[int, str]:
    """DCP folders and indexes first, so their shards are known before they are met alone."""
    if target.folder:
        return 0, str(target.path)
    return (1 if _looks_like_index(target.path) else 2), str(target.path)


def _looks_like_index(path: Path) -> bool:
    """A JSON object by its first bytes (whether it holds a weight_map, the reader decides)."""
    try:
        with open(path, "rb") as f:
            return f.read(64).lstrip().startswith(b"{")
    except OSError:
        return False


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _expand(paths: list[Path]) -> tuple[list[_Target], list[Skipped]]:
    """Every file and DCP folder to read, each identity once; what was left out and why."""
    found: list[_Target] = []
    skipped: list[Skipped] = []
    for path in paths:
        if path.is_dir():
            _walk(path, found, skipped)
        elif path.exists() and not path.is_file():
            skipped.append(Skipped(str(path), f"not a regular file ({_kind(path)})", named=True))
        else:  # a file, or a missing path: the reader says which
            found.append(_Target(path, _identity(path), named=True))
    return _once_each(found), skipped


def _walk(top: Path, found: list[_Target], skipped: list[Skipped]) -> None:
    """Regular files and DCP folders under `top`; symlinks only when they stay inside it
    (inside the Hub cache repo folder, when `top` lies in one: snapshots link to `../../blobs`)."""
    if (top / _DCP_METADATA).is_file():
        found.append(_Target(top, _identity(top), named=True, folder=True))
    root = os.path.realpath(_containment_root(top))
    failures: list[OSError] = []
    for folder, dirs, files in os.walk(top, onerror=failures.append):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_FOLDERS)
        here = Path(folder)
        for name in list(dirs):
            sub = here / name
            if sub.is_symlink():  # not followed: inside the root it is reached anyway
                dirs.remove(name)
                if not _inside(sub, root):
                    skipped.append(Skipped(str(sub), "a symlink to a folder outside the scanned folder"))
            elif (sub / _DCP_METADATA).is_file():
                found.append(_Target(sub, _identity(sub), named=False, folder=True))
        for name in sorted(files):
            path = here / name
            try:
                mode = os.lstat(path).st_mode
            except OSError as exc:
                skipped.append(Skipped(str(path), f"cannot read: {exc.strerror}"))
                continue
            if stat.S_ISLNK(mode):
                if not _inside(path, root):
                    skipped.append(Skipped(str(path), "a symlink leaving the scanned folder: not followed"))
                    continue
                if not path.is_file():
                    skipped.append(Skipped(str(path), "a symlink to no regular file"))
                    continue
            elif not stat.S_ISREG(mode):
                skipped.append(Skipped(str(path), f"not a regular file ({_kind(path)})"))
                continue
            found.append(_Target(path, _identity(path), named=False))
    for failure in failures:
        skipped.append(Skipped(str(failure.filename), f"cannot read the folder: {failure.strerror}"))


def _dcp_files(folder: Path) -> list[Path]:
    """The files a DCP folder consists of: not scanned alone, even when the folder is unreadable."""
    return [p for p in folder.iterdir() if p.name == _DCP_METADATA or p.suffix == ".distcp"]


def _containment_root(top: Path) -> Path:
    """`top`, or the Hub cache repo folder (`models--org--name`) holding it."""
    resolved = top.resolve()
    for folder in (resolved, *resolved.parents):
        if folder.name.startswith(HUB_REPO_PREFIXES) and (folder / "blobs").is_dir():
            return folder
    return top


def _inside(path: Path, root: str) -> bool:
    target = os.path.realpath(path)
    return target == root or target.startswith(root.rstrip(os.sep) + os.sep)


def _kind(path: Path) -> str:
    mode = os.stat(path).st_mode
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def _once_each(found: list[_Target]) -> list[_Target]:
    """One target per identity, named by its most telling path: a path given on the command
    line, else a symlink (a Hub snapshot's `model.safetensors` rather than its blob)."""
    best: dict[tuple[int, int] | None, _Target] = {}
    loose: list[_Target] = []
    for target in found:
        if target.identity is None:
            loose.append(target)
            continue
        held = best.get(target.identity)
        if held is None or _rank(target) < _rank(held):
            best[target.identity] = target
    return loose + list(best.values())


def _rank(target: _Target) -> tuple[int, int, str]:
    return (0 if target.named else 1), (0 if target.path.is_symlink() else 1), str(target.path)


# -- reading one -------------------------------------------------------------------------------


def _read(target: _Target) -> ScanResult | Skipped:
    """The verdict on one target. Every failure is an answer, never an exception."""
    return _judged(str(target.path), target.path, named=target.named, folder=target.folder)


def _judged(shown: str, source: str | Path, *, named: bool, folder: bool = False) -> ScanResult | Skipped:
    """The verdict on a file, folder, URL or hf:// address (its headers: a URL's by ranges)."""
    from surgery.formats.checkpoint import open_checkpoint

    try:
        ckpt = open_checkpoint(source)
    except NotACheckpoint as error:
        if not error.findings:
            if folder:  # a `.metadata` of something else: its files are read one by one
                return Skipped(shown, error.message)
            return Skipped(shown, error.message, named=named)
        return _failed(shown, error, "corrupt")
    except SurgeryError as error:
        from surgery.errors import CorruptCheckpoint

        return _failed(shown, error, "corrupt" if isinstance(error, CorruptCheckpoint) else "error")
    except Exception as error:  # a bug in a reader: this file's answer, not the end of the scan
        return ScanResult(shown, "error", error=f"internal error: {type(error).__name__}: {error}")
    findings = tuple(ckpt.findings)
    return ScanResult(
        shown,
        verdict_of(findings),
        ckpt.format,
        ckpt.description,
        ckpt.num_tensors,
        tuple(str(f) for f in ckpt.files),
        findings,
    )


def _failed(shown: str, error: SurgeryError, otherwise: str) -> ScanResult:
    """A reader stopped: what it found before stopping decides, if it is worse."""
    findings = tuple(f for f in error.findings if isinstance(f, Finding))
    worst = verdict_of(findings)
    verdict = worst if worst in ("danger", "unsafe") else otherwise
    return ScanResult(shown, verdict, findings=findings, error=error.message)


# -- SARIF -----------------------------------------------------------------------------------

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
# One rule per kind of finding: kind -> (id, name, short, full, help, level, security-severity).
SARIF_RULES = {
    "danger": (
        "surgery/pickle-runs-code",
        "PickleRunsCode",
        "Loading this checkpoint can run code",
        "The checkpoint's pickle names a global that can run commands or code, touch files or the "
        "network, or unpickle without restriction (os.system, eval, an extension code, a nested pickle). "
        "torch.load(weights_only=False) or pickle.load would run it.",
        "Do not load it with torch.load(weights_only=False) or pickle.load. `surgery inspect FILE` shows "
        "the call it would make; `surgery sanitize FILE -o OUT` writes its tensors and plain data without it.",
        "error",
        "9.8",
    ),
    "unsafe": (
        "surgery/pickle-outside-allowlist",
        "PickleOutsideAllowlist",
        "The checkpoint needs an unrestricted unpickler",
        "The checkpoint's pickle names a global outside torch's weights_only allowlist (a pickled "
        "nn.Module, numpy scalars, argparse.Namespace, a class of its own): torch.load(weights_only=True) "
        "refuses it, and loading it with weights_only=False imports and calls that code.",
        "`surgery sanitize FILE -o OUT` keeps the tensors bit for bit and turns the other objects into plain "
        "values, without running anything; OUT loads with torch.load(weights_only=True).",
        "warning",
        "7.0",
    ),
    "corrupt": (
        "surgery/corrupt-checkpoint",
        "CorruptCheckpoint",
        "The checkpoint contradicts itself or is cut short",
        "Parts of the checkpoint disagree (zip directories, storage sizes, shard indexes) or are missing: "
        "readers may see different contents, and what could not be read was not vouched for.",
        "Download or write the file again; `surgery inspect FILE` names what is wrong.",
        "warning",
        "5.0",
    ),
    "error": (
        "surgery/unreadable-checkpoint",
        "UnreadableCheckpoint",
        "The checkpoint could not be read",
        "surgery could not read the checkpoint (permissions, a missing shard, an internal error), "
        "so it was not scanned.",
        "Make the checkpoint readable and complete, then scan it again.",
        "warning",
        "5.0",
    ),
}


def _sarif_rule(
    rule_id: str, name: str, short: str, full: str, help_text: str, level: str, severity: str
) -> dict[str, Any]:
    return {
        "id": rule_id,
        "name": name,
        "shortDescription": {"text": short},
        "fullDescription": {"text": full},
        "help": {"text": help_text, "markdown": help_text},
        "defaultConfiguration": {"level": level},
        "properties": {"tags": ["security", "pickle", "checkpoint"], "security-severity": severity},
    }


def _problems(result: ScanResult) -> list[tuple[str, str]]:
    """(kind, text) for each blocking finding, and for why reading stopped."""
    out = [
        (f.severity, f"{f.message} [{f.where}]" if f.where else f.message)
        for f in result.findings
        if f.severity in SARIF_RULES
    ]
    if result.error:
        out.append((result.verdict if result.verdict == "error" else "corrupt", result.error))
    return out


def _sarif_result(kind: str, text: str, result: ScanResult, base: Path) -> dict[str, Any]:
    import hashlib

    rule_id, level = SARIF_RULES[kind][0], SARIF_RULES[kind][5]
    uri = _artifact_uri(result.path, base)
    artifact = {"uri": uri} if ":" in uri.split("/")[0] else {"uri": uri, "uriBaseId": "%SRCROOT%"}
    fingerprint = hashlib.sha256(f"{rule_id}\0{uri}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()
    return {
        "ruleId": rule_id,
        "ruleIndex": list(SARIF_RULES).index(kind),
        "level": level,
        "message": {"text": f"{result.path}: {kind}: {text}"},
        "locations": [
            {
                "physicalLocation": {
                    "artifactLocation": artifact,
                    "region": {"startLine": 1},
                }
            }
        ],
        "partialFingerprints": {"surgeryFinding/v1": fingerprint[:32]},
    }


def _artifact_uri(shown: str, base: Path) -> str:
    """The checkpoint's file (a DCP folder's `.metadata`) as a URI reference relative to `base`
    (forward slashes, reserved characters percent-encoded), or an absolute file URI outside it;
    a URL or hf:// address as it is."""
    from urllib.parse import quote

    from surgery.formats.base import is_remote

    if is_remote(shown):
        return shown  # already a URI
    path = Path(shown)
    if path.is_dir():
        path = path / _DCP_METADATA
    absolute = Path(os.path.abspath(path))
    if absolute.is_relative_to(base):
        return quote(absolute.relative_to(base).as_posix(), errors="surrogatepass")
    return absolute.as_uri()
