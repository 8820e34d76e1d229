"""`surgery port`: a checkpoint into a target architecture, with a report.

`PortRequest` says what to do (from flags, a recipe file or a script);
`port_file(request)` builds and edits the target (models.targets, models.edit),
plans on names and shapes (plans.match.plan_port), loads one tensor at a time
(models.loading) and writes the target's complete state_dict (writers).
`port(source, into=model)` does the same into a live module. Every path returns
a `PortReport`; a strict refusal raises `PortFailed` carrying it.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgery import __version__
from surgery.casts import CastLosses, LossyCast
from surgery.commands.maps import rule_sets
from surgery.commands.port_files import SourceDigests, read_plan, verify_output, write_plan
from surgery.commands.port_request import DEFAULT_MIN_COVERAGE, PortRequest, check_min_coverage, paths
from surgery.errors import BadArgument, SurgeryError, UsageError
from surgery.formats.checkpoint import Checkpoint, open_trusted
from surgery.models.edit import Edit, apply, first_conv, get_module, initialise
from surgery.models.finetune import FinetunePlan, FinetuneSummary, apply_freeze, param_groups, summarize
from surgery.models.loading import Output, cast_losses, load_into
from surgery.models.recipe import RECIPE_KEY, Recipe
from surgery.models.targets import Target, build_target, parse_kwargs, target_of_module
from surgery.models.transforms import MappedSource
from surgery.names import group_names
from surgery.plans.adapt import (
    adapt_steps,
    adaptations,
    as_rules,
    kept_heads,
    position_grids,
    with_adapt_hints,
)
from surgery.plans.hints import diagnose
from surgery.plans.intent import Intent, with_intent
from surgery.plans.keys import KeyRules, Rename, strings
from surgery.plans.match import (
    FILLED_BUFFER,
    SORTED_FORMATS,
    MatchError,
    PortOptions,
    PortPlan,
    plan_port,
    source_names,
)
from surgery.plans.rules import RuleError
from surgery.text import percent
from surgery.trust import require_trust
from surgery.values import Entry, both_ways

if TYPE_CHECKING:
    from torch import nn

    from surgery.models.check import CheckResult


class PortFailed(SurgeryError):
    """A port refused: strict and keys missing, unexpected or mismatched, or less of the target
    loaded than `min_coverage`; nothing was loaded or written. `.report` says what was found."""

    def __init__(
        self, where: object, report: PortReport, message: str | None = None, hint: str | None = None
    ):
        super().__init__(
            where,
            message or f"strict port refused: {report.summary()}",
            hint=hint or "pass --strict false to load what matches",
        )
        self.report = report


@dataclass(frozen=True)
class PortReport:
    """What a port did or would do; the CLI renders it, `--json` prints `to_json()`."""

    source: str
    source_format: str
    container: tuple[str, ...] | None
    target: str
    plan: PortPlan
    target_sizes: tuple[tuple[str, int], ...]  # every target key with its element count, in order
    options: PortOptions
    strict: bool
    min_coverage: float = DEFAULT_MIN_COVERAGE  # percent of the expected parameters
    output: str | None = None
    written: bool = False
    verified: int | None = None  # tensors re-read and found bit-identical
    notes: tuple[str, ...] = field(default=())
    edits: tuple[str, ...] = field(default=())  # what each edit did, in order
    finetune: FinetuneSummary | None = None
    hints: tuple[str, ...] = ()  # what would pair the missing keys with the unexpected ones (plans.hints)
    lossy: dict[str, CastLosses] = field(default_factory=dict)  # target key -> what its cast lost
    check: CheckResult | None = None  # --check: both models run on the same probes

    @property
    def loaded(self) -> set[str]:
        """Target keys filled from the source (directly or through a tied key)."""
        return {m.target for m in self.plan.matched} | {t for t, _ in self.plan.tied}

    @property
    def target_numel(self) -> int:
        return sum(n for _, n in self.target_sizes)

    @property
    def expected_numel(self) -> int:
        """The target's elements expected from the source: all but those of keys `new` by intent."""
        new = set(self.plan.new)
        return sum(n for name, n in self.target_sizes if name not in new)

    @property
    def coverage(self) -> float:
        """Share of the target's elements expected from the source (`expected_numel`) that
        were filled from it: what `min_coverage` guards."""
        total, loaded = self.expected_numel, self.loaded
        return sum(n for name, n in self.target_sizes if name in loaded) / total if total else 1.0

    def per_module(self) -> list[tuple[str, int, int, float]]:
        """(top-level module, keys loaded, keys, share of its elements loaded), in target order."""
        loaded = self.loaded
        groups: dict[str, list[int]] = {}
        for name, numel in self.target_sizes:
            g = groups.setdefault(name.split(".")[0], [0, 0, 0, 0])
            g[1] += 1
            g[3] += numel
            if name in loaded:
                g[0] += 1
                g[2] += numel
        return [
            (mod, done, total, (n / size) if size else 1.0) for mod, (done, total, n, size) in groups.items()
        ]

    def summary(self) -> str:
        """`loaded 120/122 tensors (99.9% of parameters); mismatched 2: fc.{bias,weight}; ...`;
        with keys new by intent, the share is of the parameters expected from the source."""
        plan = self.plan
        total = (
            len(plan.matched)
            + len(plan.mismatched)
            + len(plan.missing)
            + len(plan.tied)
            + len(plan.filled)
            + len(plan.new)
        )
        loaded = len(plan.matched) + len(plan.tied)
        of = "of the expected parameters" if plan.new else "of parameters"
        parts = [f"loaded {loaded}/{total} tensors ({percent(self.coverage)} {of})"]
        if plan.filled:
            parts.append(f"filled {len(plan.filled)} {FILLED_BUFFER} as torch does")
        for label, names in (
            ("new", list(plan.new)),
            ("mismatched", [m.target for m in plan.mismatched]),
            ("missing", list(plan.missing)),
            ("unexpected", list(plan.unexpected)),
            ("unused", list(plan.unused)),
        ):
            if names or label in ("missing", "unexpected"):
                grouped = group_names(names)
                shown = ", ".join(grouped[:3]) + (", ..." if len(grouped) > 3 else "")
                parts.append(f"{label} {len(names)}" + (f": {shown}" if names else ""))
        return "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "surgery_json": 1,
            "source": self.source,
            "source_format": self.source_format,
            "container": list(self.container) if self.container is not None else None,
            "target": self.target,
            "summary": self.summary(),
            "steps": list(plan.steps),
            "matched": [m.to_json() for m in plan.matched],
            "missing": list(plan.missing),
            "unexpected": list(plan.unexpected),
            "excluded": list(plan.excluded),
            "filled": list(plan.filled),
            "mismatched": [m.to_json() for m in plan.mismatched],
            "new": list(plan.new),
            "unused": list(plan.unused),
            "tied": [{"target": t, "loaded_through": via} for t, via in plan.tied],
            "coverage": round(self.coverage, 6),
            "strict": self.strict,
            "min_coverage": self.min_coverage,
            "hints": list(self.hints),
            "options": self.options.to_json(),
            "output": self.output,
            "written": self.written,
            "verified": self.verified,
            "notes": list(self.notes),
            "edits": list(self.edits),
            "finetune": self.finetune.to_json() if self.finetune else None,
            "lossy_cast": {name: losses.to_json() for name, losses in self.lossy.items()},
            "derived": [d.to_json() for d in plan.derived],
            "check": self.check.to_json() if self.check is not None else None,
        }


