"""The commands: each parses its flags into a request, calls the library, shows the report,
and returns its exit code (None: 0).

No logic of its own: what a command does is a library call a script can make too.
"""

from pathlib import Path
from typing import Annotated, Optional

import typer

from surgery.cli.fast import inspect_checkpoint
from surgery.cli.options import (
    AddPrefixOpt,
    AllowLossyCastOpt,
    AllowMissingOpt,
    AllowUnexpectedOpt,
    CheckpointArg,
    DebugOpt,
    DepthOpt,
    DownloadOpt,
    DryRunOpt,
    ExcludeOpt,
    FilterOpt,
    ForceOpt,
    IncludeOpt,
    JsonOpt,
    KeyOpt,
    MinCoverageOpt,
    OutOpt,
    PortFormatOpt,
    RecipeOpt,
    RenameOpt,
    ShardSizeOpt,
    ShardsOpt,
    StripPrefixOpt,
    Strs,
    Text,
    TrustOpt,
    VerifyOpt,
    fields_of,
)
from surgery.cli.output import progress, say, show
from surgery.cli.typer_app import command

Int = Optional[int]
Float = Optional[float]


@command(
    [
        "surgery inspect checkpoint.pth.tar",
        "surgery inspect model.safetensors --filter 'layer4' --depth 2",
        "surgery inspect ema.pth --key model_ema --json",
    ]
)
def inspect(
    path: CheckpointArg,
    filter: FilterOpt = None,
    depth: DepthOpt = None,
    key: KeyOpt = None,
    verify: VerifyOpt = False,
    download: DownloadOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> int:
    """What is inside a checkpoint: containers, tensors, sizes, safety. Reads no tensor data.

    Exit code 1 when the pickle references anything beyond tensors and plain
    containers (or the file is damaged), so scripts notice; 2 on bad usage.
    """
    return inspect_checkpoint(path, filter, depth, key, verify, download, json_out)


STRICTNESS = {
    "true": True,
    "yes": True,
    "1": True,
    "on": True,
    "false": False,
    "no": False,
    "0": False,
    "off": False,
}


@command(
    [
        "surgery port checkpoint.pth.tar --to 'torchvision:resnet18?num_classes=2' --strict false -o ready.safetensors",
        "surgery port ckpt.pth --to timm:vit_small_patch16_224 --strip-prefix module. --dry-run",
        "surgery port --recipe recipe.toml --verify",
    ]
)
def port(
    source: Annotated[
        Text,
        typer.Argument(help="The checkpoint to port (any format inspect reads).", show_default=False),
    ] = None,
    to: Annotated[
        Text,
        typer.Option(
            "--to",
            help="torchvision:NAME, timm:NAME, hf:CLASS or hf:FOLDER, package.module:callable "
            "(with ?k=v&...), or a checkpoint as template.",
            show_default=False,
        ),
    ] = None,
    out: OutOpt = None,
    format: PortFormatOpt = None,
    shard_size: ShardSizeOpt = None,
    arg: Annotated[
        Strs, typer.Option("--arg", help="Target keyword argument NAME=VALUE (repeatable).")
    ] = None,
    strict: Annotated[
        Text,
        typer.Option(
            "--strict",
            help="true (default): refuse unless every key matches, as torch (keys new by edits aside); "
            "false: load what matches.",
        ),
    ] = None,
    no_strict: Annotated[bool, typer.Option("--no-strict", help="The same as --strict false.")] = False,
    allow_missing: AllowMissingOpt = None,
    allow_unexpected: AllowUnexpectedOpt = None,
    min_coverage: MinCoverageOpt = None,
    match: Annotated[Text, typer.Option("--match", help="exact (default), suffix, order or auto.")] = None,
    rename: RenameOpt = None,
    strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    reshape: Annotated[
        bool,
        typer.Option("--reshape", help="Load pairs of equal size but different shape (Linear <-> 1x1 conv)."),
    ] = False,
    map: Annotated[
        Strs,
        typer.Option(
            "--map",
            help="RULES.toml: rename keys and transform tensors (cat, split, transpose, permute_rope, ...) "
            "before name matching (repeatable).",
        ),
    ] = None,
    preset: Annotated[
        Strs, typer.Option("--preset", help="A rule file shipped with surgery (surgery presets).")
    ] = None,
    map_arg: Annotated[
        Strs, typer.Option("--map-arg", help='NAME=VALUE for a rule\'s "{NAME}" op parameter (repeatable).')
    ] = None,
    adapt: Annotated[
        bool,
        typer.Option(
            "--adapt",
            help="Load what differs only in position grid, patch kernel, vocabulary or classes by "
            "resampling or resizing it (each reported).",
        ),
    ] = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Build the source architecture too (--from), run both on seeded probe inputs, compare "
            "outputs and name the first module that diverges; exit 1 (nothing written) when they differ.",
        ),
    ] = False,
    check_from: Annotated[
        Text, typer.Option("--from", help="The source's architecture for --check (a --to kind of spec).")
    ] = None,
    probe_shape: Annotated[
        Text, typer.Option("--probe-shape", help="The probe input's shape for --check: 2,3,224,224 or 2,16.")
    ] = None,
    atol: Annotated[
        Float, typer.Option("--atol", help="--check: largest absolute difference allowed [default: 1e-5].")
    ] = None,
    key: KeyOpt = None,
    replace: Annotated[
        Strs,
        typer.Option(
            "--replace",
            help="PATH=SPEC: put a torch.nn module spec at PATH; * is its input width (repeatable).",
        ),
    ] = None,
    add: Annotated[
        Strs,
        typer.Option(
            "--add", help="PATH=SPEC: add a module; an index into a Sequential inserts it there (repeatable)."
        ),
    ] = None,
    delete: Annotated[Strs, typer.Option("--delete", help="PATH: remove a module (repeatable).")] = None,
    rename_module: Annotated[
        Strs, typer.Option("--rename-module", help="PATH=NAME: rename a submodule (repeatable).")
    ] = None,
    extract: Annotated[
        Text, typer.Option("--extract", help="PATH[,PATH...]: keep only these submodules (a backbone).")
    ] = None,
    drop: Annotated[
        Text,
        typer.Option(
            "--drop", help="NAME[,NAME...]: keep every top-level module but these (resnet: avgpool,fc)."
        ),
    ] = None,
    num_classes: Annotated[
        Int, typer.Option("--num-classes", min=1, help="Replace the classifier for N classes.")
    ] = None,
    in_chans: Annotated[
        Int, typer.Option("--in-chans", min=1, help="Adapt the first conv to N input channels.")
    ] = None,
    init: Annotated[
        Text, typer.Option("--init", help="default, kaiming, xavier, normal or zeros: for new modules.")
    ] = None,
    freeze: Annotated[
        Strs,
        typer.Option("--freeze", help="Freeze parameters matching GLOB (repeatable; before --unfreeze)."),
    ] = None,
    unfreeze: Annotated[
        Strs, typer.Option("--unfreeze", help="Unfreeze parameters matching GLOB (repeatable).")
    ] = None,
    freeze_bn: Annotated[
        bool,
        typer.Option(
            "--freeze-bn", help="Keep BatchNorm statistics fixed (eval mode) and its parameters frozen."
        ),
    ] = False,
    lr: Annotated[
        Strs,
        typer.Option(
            "--lr",
            help="[NAME:]GLOB=VALUE: a named optimizer group's learning rate; first match wins (repeatable).",
        ),
    ] = None,
    base_lr: Annotated[
        Float, typer.Option("--base-lr", help="Learning rate of the other trainable parameters.")
    ] = None,
    weight_decay: Annotated[
        Float, typer.Option("--weight-decay", help="Weight decay, none on biases and norm weights.")
    ] = None,
    layer_decay: Annotated[
        Float, typer.Option("--layer-decay", help="Layer-wise learning-rate decay from the head down.")
    ] = None,
    recipe: RecipeOpt = None,
    dry_run: DryRunOpt = False,
    plan_out: Annotated[
        Optional[Path],
        typer.Option("--plan-out", help="Save the final mapping as an editable JSON file."),
    ] = None,
    plan: Annotated[
        Optional[Path],
        typer.Option("--plan", help="Apply a saved (reviewed) mapping instead of matching."),
    ] = None,
    verify: VerifyOpt = False,
    allow_lossy_cast: AllowLossyCastOpt = False,
    force: ForceOpt = False,
    trust: TrustOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Map, filter and match a checkpoint's keys into a (possibly edited) target; report; save.

    Exit code 1 when a strict port finds anything missing, unexpected or mismatched, when
    less than --min-coverage of the target would be loaded, or when a cast loses values (the
    report is printed, nothing is written); 2 on bad usage.
    """
    fields = fields_of(locals())  # first: the flags alone
    from surgery.casts import LossyCast
    from surgery.commands.port import PortFailed, PortRequest, port_file
    from surgery.errors import BadArgument

    if strict is not None:
        if strict.lower() not in STRICTNESS:
            raise BadArgument("strict", f"{strict!r} is not true or false")
        fields["strict"] = STRICTNESS[strict.lower()]
    if no_strict:
        fields["strict"] = False
    request = (
        PortRequest.from_file(recipe, **fields) if recipe is not None else PortRequest.from_fields(fields)
    )
    from surgery.commands.ranks import on_rank_zero, ranks_from_env

    ranks = ranks_from_env()  # under torchrun: an hf folder's shards are shared out, else rank 0 ports
    first = ranks is None or ranks.rank == 0
    try:
        if ranks is not None and request.format == "hf":
            report = port_file(request)
        else:
            report = on_rank_zero(lambda: port_file(request))
    except (PortFailed, LossyCast) as failed:
        if first:
            show(failed.report, json_out)
        raise
    if not first or report is None:  # another rank: rank 0 reports
        return
    show(report, json_out)
    for warning in report.finetune.warnings if report.finetune else ():
        say(f"warning: {warning}")


@command(
    [
        "surgery convert checkpoint.pth.tar -o model.safetensors --strip-prefix module.",
        "surgery convert model.safetensors -o shards/ --shard-size 2GB --dtype bf16",
        "surgery convert dcp_folder/ -o model.pt --verify",
    ]
)
def convert(
    source: Annotated[
        Text,
        typer.Argument(
            help="Checkpoint file, *.index.json, or a folder (sharded or DCP).", show_default=False
        ),
    ] = None,
    out: OutOpt = None,
    format: Annotated[
        Text,
        typer.Option(
            "--format", help="auto (by OUT's name) | safetensors | torch | dcp | hf (a Hugging Face folder)."
        ),
    ] = None,
    shard_size: ShardsOpt = None,
    dtype: Annotated[
        Text,
        typer.Option(
            "--dtype", help="Cast floating tensors: bf16 | fp16 | fp32 (integer buffers untouched)."
        ),
    ] = None,
    key: KeyOpt = None,
    rename: RenameOpt = None,
    strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    max_output_ratio: Annotated[
        Float,
        typer.Option(
            "--max-output-ratio",
            help="Refuse an output more than this many times the input's size (4). A conversion writes"
            " at most what the input stores (2x with a cast to fp32); views that repeat stored bytes"
            " (stride 0) are written in full and can make a small file write terabytes.",
        ),
    ] = None,
    recipe: RecipeOpt = None,
    dry_run: DryRunOpt = False,
    verify: VerifyOpt = False,
    allow_lossy_cast: AllowLossyCastOpt = False,
    force: ForceOpt = False,
    trust: TrustOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Convert between torch, safetensors, sharded and DCP checkpoints, streaming.

    One tensor at a time; bytes that need no change are copied file to file.
    The output appears only when complete (and verified, with --verify), and, with
    --dtype, when no value overflowed to inf, became NaN or was flushed to zero
    (unless --allow-lossy-cast).
    """
    fields = fields_of(locals())  # first: the flags alone
    from surgery.casts import LossyCast
    from surgery.commands.convert import ConvertRequest, convert_file

    request = ConvertRequest.from_file(recipe, **fields) if recipe else ConvertRequest.from_fields(fields)
    try:
        report = convert_file(request, progress=progress())
    except LossyCast as failed:
        show(failed.report, json_out)
        raise
    if report.rank == 0:  # under torchrun, one report: rank 0's, of every rank's work
        show(report, json_out)


