"""Rendering: the JSON documents, plain text for pipes, rich for terminals.

Everything shown here is computed by the library already; this module only
chooses words and layout. Plain text is stable (no colour, no box drawing) so
logs and tests can rely on it; rich is imported only when drawing for a terminal.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from surgery import keys
from surgery.checkpoint import Checkpoint, TensorInfo
from surgery.safety import SEVERITIES

if TYPE_CHECKING:
    from rich.console import Console

    from surgery.converting import ConvertReport
    from surgery.diffing import Difference, DiffReport
    from surgery.finetune import FinetuneSummary
    from surgery.porting import PortReport

JSON_VERSION = 1


def human_count(n: int) -> str:
    """11689512 -> '11.7M'."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def human_bytes(n: int) -> str:
    """46758912 -> '44.6 MiB'."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def dumps(doc: Any, indent: int = 0) -> str:
    """JSON that reads well and diffs well: anything short on one line, the rest one entry a line."""
    flat = json.dumps(doc)
    if len(flat) <= 120 or not isinstance(doc, (dict, list)) or not doc or _is_record(doc):
        return flat
    pad = "  " * (indent + 1)
    if isinstance(doc, dict):
        body = ",\n".join(f"{pad}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in doc.items())
        return "{\n" + body + "\n" + "  " * indent + "}"
    body = ",\n".join(pad + dumps(v, indent + 1) for v in doc)
    return "[\n" + body + "\n" + "  " * indent + "]"


def _is_record(doc: Any) -> bool:
    """An object of scalars and lists of scalars, such as one tensor's entry."""
    return isinstance(doc, dict) and all(
        not isinstance(v, dict) and not (isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v))
        for v in doc.values()
    )


def selected(ckpt: Checkpoint, globs: Sequence[str]) -> list[TensorInfo]:
    return [t for t in ckpt.tensors if not globs or keys.matches(t.name, globs)]


def inspect_json(ckpt: Checkpoint, globs: Sequence[str] = ()) -> dict[str, Any]:
    """The `surgery inspect --json` document (see the README for each field)."""
    tensors = selected(ckpt, globs)
    return {
        "surgery_json": JSON_VERSION,
        "path": str(ckpt.path),
        "files": [str(f) for f in ckpt.files],
        "format": ckpt.format,
        "description": ckpt.description,
        "container": list(ckpt.container) if ckpt.container is not None else None,
        "containers": [{"path": list(p), "num_tensors": n} for p, n in ckpt.containers],
        "tensors": [t.to_json() for t in tensors],
        "num_tensors": len(tensors),
        "num_params": sum(t.numel for t in tensors),
        "bytes": ckpt.nbytes if not globs else sum(t.nbytes for t in tensors),
        "bytes_out": ckpt.nbytes_out
        if not globs
        else sum(t.nbytes for t in tensors if t.name not in ckpt.aliases),
        "dtypes": ckpt.dtypes,
        "devices": ckpt.devices,
        "prefix": ckpt.prefix,
        "wrappers": [{"prefix": p, "added_by": who} for p, who in keys.wrapper_prefixes(ckpt.prefix)],
        "shared": ckpt.shared,
        "extras": {e.name: e.to_json() for e in ckpt.extras},
        "metadata": ckpt.metadata,
        "findings": [f.to_json() for f in ckpt.findings],
        "safe": ckpt.safe,
        "filter": list(globs),
    }


@dataclass
class InspectView:
    """What `inspect` shows, as text rows, shared by the plain and rich renderers."""

    title: str
    rows: list[tuple[str, list[str]]]
    tree: keys.Node
    infos: dict[str, TensorInfo]
    depth: int | None
    findings: list[tuple[str, str]]  # (severity, text)