def entries_of(ckpt: Checkpoint) -> list[Entry]:
    return [Entry(t.name, t.shape, t.dtype) for t in ckpt.tensors]


def _plan(
    ckpt: Checkpoint, target: Target, options: PortOptions, intent: Intent = Intent(), *, adapt: bool = False
) -> tuple[PortPlan, tuple[str, ...]]:
    """plan_port for a checkpoint and a target, read with the user's intent, failures as
    SurgeryErrors; and the hints that would pair what is left missing and unexpected.
    With `adapt`, mismatches a known adaptation loads are planned again as rules
    (`plans.adapt`); without, they say what `--adapt` would do."""
    source = entries_of(ckpt)
    target_file = target.template.format if target.template is not None else None
    ties, source_ties = target.aliases(), both_ways(ckpt.aliases)
    grids = position_grids(target.module) if target.module is not None else {}

    def planned(options: PortOptions) -> PortPlan:
        try:
            return plan_port(
                source,
                target.entries,
                options,
                both_ways(ties),
                source_ties,
                saved_order=not {ckpt.format, target_file} & SORTED_FORMATS,
                source_versions=ckpt.module_versions,
            )
        except (MatchError, RuleError) as exc:
            raise SurgeryError(ckpt.path, str(exc)) from None

    options = replace(options, adapt=adapt)
    plan = planned(options)
    adapt_hints: list[str] = []
    if adapt and (found := adaptations(plan, grids, ties, source_ties)):
        seen, _ = options.keys.apply([e.name for e in source])
        plain = [a for a in found if a.source in seen]  # a rule's output was adapted in its rule
        plan = planned(replace(options, rules=(*options.rules, as_rules(plain, seen))))
        plan = replace(plan, steps=(*plan.steps, *adapt_steps(found)))
        intent = replace(intent, created=(*intent.created, *kept_heads(found)))
    elif not adapt:
        plan, adapt_hints = with_adapt_hints(plan, grids)
    if intent.empty and plan.complete:
        return plan, ()
    renamed = source_names([e.name for e in source], [e.name for e in target.entries], options)
    plan = with_intent(plan, intent, renamed)
    by_source = {e.name: e for e in source}
    by_target = {e.name: e for e in target.entries}
    unexpected = [replace(by_source[s], name=renamed.get(s, s)) for s in plan.unexpected]
    plain = options.mapping is not None or all(renamed.get(s, s) == s for s in plan.unexpected)
    hints = diagnose([by_target[t] for t in plan.missing], unexpected, match=options.match, plain_names=plain)
    return plan, (*adapt_hints, *hints)


