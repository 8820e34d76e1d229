"""The rows of every command's report (port, convert, merge, diff, scan, sanitize), and the one
table that finds the page for a report: `page_of(report)`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from surgery.names import group_names, short_names
from surgery.plans.rules import rule_lines
from surgery.render.rows import Page, Row, capped
from surgery.text import human_bytes, human_count, percent, plural, printable

if TYPE_CHECKING:
    from surgery.casts import CastLosses
    from surgery.commands.convert import ConvertReport
    from surgery.commands.diff import Difference, DiffReport
    from surgery.commands.extract import ExtractReport
    from surgery.commands.maps import PresetsReport
    from surgery.commands.merge import MergeReport
    from surgery.commands.port import PortReport
    from surgery.commands.sanitize import SanitizeReport
    from surgery.commands.scan import ScanReport
    from surgery.models.finetune import FinetuneSummary


WORST_LAYERS = 5  # layers named in an extract report, the worst approximated first


def port_rows(report: PortReport) -> list[Row]:
    """The rows of the `surgery port` report, summary first."""
    plan = report.plan
    rows: list[Row] = [("summary", [report.summary()])]
    where = ".".join(report.container or ()) or "(top level)"
    rows.append(("source", [f"{report.source}: {where} ({report.source_format})"]))
    rows.append(("target", [report.target]))
    if report.edits:
        rows.append(("edits", list(report.edits)))
    rows.append(("steps", list(plan.steps) or ["none"]))
    per_module = [
        f"{mod} {done}/{total} ({percent(share)})" for mod, done, total, share in report.per_module()
    ]
    rows.append(("loaded", capped(per_module, per_line=4)))
    coverage = f"{percent(report.coverage)} of {report.expected_numel:,} target parameters"
    if plan.new:
        coverage += f" expected from the source ({report.target_numel - report.expected_numel:,} new)"
    rows.append(("coverage", [coverage]))
    if plan.new:
        rows.append(("new", capped(group_names(plan.new))))
    mismatched = [
        f"{m.target}: source {list(m.source_shape)}, target {list(m.target_shape)}"
        + (f" ({m.reason})" if m.reason else "")
        for m in plan.mismatched
    ]
    rows.append(("mismatched", capped(mismatched) or ["none"]))
    rows.append(("missing", capped(group_names(plan.missing)) or ["none"]))
    rows.append(("unexpected", capped(group_names(plan.unexpected)) or ["none"]))
    if plan.unused:
        rows.append(("unused", capped(group_names(plan.unused))))
    if report.hints:
        rows.append(("hints", list(report.hints)))
    if plan.excluded:
        rows.append(("excluded", capped(group_names(plan.excluded))))
    if plan.derived:
        rows.append(("rules", capped(rule_lines(plan.derived))))
    paired = [f"{m.source} -> {m.target} ({m.how})" for m in plan.matched if m.how not in ("exact", "rule")]
    if paired:
        rows.append(("paired", capped(paired)))
    reshaped = [
        f"{m.target}: {list(m.source_shape)} -> {list(m.shape)}" for m in plan.matched if m.source_shape
    ]
    if reshaped:
        rows.append(("reshaped", capped(reshaped)))
    casts = sorted({m.cast for m in plan.matched if m.cast})
    if casts:
        rows.append(
            ("cast", [f"{a} -> {b}: {sum(m.cast == (a, b) for m in plan.matched)} tensors" for a, b in casts])
        )
    if report.lossy:
        rows.append(("lossy cast", lossy_lines(report.lossy)))
    if plan.tied:
        rows.append(("tied", capped([f"{t} (shares storage with {via})" for t, via in plan.tied])))
    if report.finetune is not None:
        rows.extend(finetune_rows(report.finetune))
    if report.check is not None:
        rows.append(("check", [report.check.summary()]))
    if not report.written:
        why = f" ({report.notes[0]})" if report.notes else ""
        rows.append(("output", [f"{report.output or 'none'}: not written{why}"]))
    else:
        verified = (
            f"; re-read, {report.verified} tensors bit-identical" if report.verified is not None else ""
        )
        rows.append(("output", [f"{report.output}: written{verified}"]))
    return rows


def lossy_lines(lossy: dict[str, CastLosses]) -> list[str]:
    """`float32 -> float16: 2 tensors`, then each tensor with what its cast lost, worst first."""
    changes = [losses.change for losses in lossy.values()]
    lines = [f"{change}: {plural(changes.count(change), 'tensor')}" for change in dict.fromkeys(changes)]
    worst = sorted(lossy, key=lambda name: (-lossy[name].overflow - lossy[name].nan, -lossy[name].flushed))
    return lines + capped([f"{name}: {lossy[name].describe()}" for name in worst])


def finetune_rows(summary: FinetuneSummary) -> list[Row]:
    """Trainable and frozen elements per top-level module; each optimizer group."""
    per_module = [
        f"{m} {human_count(t)} trainable, {human_count(f)} frozen"
        if t and f
        else f"{m} {'frozen' if f else 'trainable'}"
        for m, t, f in summary.modules
    ]
    rows = [("trainable", capped(per_module, per_line=3))]
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


def convert_rows(report: ConvertReport) -> list[Row]:
    """The rows of the `surgery convert` report, summary first."""
    where = ".".join(report.container or ()) or "(top level)"
    rows: list[Row] = [("summary", [report.summary()])]
    rows.append(("source", [f"{report.source}: {where} ({report.source_format})"]))
    rows.append(("output", [f"{report.output} ({report.output_format})"]))
    if report.shards:
        rows.append(("shards", capped(list(report.shards))))
    rows.append(("steps", list(report.steps) or ["none"]))
    if report.left_out:
        rows.append(("left out", capped(short_names(report.left_out))))
    if report.cast:
        rows.append(("cast", [f"{change}: {plural(n, 'tensor')}" for change, n in report.cast.items()]))
    if report.lossy:
        rows.append(("lossy cast", lossy_lines(report.lossy)))
    if report.aliases:
        tied = [f"{alias} = {kept}" for alias, kept in report.aliases.items()]
        how = (
            "stored once; the alias is in the metadata and restored on read"
            if report.aliases_in_metadata
            else "one storage, as saved"
        )
        rows.append(("tied", [*capped(tied), how]))
    if report.verified is not None:
        rows.append(("verified", [f"re-read, {plural(report.verified, 'tensor')} equal to their source"]))
    return rows


def merge_rows(report: MergeReport) -> list[Row]:
    """The rows of the `surgery merge` report, summary first."""
    rows: list[Row] = [("summary", [report.summary()])]
    rows.append(("method", [f"{report.method}, in float64"]))
    rows += [("base", [i.describe()]) for i in report.inputs if i.role == "base"]
    if report.adapters:
        rows.append(("adapters", [a.describe() for a in report.adapters]))
    else:
        rows.append(("inputs", [i.describe() for i in report.inputs if i.role == "input"]))
    if report.replaced:
        how = "taken whole from the adapter (modules_to_save, trained biases)"
        rows.append(("replaced", [*capped(short_names(list(report.replaced)), per_line=3), how]))
    if report.selection is not None:
        rows.append(("selected", [report.selection.describe()]))
        rows.append(("left out", capped(list(report.selection.left_out), per_line=3)))
    rows.append(("output", [f"{report.output} ({report.output_format})"]))
    if report.shards:
        rows.append(("shards", capped(list(report.shards))))
    if report.kept:
        dtypes = ", ".join(dict.fromkeys(report.kept.values()))
        which = "newest" if report.selection else "last"
        where = f"{dtypes}, never averaged: from the {which} input, {report.kept_from}"
        rows.append(("kept", [*capped(short_names(list(report.kept)), per_line=3), where]))
    if report.unmerged:
        reasons: dict[tuple[str, str], list[str]] = {}
        for name, reason in report.unmerged.items():
            reasons.setdefault(reason, []).append(name)
        lines = [
            f"{', '.join(short_names(names))}: from {source} ({why})"
            for (source, why), names in reasons.items()
        ]
        rows.append(("not merged", capped(lines)))
    if report.mixed:
        pairs = [" vs ".join(d) for d in report.mixed.values()]
        lines = [f"{pair}: {plural(pairs.count(pair), 'tensor')}" for pair in dict.fromkeys(pairs)]
        rows.append(("dtypes", [*lines, "merged in float64, written as the first checkpoint's (or --dtype)"]))
    if report.cast:
        rows.append(("cast", [f"{change}: {plural(n, 'tensor')}" for change, n in report.cast.items()]))
    if report.lossy:
        rows.append(("lossy cast", lossy_lines(report.lossy)))
    if report.aliases:
        tied = [f"{alias} = {kept}" for alias, kept in report.aliases.items()]
        rows.append(("tied", [*capped(tied), "merged once, one tensor in the output"]))
    if report.verified is not None:
        rows.append(("verified", [f"re-read, {plural(report.verified, 'tensor')} as merged"]))
    return rows


def extract_rows(report: ExtractReport) -> list[Row]:
    """The rows of the `surgery extract` report, summary first; the layers the rank holds worst first."""
    rows: list[Row] = [("summary", [report.summary()])]
    rows.append(("fine-tune", [report.finetuned]))
    rows.append(("base", [report.base]))
    rows.append(
        ("output", [f"{report.output} (PEFT LoRA adapter: adapter_config.json, adapter_model.safetensors)"])
    )
    if report.errors:
        from surgery.commands.extract import share

        worst = [f"{e.name}: {share(e.error)}" for e in report.errors[:WORST_LAYERS]]
        more = (
            [f"... and {len(report.errors) - WORST_LAYERS} more"] if len(report.errors) > WORST_LAYERS else []
        )
        rows.append(
            ("left out", [*worst, *more, "of each layer's difference (‖Δ - B·A‖ / ‖Δ‖), worst first"])
        )
    if report.modules:
        rows.append(("whole", [*capped(report.modules, per_line=3), "modules_to_save: kept whole, exact"]))
    if report.biases:
        rows.append(
            ("biases", [*capped(short_names(report.biases), per_line=3), "of LoRA layers, kept whole"])
        )
    return rows


def diff_rows(report: DiffReport) -> list[Row]:
    """The rows of the `surgery diff` report, summary first; the largest differences first."""
    rows: list[Row] = [("summary", [report.summary()])]
    rows.append(("A", [report.a]))
    rows.append(("B", [report.b]))
    if report.steps:
        rows.append(("steps", list(report.steps)))
    rows.append(("only in A", capped(short_names(report.only_a)) or ["none"]))
    rows.append(("only in B", capped(short_names(report.only_b)) or ["none"]))
    by_kind = {
        kind: [d for d in report.differences if d.kind == kind] for kind in ("shape", "dtype", "values")
    }
    if by_kind["shape"]:
        rows.append(("shape", capped([d.describe() for d in by_kind["shape"]])))
    if by_kind["dtype"]:
        rows.append(("dtype", _dtype_lines(by_kind["dtype"])))
    if report.structure_only:
        rows.append(("values", ["not read (--structure-only)"]))
    else:
        rows.append(("values", _value_lines(by_kind["values"], by_kind["dtype"]) or ["none differ"]))
        read = f"{human_bytes(report.bytes_read)} read in {report.seconds:.2f} s"
        rows.append(("identical", [f"{report.identical} of {report.compared} tensors in both ({read})"]))
    return rows


def _value_lines(same_dtype: list[Difference], other_dtype: list[Difference]) -> list[str]:
    """Every tensor whose values differ, whatever its dtype, the largest differences first:
    tensors of one dtype each, and of another dtype those that hold NaN or inf where the other
    side does not (or NaN on both), the rest (rounding: the dtype row) in one line."""
    alarming = [d for d in other_dtype if d.nan or d.inf or d.nan_both]
    rounded = [d for d in other_dtype if d.moved and d not in alarming]
    lines = capped([d.describe() for d in sorted(same_dtype + alarming, key=lambda d: -(d.max_abs or 0.0))])
    if rounded:
        top = max(rounded, key=lambda d: d.max_abs or 0.0)
        verb = "differs" if len(rounded) == 1 else "differ"
        lines.append(
            f"{plural(len(rounded), 'tensor')} of another dtype {verb}, max abs {top.max_abs or 0.0:.3g} in {top.name}"
        )
    return lines


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


def scan_rows(report: ScanReport) -> list[Row]:
    """A row per checkpoint (its verdict, the path and the worst finding), per file named on
    the command line that was skipped, then the summary."""
    rows: list[Row] = []
    for r in report.results:
        what = f"{r.format}: " if r.format and r.verdict != "safe" else f"{r.format}, " if r.format else ""
        rows.append((r.verdict, [f"{r.path}  {what}{r.reason}"]))
    rows += [("skipped", [f"{s.path}  {s.reason}"]) for s in report.skipped if s.named]
    rows.append(("summary", [report.summary()]))
    return rows


def sanitize_rows(report: SanitizeReport) -> list[Row]:
    """The rows of the `surgery sanitize` report, summary first, then each change."""
    rows: list[Row] = [("summary", [report.summary()])]
    rows.append(("source", [f"{printable(report.source)} ({report.source_format})"]))
    state = "torch.load(weights_only=True) reads it" if report.written else "not written (--dry-run)"
    rows.append(("output", [f"{printable(report.output)}: {state}"]))
    rows.append(
        ("kept", [f"{plural(report.tensors, 'tensor')} in {plural(report.storages, 'storage')}, bit for bit"])
    )
    made = [printable(f"{c.where}: {c.what} -> {c.became}") for c in report.made_plain]
    if made:
        rows.append(("plain", capped(made)))
    dropped = [printable(f"{c.where}: {c.what} -> {c.became}") for c in report.dropped]
    if dropped:
        rows.append(("dropped", capped(dropped)))
    return rows


def presets_rows(report: PresetsReport) -> list[Row]:
    """One row a preset: its name, what it ports, the versions it was checked with."""
    rows: list[Row] = []
    for r in report.presets:
        verified = ", ".join(f"{lib} {v}" for lib, v in r.verified)
        rows.append(
            (
                r.origin.removeprefix("preset "),
                [r.description + (f" (verified: {verified})" if verified else "")],
            )
        )
    return rows or [("presets", ["none"])]


# The rows of each report, by its type's name (the reports live in the commands layer,
# imported only when a command has run).
ROWS = {
    "PortReport": port_rows,
    "ConvertReport": convert_rows,
    "MergeReport": merge_rows,
    "ExtractReport": extract_rows,
    "DiffReport": diff_rows,
    "ScanReport": scan_rows,
    "SanitizeReport": sanitize_rows,
    "PresetsReport": presets_rows,
}


def page_of(report: Any) -> Page:
    """The page any command's report is drawn as."""
    if type(report).__name__ == "InspectReport":
        from surgery.render.inspect import inspect_page

        return inspect_page(report)
    return Page(ROWS[type(report).__name__](report))