def inspect_view(ckpt: Checkpoint, globs: Sequence[str] = (), depth: int | None = None) -> InspectView:
    tensors = selected(ckpt, globs)
    rows: list[tuple[str, list[str]]] = [("format", [ckpt.description])]
    if ckpt.container is None:
        rows.append(("state_dict", ["none found in this file"]))
    else:
        where = ".".join(ckpt.container) or "(top level)"
        others = [
            f"{'.'.join(p) or '(top level)'} ({plural(n, 'tensor')})"
            for p, n in ckpt.containers
            if p != ckpt.container
        ]
        line = [where] + (
            [f"also: {', '.join(others[:4])}{' ...' if len(others) > 4 else ''}  (--key NAME)"]
            if others
            else []
        )
        rows.append(("state_dict", line))
    if ckpt.extras:
        rows.append(
            (
                "beside it",
                [f"{e.name}: {e.summary}" for e in ckpt.extras[:20]]
                + ([f"... and {len(ckpt.extras) - 20} more"] if len(ckpt.extras) > 20 else []),
            )
        )
    if ckpt.prefix:
        wrappers = keys.wrapper_prefixes(ckpt.prefix)
        if len(wrappers) == 1 and wrappers[0][0] == ckpt.prefix:
            who = f"added by {wrappers[0][1]}"
        else:
            who = "; ".join(f"{p} added by {w}" for p, w in wrappers)
        rows.append(("key prefix", [ckpt.prefix + (f"  ({who})" if who else "")]))
    dtype_text = ", ".join(f"{d} {n}" for d, n in ckpt.dtypes.items())
    rows.append(("tensors", [f"{ckpt.num_tensors}" + (f"  ({dtype_text})" if dtype_text else "")]))
    short = human_count(ckpt.num_params)
    rows.append(
        ("parameters", [f"{ckpt.num_params:,}" + (f" ({short})" if short != f"{ckpt.num_params}" else "")])
    )
    rows.append(("bytes", [f"{ckpt.nbytes:,} ({human_bytes(ckpt.nbytes)})"]))
    if ckpt.nbytes_out > ckpt.nbytes:
        rows.append(
            (
                "converts to",
                [
                    f"{ckpt.nbytes_out:,} ({human_bytes(ckpt.nbytes_out)}): views reuse stored bytes,"
                    " a conversion writes every tensor in full"
                ],
            )
        )
    if ckpt.devices:
        rows.append(("saved on", [", ".join(f"{d} ({n})" for d, n in ckpt.devices.items())]))
    if ckpt.shared:
        groups = [" = ".join(g[:4]) + (" ..." if len(g) > 4 else "") for g in ckpt.shared[:10]]
        rows.append(
            (
                "shared storage",
                groups + ([f"... and {len(ckpt.shared) - 10} more groups"] if len(ckpt.shared) > 10 else []),
            )
        )
    meta = ckpt.metadata.get("metadata")
    if meta:
        shown = [f"{k}: {v[:80]}" for k, v in list(meta.items())[:12] if k != "surgery.recipe"]
        rows.append(("metadata", shown))
        rows.extend(recipe_rows(meta))
    if ckpt.format == "sharded":
        rows.append(
            (
                "shards",
                [
                    ", ".join(ckpt.metadata["shards"][:6])
                    + (" ..." if len(ckpt.metadata["shards"]) > 6 else "")
                ],
            )
        )
    if globs:
        rows.append(("filter", [f"{' '.join(globs)}: {len(tensors)} of {ckpt.num_tensors} tensors shown"]))
    findings = [(f.severity, f"{f.message}" + (f"  [{f.where}]" if f.where else "")) for f in ckpt.findings]
    if ckpt.metadata.get("crc_checked") == "data.pkl only":
        rows.append(("crc", ["data.pkl checked; storages not (torch ignores CRCs): --verify reads all data"]))
    elif ckpt.metadata.get("crc_checked"):
        skipped = ckpt.metadata.get("crc_not_checked") or {}
        rows.append(
            ("crc", [f"every storage checked but {name} ({why})" for name, why in skipped.items()])
            if skipped
            else ("crc", ["every storage checked"])
        )
    tree = keys.build_tree((t.name, t.numel) for t in tensors)
    title = str(ckpt.path)
    return InspectView(title, rows, tree, {t.name: t for t in tensors}, depth, findings)


def recipe_rows(meta: dict[str, str]) -> list[tuple[str, list[str]]]:
    """A fine-tune-ready file's recipe, as `surgery.load_ready` will replay it."""
    from surgery.recipe import recipe_of

    try:
        recipe = recipe_of({"metadata": meta})
    except (ValueError, KeyError, TypeError):
        return [("recipe", ["present but not readable"])]
    if recipe is None:
        return []
    plan = recipe.finetune
    lines = [f"target {recipe.target}"]
    lines += [f"edit: {e}" for e in recipe.edits]
    if recipe.init:
        lines.append(f"init new modules: {recipe.init}")
    lines += [f"{action} {glob}" for action, glob in plan.freeze]
    if plan.freeze_bn:
        lines.append("freeze BatchNorm statistics")
    lines += [f"lr {rule}" for rule in plan.lr]
    for label, value in (
        ("base lr", plan.base_lr),
        ("weight decay", plan.weight_decay),
        ("layer decay", plan.layer_decay),
    ):
        if value is not None:
            lines.append(f"{label} {value:g}")
    lines.append(f"{len(recipe.mapping)} keys loaded from the source; surgery.load_ready(path) replays it")
    return [("recipe", lines)]