def refusal(report: PortReport) -> tuple[str, str, str] | None:
    """Why nothing may be loaded or written, or None: (message, hint, note for the report).

    Too little loaded (under `report.min_coverage`) is refused whatever `strict` says; a
    strict port refuses anything missing, unexpected or mismatched. The hint names the fix
    the key lists suggest (`report.hints`), and `--strict false` only when most of the
    target would be loaded: loading what matches of a port that matched almost nothing
    writes a wrong model. A rule whose output does not fit its target is said first.
    """
    low = report.coverage * 100 < report.min_coverage
    if not low and not (report.strict and not report.plan.complete):
        return None
    misfits = rule_misfits(report.plan)
    cause = (
        f"{misfits[0]}{f' (and {len(misfits) - 1} more)' if len(misfits) > 1 else ''}; " if misfits else ""
    )
    fixes = list(report.hints) + (["--dry-run shows each rule's ops and shapes"] if misfits else [])
    if low:
        floor = f"--min-coverage {report.min_coverage:g}%"
        message = (
            f"port refused: {cause}{percent(report.coverage)} of the target's parameters would be loaded, "
            f"under {floor}: {report.summary()}"
        )
        fixes = fixes or ["check the target and the key rules (--dry-run shows them)"]
        return message, "; ".join([*fixes, "--min-coverage 0 writes it anyway"]), f"under {floor}"
    if report.coverage * 100 >= DEFAULT_MIN_COVERAGE:
        fixes.append(
            "pass --strict false to load what matches (or --allow-missing/--allow-unexpected GLOB for keys you expect)"
        )
    fixes = fixes or ["check the target and the key rules (--dry-run shows them)"]
    return f"strict port refused: {cause}{report.summary()}", "; ".join(fixes), "strict port refused"


