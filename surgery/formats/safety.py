"""Judging what a pickle would do if someone loaded it the ordinary way.

The pickle machine records every global outside torch's allowlist (the table
in `surgery.formats.torch_pickle`, kept equal to the installed torch's by a
test) and every call it would make. Here each becomes a `Finding` with a severity:

- danger: a global known to run commands or code, read or write files, or open
  a nested unrestricted unpickle (`os.system`, `builtins.eval`,
  `torch.storage._load_from_bytes`, ...);
- unsafe: any other global outside the allowlist: `pickle.load` would import
  its module and call it, and `torch.load(weights_only=True)` refuses it unless
  the loading program allowlists it (`torch.serialization.add_safe_globals`);
- corrupt: the file is inconsistent (a storage that is missing or too short,
  readers that would disagree on its contents);
- notice: an oddity torch tolerates (CRCs, unreferenced members, trailing bytes).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from surgery.formats import pickle_vm
from surgery.formats.pickle_vm import Call, Global, PickleError
from surgery.values import Finding

SEVERITIES = ("danger", "unsafe", "corrupt", "notice")
BLOCKING = frozenset({"danger", "unsafe", "corrupt"})


# Standard-library modules whose globals build plain data (configs, paths, dates,
# enums). Every other standard-library module can reach files, processes, the
# network or code: a global from one is a danger.
_DATA_STDLIB = frozenset(
    """collections argparse datetime decimal fractions enum numbers pathlib uuid
    ipaddress re array string copyreg typing _collections_abc calendar zoneinfo
    math cmath statistics textwrap struct""".split()
)
_BUILTINS = frozenset({"builtins", "__builtin__", "__builtins__"})
# Constructors of plain data among the builtins; any other builtin is a danger.
_DATA_BUILTINS = frozenset(
    """list dict set frozenset tuple int float complex str bytes bytearray bool
    slice range object NoneType""".split()
)
# Outside the standard library: packages that run code, load files or unpickle.
_DANGEROUS_PACKAGES = frozenset("dill cloudpickle joblib requests setuptools pip numba".split())
_DANGEROUS_QUALNAMES = frozenset(
    """torch.load torch.save torch.storage._load_from_bytes torch.jit.load torch.hub.load
    torch.hub.load_state_dict_from_url torch.serialization.load""".split()
)
_DANGEROUS_TORCH_PARTS = frozenset(
    {"ops", "_C", "hub", "package", "utils", "_dynamo", "_inductor", "fx", "jit"}
)
_DANGEROUS_NUMPY_PARTS = frozenset(
    {
        "load",
        "loadtxt",
        "genfromtxt",
        "fromfile",
        "save",
        "savez",
        "tofile",
        "memmap",
        "testing",
        "f2py",
        "distutils",
        "ctypeslib",
        "lib",
    }
)
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
MAX_REFUSED_SHOWN = 20


def classify(module: str, name: str) -> tuple[str, str]:
    """Severity and a reason for one global outside the allowlist.

    Danger is judged on every part of the dotted path, so `pathlib` + `os.system`
    (attributes walked from an innocent module) is caught as well as `os.system`.
    """
    qualname = f"{module}.{name}"
    parts = module.split(".") + name.split(".")
    if module == "copyreg" and name.startswith("<extension"):
        return "danger", "an extension code calls whatever the loading process registered under it"
    if qualname in _DANGEROUS_QUALNAMES:
        return "danger", "loads or writes files, or unpickles without restriction"
    # What gets imported is the module's root package; what is reached from it is
    # the root and every attribute of the (dotted) name.
    reached = [module.split(".")[0], *name.split(".")]
    for i, part in enumerate(reached):
        if part in _BUILTINS and i + 1 < len(reached):
            if reached[i + 1] not in _DATA_BUILTINS:
                return (
                    "danger",
                    f"builtin `{reached[i + 1]}` can run code, touch files or reach any attribute",
                )
        elif part in sys.stdlib_module_names and part not in _DATA_STDLIB and part not in _BUILTINS:
            return (
                "danger",
                f"reaches `{part}`, standard library beyond plain data: files, processes, network or code",
            )
        elif part in _DANGEROUS_PACKAGES:
            return "danger", f"reaches `{part}`, which runs code or loads files"
    if parts[0] == "torch" and any(p in _DANGEROUS_TORCH_PARTS for p in parts[1:]):
        return "danger", "reaches torch internals that can run code or load files"
    if parts[0] == "numpy" and any(p in _DANGEROUS_NUMPY_PARTS for p in parts[1:]):
        return "danger", "reaches numpy functions that read or write files"
    if "." in name:
        return "unsafe", "dotted name: pickle walks attributes from the imported module"
    if qualname in _NUMPY_RECONSTRUCT:
        return "unsafe", "numpy object; torch.load(weights_only=True) refuses it"
    if module.startswith(("torch.nn.modules", "torch.nn.parameter")):
        return "unsafe", "a pickled nn.Module (torch.save(model)); weights_only loading refuses it"
    if parts[0] in _BUILTINS:
        return "unsafe", f"builtin `{name}`: plain data, but outside torch's allowlist"
    return (
        "unsafe",
        f"pickle would import `{module}` and call into it; torch.load(weights_only=True) "
        "refuses it unless the program allowlists it (torch.serialization.add_safe_globals)",
    )


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
    for refused in result.refused[:MAX_REFUSED_SHOWN]:
        findings.append(
            Finding("corrupt", f"refused to build: {refused.reason}", f"{where} byte {refused.offset}")
        )
    if len(result.refused) > MAX_REFUSED_SHOWN:
        findings.append(
            Finding(
                "corrupt", f"... and {len(result.refused) - MAX_REFUSED_SHOWN} more values refused", where
            )
        )
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