def safety_line(ckpt: Checkpoint) -> str:
    if not ckpt.findings:
        return "ok: nothing but tensors and plain containers"
    counts = {s: sum(f.severity == s for f in ckpt.findings) for s in SEVERITIES}
    text = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    if counts["danger"] or counts["unsafe"]:
        return f"{text}: do not load it with torch.load(weights_only=False)"
    return text


# -- plain text ---------------------------------------------------------------
def render_plain(view: InspectView, safety: str) -> str:
    lines = [view.title]
    width = max(len(label) for label, _ in view.rows)
    for label, values in view.rows:
        for i, value in enumerate(values):
            lines.append(f"  {(label if i == 0 else ''):<{width}}  {value}")
    lines.append(f"  {'safety':<{width}}  {safety}")
    for severity, text in view.findings:
        lines.append(f"    {severity}: {text}")
    lines.append("")
    lines.extend(_plain_tree(view))
    return "\n".join(lines) + "\n"


def _tree_rows(view: InspectView) -> list[tuple[int, str, str, str]]:
    """(depth, label, shape or count, dtype or tensors) rows in display order."""
    rows: list[tuple[int, str, str, str]] = []
    stack: list[tuple[keys.Node, int]] = [(view.tree, 0)]
    while stack:
        node, depth = stack.pop()
        if node is not view.tree:
            rows.append((depth - 1, node.label, human_count(node.numel), plural(node.count, "tensor")))
            if view.depth is not None and depth >= view.depth:
                continue
        for name in node.leaves:
            info = view.infos[name]
            leaf = name[len(node.name) + 1 :] if node.name else name
            extra = f" {info.device}" if info.device != "cpu" else ""
            extra += f" ({info.note})" if info.note else ""
            rows.append((depth, leaf, str(list(info.shape)), info.dtype + extra))
        for child in reversed(list(node.children.values())):
            stack.append((child, depth + 1))
    return rows


def _plain_tree(view: InspectView) -> list[str]:
    if view.depth == 0 or not view.infos:
        return [] if view.infos else ["  (no tensors)"]
    rows = _tree_rows(view)
    name_width = max(2 * d + len(label) for d, label, _, _ in rows)
    mid_width = max(len(mid) for _, _, mid, _ in rows)
    return [
        f"  {'  ' * d + label:<{name_width}}  {mid:>{mid_width}}  {last}".rstrip()
        for d, label, mid, last in rows
    ]


# -- rich ---------------------------------------------------------------------
_SEVERITY_STYLE = {"danger": "bold red", "unsafe": "red", "corrupt": "magenta", "notice": "yellow"}


def render_rich(view: InspectView, safety: str, console: Console) -> None:
    from rich.table import Table
    from rich.text import Text
    from rich.tree import Tree

    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold cyan", no_wrap=True)
    header.add_column()
    for label, values in view.rows:
        header.add_row(label, "\n".join(values))
    safe_style = "green" if safety.startswith("ok") else "bold red"
    header.add_row("safety", Text(safety, style=safe_style))
    for severity, text in view.findings:
        header.add_row("", Text.assemble((f"{severity}: ", _SEVERITY_STYLE[severity]), text))
    console.print(Text(view.title, style="bold"))
    console.print(header)
    if view.depth == 0 or not view.infos:
        return
    root = Tree(
        Text(f"{human_count(view.tree.numel)} parameters in {view.tree.count} tensors", style="dim"),
        guide_style="dim",
    )
    stack: list[tuple[keys.Node, Tree, int]] = [(view.tree, root, 0)]
    while stack:
        node, branch, depth = stack.pop()
        if node is not view.tree and view.depth is not None and depth >= view.depth:
            continue
        for name in node.leaves:
            info = view.infos[name]
            leaf = name[len(node.name) + 1 :] if node.name else name
            label = Text.assemble(
                (leaf, "green"), "  ", (str(list(info.shape)), "cyan"), "  ", (info.dtype, "magenta")
            )
            if info.device != "cpu":
                label.append(f"  {info.device}", style="yellow")
            if info.note:
                label.append(f"  ({info.note})", style="red")
            branch.add(label)
        for child in node.children.values():
            sub = branch.add(
                Text.assemble(
                    (child.label, "bold"),
                    "  ",
                    (human_count(child.numel), "yellow"),
                    ("  " + plural(child.count, "tensor"), "dim"),
                )
            )
            stack.append((child, sub, depth + 1))
    console.print(root)