def rule_misfits(plan: PortPlan) -> list[str]:
    """Each rule output of another shape than its target, named by its rule and binding:
    `rules.toml rule 2 (n=0) makes [24, 8] for blocks.0.attn.qkv.weight [32, 8]`."""
    made_by = {name: d for d in plan.derived for name in d.names}
    return [
        f"{made_by[m.source].label} makes {list(m.source_shape)} for {m.target} {list(m.target_shape)}"
        for m in plan.mismatched
        if m.source in made_by
    ]


def _report(
    ckpt: Checkpoint, target: Target, plan: PortPlan, options: PortOptions, strict: bool, **extra: Any
) -> PortReport:
    return PortReport(
        source=str(ckpt.path),
        source_format=ckpt.format,
        container=ckpt.container,
        target=target.spec,
        plan=plan,
        target_sizes=tuple((e.name, e.numel) for e in target.entries),
        options=options,
        strict=strict,
        **extra,
    )


def port(
    source: str | Path | Checkpoint,
    into: nn.Module,
    *,
    strict: bool = False,
    match: str = "auto",
    rename: Sequence[str | Rename] = (),
    strip_prefix: Sequence[str] = (),
    add_prefix: str | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    reshape: bool = False,
    key: str | None = None,
    trust: bool = False,
    min_coverage: float = DEFAULT_MIN_COVERAGE,
    allow_missing: Sequence[str] = (),
    allow_unexpected: Sequence[str] = (),
    allow_lossy_cast: bool = False,
    map: Sequence[str | Path] = (),
    preset: Sequence[str] = (),
    map_args: Mapping[str, Any] | None = None,
    adapt: bool = False,
) -> PortReport:
    """Load a checkpoint into a live module, in place, and say exactly what happened.

    Args:
        source: a checkpoint path (any format `surgery inspect` reads) or an opened Checkpoint.
        into: the module to fill; keys it has that the source does not fill keep their values.
        strict: refuse (load nothing) unless every key is matched with its shape.
        match: exact, suffix, order or auto.
        rename: `REGEX=REPL` rules applied in order.
        trust: read a source whose pickle references code (never run either way).
        min_coverage: refuse (load nothing), strict or not, when less than this percent of the
            parameters expected from the source would be loaded; 0 turns the guard off.
        allow_missing, allow_unexpected: globs of target and source keys expected to find
            no pair: reported as new and unused, not missing and unexpected.
        allow_lossy_cast: load tensors whose cast to the module's dtype overflows to inf,
            makes NaN or flushes non-zero values to zero.
        map, preset: rule files and presets (`surgery presets`) applied before name matching.
        map_args: values for the rules' `"{name}"` op parameters (beside the module's config).
        adapt: load mismatched position embeddings, patch kernels, vocabularies and
            classifiers by resampling or resizing them (`plans.adapt`).

    Returns:
        The PortReport the CLI renders.

    Raises:
        PortFailed: `strict` and something is missing, unexpected or mismatched, or too
            little would be loaded (`min_coverage`).
        LossyCast: a cast loses values and `allow_lossy_cast` is not set (nothing was loaded).

    Example:
        >>> model = torchvision.models.resnet18(num_classes=2)
        >>> report = surgery.port("checkpoint.pth.tar", into=model)
        >>> print(report.summary())
        loaded 120/122 tensors (99.99% of parameters); mismatched 2: fc.{bias,weight}; missing 0; unexpected 0
    """
    rules = KeyRules.parse(
        key=key,
        strip_prefix=strip_prefix,
        add_prefix=add_prefix,
        rename=rename,
        include=include,
        exclude=exclude,
    )
    options = PortOptions(rules, match, reshape)
    check_min_coverage(min_coverage)
    intent = Intent(
        allow_missing=strings(allow_missing, "allow_missing"),
        allow_unexpected=strings(allow_unexpected, "allow_unexpected"),
    )
    sets = rule_sets(paths(map, "map"), strings(preset, "preset"))
    if map_args and not sets:
        raise BadArgument("map_args", "values for the rules' parameters, with no rules: pass map or preset")
    target = target_of_module(into)
    if sets:
        values = {**rule_values(target), **dict(map_args or {})}
        options = replace(options, rules=sets, rule_args=tuple(values.items()))
    ckpt = open_trusted(source, key=rules.key, trust=trust)
    plan, hints = _plan(ckpt, target, options, intent, adapt=adapt)
    report = _report(ckpt, target, plan, options, strict, min_coverage=min_coverage, hints=hints)
    refused = refusal(report)
    if refused is not None:
        message, hint, _ = refused
        raise PortFailed(ckpt.path, report, message, hint)
    source = mapped(ckpt, plan, target)
    report = _refuse_lossy(source, plan, report, allow_lossy_cast)
    load_into(into, source, plan)
    return report


