"""What `surgery inspect` shows: the page of rows, findings and the module tree.

Both read a `Checkpoint` and compute nothing the library has not: where the
state_dict sits, what is beside it, sizes, the safety verdict, the tree of names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from surgery.formats.safety import SEVERITIES
from surgery.names import build_tree, wrapper_prefixes
from surgery.render.rows import Page, Row, capped
from surgery.render.tree import TreeView
from surgery.text import human_bytes, human_count, plural
from surgery.trust import RECIPE_KEY

if TYPE_CHECKING:
    from surgery.commands.inspect import InspectReport
    from surgery.formats.checkpoint import Checkpoint


def inspect_page(report: InspectReport) -> Page:
    """The inspect report as rows: containers, sizes, metadata, the safety verdict and each
    finding, then the module tree of the selected tensors (folded below `depth`)."""
    ckpt, globs, depth, tensors = report.checkpoint, report.filter, report.depth, report.tensors
    rows: list[Row] = [("format", [ckpt.description])]
    if "hf_config_line" in ckpt.metadata:
        rows.append(("hf model", [ckpt.metadata["hf_config_line"]]))
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
    if report.attributes:
        listed = [f"{t.name}: tensor {t.dtype} {list(t.shape)}" for t in report.attributes]
        heading = (
            f"{plural(len(listed), 'tensor')} outside state_dict() (plain attributes, non-persistent"
            " buffers): port and convert leave them out"
        )
        rows.append(("attributes", [heading, *capped(listed)]))
    if ckpt.prefix:
        wrappers = wrapper_prefixes(ckpt.prefix)
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
        shown = [f"{k}: {v[:80]}" for k, v in list(meta.items())[:12] if k != RECIPE_KEY]
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
    if ckpt.metadata.get("crc_checked") == "data.pkl only":
        rows.append(("crc", ["data.pkl checked; storages not (torch ignores CRCs): --verify reads all data"]))
    elif ckpt.metadata.get("crc_checked"):
        skipped = ckpt.metadata.get("crc_not_checked") or {}
        rows.append(
            ("crc", [f"every storage checked but {name} ({why})" for name, why in skipped.items()])
            if skipped
            else ("crc", ["every storage checked"])
        )
    if ckpt.hub:
        rows.extend(hub_rows(ckpt.hub))
    if ckpt.remote:
        rows.append(("fetched", [fetched_line(ckpt.remote)]))
    if ckpt.download is not None:
        rows.append(("downloaded", [downloaded_line(ckpt.download.to_json())]))
    rows.append(("safety", [safety_line(ckpt)]))
    findings = [f"{f.severity}: {f.message}" + (f"  [{f.where}]" if f.where else "") for f in ckpt.findings]
    if findings:
        rows.append((None, findings))
    tree = TreeView(build_tree((t.name, t.numel) for t in tensors), {t.name: t for t in tensors}, depth)
    return Page(rows, title=str(ckpt.path), tree=tree)


def hub_rows(hub: dict) -> list[tuple[str, list[str]]]:
    """Where an hf:// address was read from, and the repo's checkpoint files when it named none."""
    source = "the local Hub cache" if hub["source"] == "cache" else "the Hub, over HTTP"
    rows = [("hub", [f"{hub['address']}: {hub['file']}, read from {source}"])]
    if hub["files"] is not None:
        weights = [f for f in hub["files"] if f["checkpoint"]]
        others = len(hub["files"]) - len(weights)
        width = max((len(f["path"]) for f in weights[:12]), default=0)
        shown = [f"{f['path']:<{width}}  {human_bytes(f['size'])}" for f in weights[:12]]
        more = [f"... and {len(weights) - 12} more"] if len(weights) > 12 else []
        rows.append(("repo files", [*shown, *more, f"({plural(others, 'other file')})"]))
    return rows


def fetched_line(remote: dict) -> str:
    """What a remote inspect took: bytes and HTTP requests against the size of the files."""
    size, read = remote["size"], remote["bytes_read"]
    share = f"{100 * read / size:.3g}%" if size else "all"
    files = f" ({remote['files']} files)" if remote["files"] > 1 else ""
    return (
        f"{read:,} bytes ({human_bytes(read)}) of {size:,}{files}, {share}, "
        f"in {plural(remote['requests'], 'HTTP request')}"
    )


def downloaded_line(download: dict) -> str:
    """What downloading a remote checkpoint took, and where its copy went."""
    files = f" ({download['files']} files)" if download["files"] > 1 else ""
    got = f"{human_bytes(download['bytes'])}{files}" if download["bytes"] else f"nothing{files}: all cached"
    return f"{got} in {download['seconds']:.2f} s, to {download['to']}"


def recipe_rows(meta: dict[str, str]) -> list[Row]:
    """A fine-tune-ready file's recipe, as `surgery.load_ready` will replay it."""
    from surgery.models.recipe import recipe_of

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