# -- port ---------------------------------------------------------------------
MAX_LISTED = 20


def port_lines(report: PortReport) -> list[tuple[str, list[str]]]:
    """The rows of the `surgery port` report, summary first."""
    from surgery.porting import percent

    plan = report.plan
    rows: list[tuple[str, list[str]]] = [("summary", [report.summary()])]
    where = ".".join(report.container or ()) or "(top level)"
    rows.append(("source", [f"{report.source}: {where} ({report.source_format})"]))
    rows.append(("target", [report.target]))
    if report.edits:
        rows.append(("edits", list(report.edits)))
    rows.append(("steps", list(plan.steps) or ["none"]))
    per_module = [
        f"{mod} {done}/{total} ({percent(share)})" for mod, done, total, share in report.per_module()
    ]
    rows.append(("loaded", _capped(per_module, per_line=4)))
    rows.append(("coverage", [f"{percent(report.coverage)} of {report.target_numel:,} target parameters"]))
    mismatched = [
        f"{m.target}: source {list(m.source_shape)}, target {list(m.target_shape)}" for m in plan.mismatched
    ]
    rows.append(("mismatched", _capped(mismatched) or ["none"]))
    rows.append(("missing", _capped(keys.group_names(plan.missing)) or ["none"]))
    rows.append(("unexpected", _capped(keys.group_names(plan.unexpected)) or ["none"]))
    if plan.excluded:
        rows.append(("excluded", _capped(keys.group_names(plan.excluded))))
    paired = [f"{m.source} -> {m.target} ({m.how})" for m in plan.matched if m.how != "exact"]
    if paired:
        rows.append(("paired", _capped(paired)))
    reshaped = [
        f"{m.target}: {list(m.source_shape)} -> {list(m.shape)}" for m in plan.matched if m.source_shape
    ]
    if reshaped:
        rows.append(("reshaped", _capped(reshaped)))
    casts = sorted({m.cast for m in plan.matched if m.cast})
    if casts:
        rows.append(
            ("cast", [f"{a} -> {b}: {sum(m.cast == (a, b) for m in plan.matched)} tensors" for a, b in casts])
        )
    if plan.tied:
        rows.append(("tied", _capped([f"{t} (shares storage with {via})" for t, via in plan.tied])))
    if report.finetune is not None:
        rows.extend(finetune_rows(report.finetune))
    if not report.written:
        why = f" ({report.notes[0]})" if report.notes else ""
        rows.append(("output", [f"{report.output or 'none'}: not written{why}"]))
    else:
        verified = (
            f"; re-read, {report.verified} tensors bit-identical" if report.verified is not None else ""
        )
        rows.append(("output", [f"{report.output}: written{verified}"]))
    return rows


def finetune_rows(summary: FinetuneSummary) -> list[tuple[str, list[str]]]:
    """Trainable and frozen elements per top-level module; each optimizer group."""
    per_module = [
        f"{m} {human_count(t)} trainable, {human_count(f)} frozen"
        if t and f
        else f"{m} {'frozen' if f else 'trainable'}"
        for m, t, f in summary.modules
    ]
    rows = [("trainable", _capped(per_module, per_line=3))]
    groups = []
    for g in summary.groups:
        lr = f"lr {g.lr:g}" if g.lr is not None else "lr: the optimizer's"
        wd = f", weight decay {g.weight_decay:g}" if g.weight_decay is not None else ""
        groups.append(
            f"{g.name}: {lr}{wd}, {plural(g.tensors, 'tensor')}, {human_count(g.params)} parameters"
        )
    rows.append(("groups", groups or ["none: nothing trains"]))
    if summary.frozen_bn:
        rows.append(
            (
                "frozen BN",
                [
                    f"{summary.frozen_bn} BatchNorm layers keep their statistics (eval mode, even under train())"
                ],
            )
        )
    return rows


def _capped(lines: list[str], per_line: int = 1) -> list[str]:
    if per_line > 1:
        lines = [", ".join(lines[i : i + per_line]) for i in range(0, len(lines), per_line)]
    if len(lines) > MAX_LISTED:
        return [*lines[:MAX_LISTED], f"... and {len(lines) - MAX_LISTED} more"]
    return lines


def render_port_plain(report: PortReport) -> str:
    return render_rows_plain(port_lines(report))