def _check(request: PortRequest, ckpt: Checkpoint, plan: PortPlan, module: nn.Module) -> CheckResult:
    """`--check`: the source loaded into its own architecture (`check_from`, every key by
    name) and the loaded target run on the same probes; modules paired through the plan.
    Source keys the port leaves unused on purpose (a rule's `to = []`, such as Llama 1's
    `rope.freqs`; --allow-unexpected) may be unknown to that architecture too."""
    import glob

    from surgery.models.check import check

    assert request.check_from is not None
    built = build_target(request.check_from, trust=request.trust)
    if built.module is None:
        raise UsageError(request.check_from, "--from names a template: --check needs an architecture to run")
    unused = tuple(glob.escape(k) for k in plan.unused)
    try:
        loaded = port(
            ckpt, into=built.module, strict=True, match="auto", min_coverage=0, allow_unexpected=unused
        )
    except PortFailed as failed:
        raise SurgeryError(
            ckpt.path,
            f"--check: the source does not load into --from {request.check_from}: {failed.report.summary()}",
        ) from None
    return check(
        built.module,
        module,
        modules=module_pairs(loaded.plan, plan),
        layout_changed=tuple({k.rpartition(".")[0] for k in plan.layout_changed}),
        probe_shape=request.probe_shape,
        atol=request.atol,
    )


def module_pairs(source_plan: PortPlan, plan: PortPlan) -> dict[str, str]:
    """Source module -> target module, for modules whose every loaded tensor went one to one
    (through renames and ops) from one module to the other: the ones `--check` compares."""
    in_source = {m.source: m.target for m in source_plan.matched}
    partners: dict[str, set[str]] = {}
    for m in plan.matched:
        if m.source in in_source:
            partners.setdefault(in_source[m.source].rpartition(".")[0], set()).add(
                m.target.rpartition(".")[0]
            )
    one = {s: next(iter(t)) for s, t in partners.items() if len(t) == 1 and s and next(iter(t))}
    taken = list(one.values())
    return {s: t for s, t in one.items() if taken.count(t) == 1}


def rule_values(target: Target, map_args: Sequence[str] = ()) -> dict[str, Any]:
    """What a rule's `"{name}"` op parameters may name: the target's config (an `hf:`
    target's, `num_attention_heads`), then its keyword arguments, then `--map-arg NAME=VALUE`."""
    values: dict[str, Any] = {}
    config = getattr(target.module, "config", None)
    if callable(getattr(config, "to_dict", None)):
        values.update(config.to_dict())
    values.update(target.kwargs)
    values.update(parse_kwargs(map_args, "--map-arg"))
    return values


def keeps_own_values(plan: PortPlan, target: Target) -> bool:
    """Whether the output holds any of the target's own values: a key the source does not
    fill (missing, new, filled, mismatched), or rows a rule takes from the target."""
    filled = {m.target for m in plan.matched} | {t for t, _ in plan.tied}
    return any(e.name not in filled for e in target.entries) or any(
        op.name == "resize_rows" and op["init"] == "target" for d in plan.derived for op in d.ops
    )


