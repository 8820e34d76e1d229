"""Judging what a pickle would do if someone loaded it the ordinary way.

The pickle machine records every global outside torch's allowlist and every
call it would make. Here each becomes a `Finding` with a severity:

- danger: a global known to run commands or code, read or write files, or open
  a nested unrestricted unpickle (`os.system`, `builtins.eval`,
  `torch.storage._load_from_bytes`, ...);
- unsafe: any other global outside the allowlist: `pickle.load` would import
  its module and call it, and `torch.load(weights_only=True)` refuses it;
- corrupt: the file is inconsistent (a storage that is missing or too short,
  readers that would disagree on its contents);
- notice: an oddity torch tolerates (CRCs, unreferenced members, trailing bytes).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from surgery.formats import pickle_vm
from surgery.formats.pickle_vm import Call, Global, PickleError

SEVERITIES = ("danger", "unsafe", "corrupt", "notice")
BLOCKING = frozenset({"danger", "unsafe", "corrupt"})


@dataclass(frozen=True)
class Finding:
    severity: str
    message: str
    where: str = ""

    def to_json(self) -> dict[str, str]:
        return {"severity": self.severity, "message": self.message, "where": self.where}

    def __str__(self) -> str:
        where = f" ({self.where})" if self.where else ""
        return f"{self.severity}: {self.message}{where}"


# Any of these as a module path component reaches process, file, network or code.
_DANGEROUS_MODULES = frozenset(
    """os posix nt subprocess sys shutil importlib imp runpy pickle _pickle cPickle
    marshal dill cloudpickle joblib socket ctypes code codeop pdb bdb pty webbrowser
    multiprocessing asyncio signal commands popen2 platform tempfile urllib urllib2
    http httplib requests ftplib telnetlib smtplib zipimport pkgutil io _io
    fileinput types functools operator threading _thread gc inspect timeit trace
    ensurepip venv distutils setuptools pip site sysconfig _posixsubprocess shelve dbm sqlite3""".split()
)
# Harmless-looking names that are gadgets in their own right.
_DANGEROUS_NAMES = frozenset(
    """eval exec compile open __import__ getattr setattr delattr globals locals vars
    breakpoint input execfile reload system popen spawn load loads""".split()
)
_DANGEROUS_QUALNAMES = frozenset(
    """torch.load torch.save torch.storage._load_from_bytes torch.jit.load torch.hub.load
    torch.hub.load_state_dict_from_url torch.serialization.load numpy.load numpy.loadtxt
    numpy.fromfile numpy.save numpy.testing._private.utils.runstring""".split()
)
_DANGEROUS_TORCH_PARTS = frozenset({"ops", "_C", "hub", "package", "utils", "_dynamo", "_inductor", "fx"})
# Calls whose bytes argument is itself a pickle that would be loaded unrestricted.
_NESTED_LOADERS = frozenset(
    """torch.storage._load_from_bytes pickle.loads _pickle.loads cPickle.loads
    dill.loads cloudpickle.loads joblib.load torch.load""".split()
)
_NUMPY_RECONSTRUCT = frozenset(
    """numpy.core.multiarray._reconstruct numpy._core.multiarray._reconstruct
    numpy.core.multiarray.scalar numpy._core.multiarray.scalar numpy.ndarray numpy.dtype""".split()
)
MAX_NESTED_DEPTH = 3


def classify(module: str, name: str) -> tuple[str, str]:
    """Severity and a reason for one global outside the allowlist."""
    qualname = f"{module}.{name}"
    parts = module.split(".") + name.split(".")
    if qualname in _DANGEROUS_QUALNAMES:
        return "danger", "loads or writes files, or unpickles without restriction"
    if any(part in _DANGEROUS_MODULES for part in parts):
        hit = next(part for part in parts if part in _DANGEROUS_MODULES)
        return "danger", f"reaches `{hit}`: can run commands or code"
    if parts[0] == "torch" and any(p in _DANGEROUS_TORCH_PARTS for p in parts[1:]):
        return "danger", "reaches torch internals that can run code or load files"
    if parts[-1] in _DANGEROUS_NAMES:
        return "danger", f"`{parts[-1]}` can run code or touch files"
    if "." in name:
        return "unsafe", "dotted name: pickle walks attributes from the imported module"
    if qualname in _NUMPY_RECONSTRUCT:
        return "unsafe", "numpy object; torch.load(weights_only=True) refuses it"
    if module.startswith("torch.nn.modules") or module.startswith("torch.nn.parameter"):
        return "unsafe", "a pickled nn.Module (torch.save(model)); weights_only loading refuses it"
    return "unsafe", f"pickle would import `{module}` and call into it"


def findings_for(
    result: pickle_vm.Result,
    where: str,
    *,
    expected_prefixes: tuple[str, ...] = (),
    known: dict[str, Any] | None = None,
    _depth: int = 0,
) -> list[Finding]:
    """One finding per distinct global (with its count and a call it makes).

    Args:
        result: what the pickle machine recorded.
        where: the file or member, for the message.
        expected_prefixes: globals that belong to the format (TorchScript's
            `__torch__.` classes) and are not findings.
        known: the table to scan nested pickles with.
    """
    by_name: dict[str, list[pickle_vm.GlobalRef]] = {}
    for ref in result.globals:
        if not ref.qualname.startswith(expected_prefixes):
            by_name.setdefault(ref.qualname, []).append(ref)
    calls: dict[str, Call] = {}
    for call in result.calls:
        root = _root_global(call.func)
        if root is not None:
            calls.setdefault(root.qualname, call)

    findings = []
    for qualname, refs in by_name.items():
        first = refs[0]
        severity, reason = classify(first.module, first.name)
        shown = first.qualname if "." not in first.name else f"{first.module} + {first.name}"
        text = f"global {shown} ({first.opcode}"
        text += f", {len(refs)} uses)" if len(refs) > 1 else ")"
        call = calls.get(qualname)
        if call is not None:
            text += f", called as {pickle_vm.describe(call)}"
        findings.append(Finding(severity, f"{text}: {reason}", f"{where} byte {first.offset}"))
    findings.extend(_chained_calls(result, where))
    if _depth < MAX_NESTED_DEPTH:
        findings.extend(_nested(result, where, known or {}, _depth))
    return findings


def _root_global(func: Any) -> Global | None:
    while isinstance(func, Call):
        func = func.func
    return func if isinstance(func, Global) else None


def _chained_calls(result: pickle_vm.Result, where: str) -> Iterable[Finding]:
    """Calls of a call's result: `getattr(__import__('os'), 'system')('...')`."""
    for call in result.calls:
        if isinstance(call.func, Call):
            yield Finding(
                "danger",
                f"calls the result of another call: {pickle_vm.describe(call, 3)}",
                f"{where} byte {call.offset}",
            )


def _nested(result: pickle_vm.Result, where: str, known: dict[str, Any], depth: int) -> Iterable[Finding]:
    for call in result.calls:
        root = _root_global(call.func)
        if root is None or root.qualname not in _NESTED_LOADERS:
            continue
        for arg in call.args:
            if not isinstance(arg, (bytes, bytearray)):
                continue
            inner_where = f"{where} byte {call.offset} > nested pickle"
            try:
                inner = pickle_vm.run(arg, known=known, persistent_load=lambda pid: pid)
            except PickleError as exc:
                inner = exc.partial  # type: ignore[attr-defined]
                yield Finding("notice", f"nested pickle is malformed: {exc}", inner_where)
            yield from findings_for(inner, inner_where, known=known, _depth=depth + 1)


def blocking(findings: Iterable[Finding]) -> bool:
    return any(f.severity in BLOCKING for f in findings)