@command(
    [
        "surgery merge run/checkpoint*.pt --last 5 -o averaged.safetensors",
        "surgery merge soup1.pt soup2.pt soup3.pt --weights 2,1,1 -o soup.safetensors",
        "surgery merge math.pt code.pt --method ties --base base.safetensors --density 0.2 -o merged.pt",
        "surgery merge base.safetensors --adapter lora-run/ -o merged.safetensors",
    ]
)
def merge(
    inputs: Annotated[
        Optional[list[str]],
        typer.Argument(
            help="Checkpoints of one model, any formats (files, *.index.json, sharded or DCP folders); "
            "with --adapter, the one base.",
            show_default=False,
        ),
    ] = None,
    out: OutOpt = None,
    method: Annotated[
        Text,
        typer.Option(
            "--method",
            help="mean (default; weighted with --weights) | weighted | task-arithmetic | ties | slerp "
            "(lora with --adapter).",
        ),
    ] = None,
    weights: Annotated[
        Text,
        typer.Option(
            "--weights",
            help="weighted: one weight per input, w1,w2,... (normalised); with --adapter: each "
            "adapter's factor (1 each), as given.",
        ),
    ] = None,
    base: Annotated[
        Text,
        typer.Option("--base", help="task-arithmetic, ties: the checkpoint the inputs were fine-tuned from."),
    ] = None,
    scale: Annotated[
        Float, typer.Option("--scale", help="task-arithmetic, ties: λ, the task vectors' scale [default: 1].")
    ] = None,
    density: Annotated[
        Float,
        typer.Option(
            "--density", help="ties: the share of each task vector kept, by magnitude [default: 0.2]."
        ),
    ] = None,
    t: Annotated[
        Float, typer.Option("--t", help="slerp: 0 is the first input, 1 the second [default: 0.5].")
    ] = None,
    dtype: Annotated[
        Text,
        typer.Option(
            "--dtype",
            help="Write floating tensors as bf16 | fp16 | fp32 | fp64 (else each in its own dtype).",
        ),
    ] = None,
    strict: Annotated[
        Text,
        typer.Option(
            "--strict",
            help="true (default): refuse inputs whose keys or shapes differ; false: merge what all "
            "hold alike, the rest from the base or the first input.",
        ),
    ] = None,
    last: Annotated[
        Int,
        typer.Option(
            "--last",
            min=1,
            help="Merge the N newest inputs, by the epoch or step each records (else by name).",
        ),
    ] = None,
    format: Annotated[
        Text, typer.Option("--format", help="auto (by OUT's name) | safetensors | torch | dcp.")
    ] = None,
    shard_size: ShardsOpt = None,
    adapter: Annotated[
        Strs,
        typer.Option(
            "--adapter",
            help="A PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors or .bin), "
            "or hf://USER/ADAPTER, to merge into the one input; repeat for several.",
        ),
    ] = None,
    unmerge: Annotated[
        bool,
        typer.Option(
            "--unmerge", help="With --adapter: subtract the adapters (a merged model back to its base)."
        ),
    ] = False,
    allow_lossy_cast: AllowLossyCastOpt = False,
    key: KeyOpt = None,
    rename: RenameOpt = None,
    strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    recipe: RecipeOpt = None,
    dry_run: DryRunOpt = False,
    verify: VerifyOpt = False,
    force: ForceOpt = False,
    trust: TrustOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Average or merge checkpoints of one model (model soups, task arithmetic, TIES, SLERP), or
    merge PEFT LoRA adapters into a base, streaming.

    One tensor of each input at a time, in float64; each floating tensor is written in its own
    dtype, integer and bool tensors are the last input's (never averaged). Exit code 1 when the
    inputs' keys or shapes differ (unless --strict false), when an adapter tensor lands on
    nothing in the base, or when a cast loses values (overflow to inf, NaN; values flushed to
    zero by --dtype: the report is printed, nothing is written); 2 on bad usage.
    """
    fields = fields_of(locals())  # first: the flags alone
    from surgery.casts import LossyCast
    from surgery.commands.merge import MergeRequest, merge_file
    from surgery.errors import BadArgument

    if strict is not None:
        if strict.lower() not in STRICTNESS:
            raise BadArgument("strict", f"{strict!r} is not true or false")
        fields["strict"] = STRICTNESS[strict.lower()]
    request = MergeRequest.from_file(recipe, **fields) if recipe else MergeRequest.from_fields(fields)
    from surgery.commands.ranks import on_rank_zero

    try:
        report = on_rank_zero(lambda: merge_file(request, progress=progress()))  # torchrun: rank 0's
    except LossyCast as failed:
        show(failed.report, json_out)
        raise
    if report is not None:
        show(report, json_out)


@command(
    [
        "surgery extract tuned.safetensors --base base.safetensors --rank 16 -o lora/",
        "surgery extract gpt2-tuned.pt --base gpt2.pt --rank 8 --fan-in-fan-out -o lora/ --dry-run",
    ]
)
def extract(
    finetuned: Annotated[
        Text, typer.Argument(help="The fine-tuned checkpoint (any format).", show_default=False)
    ] = None,
    base: Annotated[Text, typer.Option("--base", help="The checkpoint it was fine-tuned from.")] = None,
    rank: Annotated[Int, typer.Option("--rank", min=1, help="The LoRA rank r of every layer.")] = None,
    out: OutOpt = None,
    fan_in_fan_out: Annotated[
        bool,
        typer.Option("--fan-in-fan-out", help="2-D weights are stored (in, out), as GPT-2's Conv1D."),
    ] = False,
    dtype: Annotated[
        Text, typer.Option("--dtype", help="The factors' dtype: bf16 | fp16 | fp32 (else each weight's own).")
    ] = None,
    key: KeyOpt = None,
    strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None,
    rename: RenameOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    recipe: RecipeOpt = None,
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    trust: TrustOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Write what a fine-tune changed as a PEFT LoRA adapter folder (truncated SVD per layer).

    Linear and conv weights become rank-r factors; what PEFT cannot hold as factors (norms,
    embeddings, other changed tensors) is kept whole as modules_to_save. PEFT loads the folder,
    and `surgery merge BASE --adapter DIR` merges it back. Exit code 1 when the checkpoints
    differ in keys or shapes, or nothing changed; 2 on bad usage.
    """
    fields = fields_of(locals())  # first: the flags alone
    from surgery.commands.extract import ExtractRequest, extract_file
    from surgery.commands.ranks import on_rank_zero

    request = ExtractRequest.from_file(recipe, **fields) if recipe else ExtractRequest.from_fields(fields)
    report = on_rank_zero(lambda: extract_file(request, progress=progress()))  # torchrun: rank 0's
    if report is not None:
        show(report, json_out)


@command(
    [
        "surgery diff before.pth after.safetensors",
        "surgery diff a.pth b.pth --strip-prefix module. --exit-code",
        "surgery diff big-a/ big-b/ --structure-only --json",
    ]
)
def diff(
    a: Annotated[Text, typer.Argument(help="First checkpoint (any format).", show_default=False)] = None,
    b: Annotated[Text, typer.Argument(help="Second checkpoint (any format).", show_default=False)] = None,
    structure_only: Annotated[
        bool, typer.Option("--structure-only", help="Compare names, shapes and dtypes only; read no data.")
    ] = False,
    key: KeyOpt = None,
    strip_prefix: StripPrefixOpt = None,
    add_prefix: AddPrefixOpt = None,
    rename: RenameOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    recipe: RecipeOpt = None,
    exit_code: Annotated[
        bool,
        typer.Option("--exit-code", help="Exit 1 when the checkpoints differ (like git diff --exit-code)."),
    ] = False,
    trust: TrustOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> int:
    """Keys only in A or B, shape and dtype differences, and how far the values are apart.

    Tensors are compared one at a time, as raw bytes where possible.
    """
    fields = fields_of(locals())  # first: the flags alone
    from surgery.commands.diff import DiffRequest, diff_files

    request = DiffRequest.from_file(recipe, **fields) if recipe else DiffRequest.from_fields(fields)
    report = diff_files(request)
    show(report, json_out)
    return 1 if exit_code and not report.same else 0


@command(
    [
        "surgery scan downloads/",
        "surgery scan ~/.cache/huggingface/hub --json",
        "surgery scan models/ --sarif scan.sarif",
    ]
)
def scan(
    paths: Annotated[
        list[str],  # a Path would fold a URL's `//`
        typer.Argument(
            help="Checkpoint files, folders (walked), *.index.json, DCP folders, the Hub cache; "
            "http(s) URLs and hf:// addresses (their headers, by range requests).",
            show_default=False,
        ),
    ],
    sarif: Annotated[
        Optional[Path],
        typer.Option("--sarif", help="Also write the findings as SARIF 2.1.0 (GitHub code scanning) here."),
    ] = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> int:
    """The safety verdict of every checkpoint under PATHS: one line each, then a summary.

    Nothing is run or imported from the files, and torch is not loaded. Exit code 1
    when any checkpoint is dangerous, unsafe, corrupt or unreadable; 0 when all are safe.
    """
    from surgery.commands.scan import scan as run
    from surgery.commands.scan import write_sarif

    report = run(paths)
    if sarif is not None:
        write_sarif(report, sarif)
    show(report, json_out)
    return 1 if report.failed else 0


@command(
    [
        "surgery sanitize old_training_run.pth -o clean.pt",
        "surgery sanitize checkpoint.pth.tar -o clean.pt --dry-run --json",
    ]
)
def sanitize(
    source: Annotated[
        Path, typer.Argument(help="A torch file (zip, legacy, tar) or a plain pickle.", show_default=False)
    ],
    out: OutOpt = None,
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Rewrite a checkpoint as tensors and plain data only, so weights_only loading accepts it.

    Tensors are copied bit for bit; other objects become plain values or are dropped, each
    reported. Nothing in the file is run.
    """
    from surgery.commands.sanitize import sanitize as run
    from surgery.errors import BadArgument

    if out is None:
        raise BadArgument("out", "say where to write the result (-o OUT)")
    show(run(source, out, force=force, dry_run=dry_run), json_out)


@command(["surgery presets", "surgery presets --json"])
def presets(json_out: JsonOpt = False, debug: DebugOpt = False) -> None:
    """The rule files shipped with surgery, for `surgery port --preset NAME`: one line each,
    with the library versions each was verified against."""
    from surgery.commands.maps import list_presets

    show(list_presets(), json_out)