def mapped(ckpt: Checkpoint, plan: PortPlan, target: Target) -> Checkpoint:
    """The source as loading and writing read it: with the rules' outputs when the plan has them."""
    if not plan.derived:
        return ckpt
    if target.module is not None:
        state = target.module.state_dict()
        value = state.__getitem__
    else:
        assert target.template is not None
        value = target.template.tensor
    return MappedSource(ckpt, plan.derived, value)  # type: ignore[return-value]


def provenance(
    ckpt: Checkpoint, target: Target, report: PortReport, digests: Mapping[Path, str]
) -> dict[str, str]:
    """Where the output came from, as str -> str metadata; `digests`: each source file's sha256."""
    return {
        "surgery.version": __version__,
        "surgery.source": str(ckpt.path),
        "surgery.source_files": json.dumps(
            [{"path": ckpt.origin(p), "sha256": digests[p]} for p in ckpt.files]
        ),
        "surgery.container": ".".join(ckpt.container or ()) or "(top level)",
        "surgery.target": target.spec,
        "surgery.target_kwargs": json.dumps(target.kwargs, default=repr),
        "surgery.rules": json.dumps(report.options.to_json()),
        "surgery.summary": report.summary(),
    } | (
        {"surgery.map": json.dumps([d.to_json() for d in report.plan.derived])} if report.plan.derived else {}
    )


def _refuse_lossy(ckpt: Checkpoint, plan: PortPlan, report: PortReport, allowed: bool) -> PortReport:
    """The report with what the casts lose; raises LossyCast (before anything is loaded or
    written) when they lose values and that is not `allowed`."""
    lossy = cast_losses(ckpt, plan)
    report = replace(report, lossy=lossy)
    if lossy and not allowed:
        raise LossyCast(ckpt.path, replace(report, notes=("a cast loses values",)), lossy)
    return report