def render_rows_plain(rows: list[tuple[str, list[str]]]) -> str:
    """Label and value columns, stable for logs and tests."""
    width = max(len(label) for label, _ in rows)
    out = []
    for label, values in rows:
        for i, value in enumerate(values):
            out.append(f"  {(label if i == 0 else ''):<{width}}  {value}")
    return "\n".join(out) + "\n"


def render_port_rich(report: PortReport, console: Console) -> None:
    render_rows_rich(port_lines(report), console)


WARNING_LABELS = ("mismatched", "missing", "unexpected", "only in A", "only in B", "differ")


def render_rows_rich(rows: list[tuple[str, list[str]]], console: Console) -> None:
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan", no_wrap=True)
    grid.add_column()
    for label, values in rows:
        style = (
            "bold"
            if label == "summary"
            else ("yellow" if label in WARNING_LABELS and values != ["none"] else "")
        )
        grid.add_row(label, Text("\n".join(values), style=style))
    console.print(grid)


def convert_rows(report: ConvertReport) -> list[tuple[str, list[str]]]:
    """The rows of the `surgery convert` report, summary first."""
    where = ".".join(report.container or ()) or "(top level)"
    rows: list[tuple[str, list[str]]] = [("summary", [report.summary()])]
    rows.append(("source", [f"{report.source}: {where} ({report.source_format})"]))
    rows.append(("output", [f"{report.output} ({report.output_format})"]))
    if report.shards:
        rows.append(("shards", _capped(list(report.shards))))
    rows.append(("steps", list(report.steps) or ["none"]))
    if report.left_out:
        rows.append(("left out", _capped(keys.short_names(report.left_out))))
    if report.cast:
        rows.append(("cast", [f"{change}: {plural(n, 'tensor')}" for change, n in report.cast.items()]))
    if report.aliases:
        tied = [f"{alias} = {kept}" for alias, kept in report.aliases.items()]
        how = (
            "stored once; the alias is in the metadata and restored on read"
            if report.aliases_in_metadata
            else "one storage, as saved"
        )
        rows.append(("tied", [*_capped(tied), how]))
    if report.verified is not None:
        rows.append(("verified", [f"re-read, {plural(report.verified, 'tensor')} equal to their source"]))
    return rows


def diff_rows(report: DiffReport) -> list[tuple[str, list[str]]]:
    """The rows of the `surgery diff` report, summary first; the largest differences first."""
    rows: list[tuple[str, list[str]]] = [("summary", [report.summary()])]
    rows.append(("A", [report.a]))
    rows.append(("B", [report.b]))
    if report.steps:
        rows.append(("steps", list(report.steps)))
    rows.append(("only in A", _capped(keys.short_names(report.only_a)) or ["none"]))
    rows.append(("only in B", _capped(keys.short_names(report.only_b)) or ["none"]))
    by_kind = {
        kind: [d for d in report.differences if d.kind == kind] for kind in ("shape", "dtype", "values")
    }
    if by_kind["shape"]:
        rows.append(("shape", _capped([d.describe() for d in by_kind["shape"]])))
    if by_kind["dtype"]:
        rows.append(("dtype", _dtype_lines(by_kind["dtype"])))
    worst = sorted(by_kind["values"], key=lambda d: -(d.max_abs or 0.0))
    if report.structure_only:
        rows.append(("values", ["not read (--structure-only)"]))
    else:
        rows.append(("values", _capped([d.describe() for d in worst]) or ["none differ"]))
        read = f"{human_bytes(report.bytes_read)} read in {report.seconds:.2f} s"
        rows.append(("identical", [f"{report.identical} of {report.compared} tensors in both ({read})"]))
    return rows


def _dtype_lines(found: list[Difference]) -> list[str]:
    """One line per dtype pair: how many, and how far the values moved."""
    lines = []
    for pair in dict.fromkeys((d.dtype_a, d.dtype_b) for d in found):
        group = [d for d in found if (d.dtype_a, d.dtype_b) == pair]
        line = f"{pair[0]} vs {pair[1]}: {plural(len(group), 'tensor')}"
        moved = [d for d in group if d.differing or d.nan]
        if group[0].max_abs is not None:
            line += f"; values equal in {len(group) - len(moved)}"
            if moved:
                top = max(moved, key=lambda d: d.max_abs or 0.0)
                rel = max((d.max_rel or 0.0) for d in moved)
                line += (
                    f", moved in {len(moved)} (max abs {top.max_abs:.3g} in {top.name}, max rel {rel:.3g})"
                )
        lines.append(line)
    return lines