def port_file(request: PortRequest) -> PortReport:
    """`surgery port` as a library call: build and edit the target, plan, load, write
    the target's complete state_dict.

    The target is built, edited (the request's edits, except `in_chans`, with new
    modules initialised by `init`), then the source is matched into the edited target
    and loaded; `in_chans` then adapts the loaded first conv. With a fine-tune plan
    (or any edit) the output carries the recipe `surgery.load_ready` replays.

    Nothing is written when `dry_run`, when `strict` and the plan is incomplete, or when
    less than `min_coverage` percent of the parameters expected from the source would be
    loaded (PortFailed). Keys the edits create are expected to be new: a strict port with
    `num_classes` or `replace` does not fail over them (`plans.intent`). The output holds CPU tensors, whatever device the source recorded.
    Its provenance holds every source file's sha256, computed by a background thread
    while the target is built and loaded (SourceDigests); a source file that changes
    before the output is in place fails the port.

    Raises:
        PortFailed: a strict port found keys missing, unexpected or mismatched, or too little
            would be loaded (the report rides on it).
        Untrusted: the target was read from a file and imports code, without `trust`.
        SurgeryError: an unreadable or unsafe source, a target that cannot be built, a failed write.

    Example:
        >>> request = PortRequest("checkpoint.pth.tar", "torchvision:resnet18?num_classes=2",
        ...                       out="ready.safetensors", strict=False)
        >>> print(surgery.port_file(request).summary())
    """
    from surgery.commands.ranks import ranks_from_env, write_hf_ranked
    from surgery.models.hf import output_config
    from surgery.writers import write_state_dict
    from surgery.writers.hf import hf_entries, hf_layout, write_hf_folder
    from surgery.writers.outputs import check_destination, check_folder_destination
    from surgery.writers.safetensors import is_safetensors
    from surgery.writers.torch_archive import streams_torch

    if request.target_named_by is not None:
        require_trust(request.to, request.target_named_by, trust=request.trust, named_by="the recipe file")
    if request.from_named_by is not None and request.check_from:
        require_trust(
            request.check_from, request.from_named_by, trust=request.trust, named_by="the recipe file"
        )
    mapping, plan_rules = read_plan(request.plan) if request.plan is not None else (None, None)
    sets = (plan_rules,) if plan_rules is not None else rule_sets(request.map, request.preset)
    options = PortOptions(request.keys, request.match, request.reshape, mapping)
    strict, dry_run, force, verify = request.strict, request.dry_run, request.force, request.verify
    edits, init, finetune, plan_out = request.edits, request.init, request.finetune, request.plan_out
    out_path = Path(request.out) if request.out is not None else None
    needs_values = (out_path is not None and not dry_run) or request.check  # else names and shapes do
    ckpt = open_trusted(request.source, key=request.keys.key, trust=request.trust, fetch=needs_values)
    writes = [
        p for p in (None if dry_run else out_path, Path(plan_out) if plan_out else None) if p is not None
    ]
    if len(writes) == 2 and writes[0].resolve() == writes[1].resolve():
        raise UsageError(writes[1], "the plan and the output are the same file")
    hf = request.format == "hf"  # a Hugging Face folder: config.json and safetensors

    def check_writes(inputs: Sequence[Path]) -> None:
        """Refuse an output or plan file that exists (without force) or would overwrite an input."""
        for path in writes:
            check = check_folder_destination if hf and path == out_path else check_destination
            check(path, list(inputs), force=force)

    rule_files = [Path(f) for f in request.map] + ([Path(request.plan)] if request.plan is not None else [])
    check_writes([*ckpt.files, *rule_files])  # before any work: refusals cost nothing
    hashed = ckpt.files if out_path is not None and not dry_run else []
    with SourceDigests(hashed) as digests:  # hashing from now on, beside building and loading
        # Shapes alone (the meta device) until the target's own values turn out to be needed.
        described = not (edits or init or not finetune.empty or request.check)
        target = build_target(request.to, request.args, trust=request.trust, meta=described)
        if target.template is not None:
            check_writes(target.template.files)
        config = output_config(target) if hf and not dry_run else None  # refused before any work
        target, edit_steps, created = _edit_target(target, edits, init)
        extracted = tuple(f"{e.spec}." for e in edits if e.op == "extract" and "," not in e.spec)
        options = replace(options, extracted=extracted) if extracted else options
        if sets:
            options = replace(
                options, rules=sets, rule_args=tuple(rule_values(target, request.map_args).items())
            )
        intent = Intent(created, removed_by(edits), request.allow_missing, request.allow_unexpected)
        plan, hints = _plan(ckpt, target, options, intent, adapt=request.adapt)
        report = _report(
            ckpt,
            target,
            plan,
            options,
            strict,
            min_coverage=request.min_coverage,
            output=str(out_path) if out_path else None,
            hints=hints,
        )
        report = replace(report, edits=tuple(edit_steps))
        if plan_out is not None:
            write_plan(
                Path(plan_out), report.plan, report.source, report.target
            )  # written even when refused: it is what to review
        late = [e for e in edits if e.op == "in_chans"]
        refused = refusal(report)
        writing = refused is None and not (dry_run or out_path is None)
        if writing and target.meta and keeps_own_values(plan, target):
            target = build_target(request.to, request.args, trust=request.trust)  # the same keys, with values
        source = mapped(ckpt, plan, target)
        if writing:
            report = _refuse_lossy(source, plan, report, request.allow_lossy_cast)
        transformed: set[str] = set()
        if request.check and target.module is None:
            raise UsageError(request.to, "--check runs the target: name an architecture, not a template")
        if target.module is not None and not target.meta:
            if writing or (request.check and refused is None):
                load_into(target.module, source, plan)
            if request.check and refused is None:
                result = _check(request, ckpt, plan, target.module)
                report = replace(report, check=result)
                if not result.passed:
                    hint = "--dry-run shows each rule's ops and shapes; fix the rule at the module named"
                    raise PortFailed(
                        ckpt.path,
                        replace(report, notes=("--check failed",)),
                        f"--check: {result.summary()}",
                        hint,
                    )
            for edit in late:  # after loading: the first conv's weight is derived from the source's
                _, _, text = apply(target.module, edit, adapt_weights=writing)
                transformed.add(first_conv(target.module) + ".weight")
                report = replace(report, edits=(*report.edits, text))
            target = target_of_module(target.module, target.spec, target.kwargs)
        report = replace(report, finetune=_finetune_summary(target, finetune))
        if refused is not None:
            message, hint, note = refused
            raise PortFailed(ckpt.path, replace(report, notes=(note,)), message, hint)
        if dry_run or out_path is None:
            return replace(report, notes=("--dry-run",))
        aliases = target.aliases()
        if hf:  # tied names are stored once, and read back after the others
            target = replace(target, entries=hf_entries(target.entries, aliases))
        raw = hf or is_safetensors(out_path) or streams_torch(target.entries)  # else torch.save needs tensors
        output = Output(source, target, plan, transformed, raw=raw)
        if output.needs_torch:
            importlib.import_module("torch")  # while the source is still being hashed
        metadata = provenance(ckpt, target, report, digests.result())
        if edits or init or not finetune.empty:
            recipe = Recipe(
                target.spec, tuple(edits), init, finetune, {m.source: m.target for m in plan.matched}
            )
            metadata[RECIPE_KEY] = json.dumps(recipe.to_json())
        checked: list[int] = []

        def check(written: Path) -> None:  # before the rename: a file that fails is never put in place
            digests.check_unchanged()
            if verify:
                checked.append(verify_output(written, output, where=out_path))

        ranks = ranks_from_env() if hf else None
        if ranks is not None:  # under torchrun: each rank writes its share of the shards
            assert config is not None
            layout = hf_layout(
                out_path, target.entries, metadata, shard_size=request.shard_size, aliases=aliases
            )
            write_hf_ranked(ranks, out_path, layout, output.get, config, done=output.release, check=check)
        elif hf:
            assert config is not None
            write_hf_folder(
                out_path,
                target.entries,
                output.get,
                metadata,
                config=config,
                shard_size=request.shard_size,
                done=output.release,
                check=check,
                aliases=aliases,
            )
        else:
            write_state_dict(
                out_path,
                target.entries,
                output.get,
                metadata,
                done=output.release,
                check=check,
                aliases=aliases,  # a torch file keeps tied weights in one storage, as torch.save would
            )
    return replace(report, written=True, verified=checked[0] if checked else None)


def _edit_target(
    target: Target, edits: Sequence[Edit], init: str | None
) -> tuple[Target, list[str], tuple[str, ...]]:
    """Apply the structural edits (all but in_chans) and initialise what they created.

    Returns:
        (the edited target, what each edit did, the paths of the modules they created).
    """
    structural = [e for e in edits if e.op != "in_chans"]
    if not edits and not init:
        return target, [], ()
    if target.module is None:
        raise UsageError(
            target.spec,
            "edits need a built target (torchvision, timm or a factory), not a template checkpoint",
        )
    module, created, steps = target.module, [], []
    for edit in structural:
        module, paths, text = apply(module, edit)
        created += paths
        steps.append(text)
    if init and created:
        for path in created:
            initialise(get_module(module, path), init)
        steps.append(f"initialised {', '.join(created)} ({init})")
    return target_of_module(module, target.spec, target.kwargs), steps, tuple(created)


def removed_by(edits: Sequence[Edit]) -> tuple[str, ...]:
    """The module paths edits deleted or dropped: the source's keys there are unused by intent."""
    paths = [e.path for e in edits if e.op == "delete"]
    paths += [p.strip() for e in edits if e.op == "without" for p in e.spec.split(",") if p.strip()]
    return tuple(paths)


def _finetune_summary(target: Target, plan: FinetunePlan) -> FinetuneSummary | None:
    if plan.empty:
        return None
    if target.module is None:
        raise UsageError(target.spec, "a fine-tune plan needs a built target, not a template checkpoint")
    warnings = apply_freeze(target.module, plan)
    groups, more = param_groups(target.module, plan)
    return summarize(target.module, groups, warnings + more, plan)
