"""Module surgery on an `nn.Module` by dotted path, and module specs parsed, never evaluated.

    replace(model, "fc", parse_spec("Linear(*, 100)"))     # model.fc = nn.Linear(512, 100)
    add(model, "classifier.7", nn.Softmax(dim=1))          # appended to a Sequential
    delete(model, "classifier.5")                          # removed; the Sequential still runs
    backbone = extract(model, ["features"])                # VGG features, or a list as a Sequential
    reset_head(model, 2); adapt_input(model, 1)            # new classes; 1-channel input

A spec is a `torch.nn` class called with literal arguments, nested specs allowed
(`Sequential(Dropout(0.2), Linear(*, 10))`); `*` stands for the input width of the
module being replaced. Specs are parsed with `ast` and checked node by node: no
name outside `torch.nn`, no attribute access, no expressions, nothing evaluated.
"""

from __future__ import annotations

import ast
import difflib
import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from surgery.errors import BadArgument, SurgeryError

if TYPE_CHECKING:
    from torch import nn

SPEC_FORM = (
    "a torch.nn class with literal arguments, e.g. Linear(*, 10) or Sequential(Dropout(0.2), Linear(*, 10))"
)
HEAD_NAMES = ("fc", "classifier", "head", "heads")
INIT_SCHEMES = ("default", "kaiming", "xavier", "normal", "zeros")
_STAR = "__surgery_input_width__"
OP_ALIASES = {
    "drop": "without",
    "rename-module": "rename",
    "rename_module": "rename",
    "num-classes": "num_classes",
    "in-chans": "in_chans",
}


class EditError(SurgeryError):
    """An edit names a module that is not there, or a spec that cannot be built."""

    exit_code = 2


# -- paths --------------------------------------------------------------------
def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path (`layer4.1.conv2`, `classifier.6`); "" is the model.

    Raises:
        EditError: naming the nearest paths that exist.
    """
    module = model
    for part in path.split(".") if path else []:
        child = module._modules.get(part)
        if child is None:
            raise EditError(path, "no such module", hint=_nearby(model, path))
        module = child
    return module


def _nearby(model: nn.Module, path: str) -> str:
    names = [name for name, _ in model.named_modules() if name]
    close = difflib.get_close_matches(path, names, n=4, cutoff=0.5)
    parent = path.rpartition(".")[0]
    siblings = [n for n in names if n.rpartition(".")[0] == parent][:8]
    shown = close or siblings
    return f"modules nearby: {', '.join(shown)}" if shown else "see the module names with `surgery inspect`"


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    if not path:
        raise EditError("(model)", "the model itself cannot be edited in place; name a submodule")
    parent_path, _, name = path.rpartition(".")
    return get_module(model, parent_path), name


# -- edits --------------------------------------------------------------------
def replace(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put `new` at `path` (what `model.fc = ...` or `_modules[name] = ...` does). Returns the old one."""
    parent, name = _parent(model, path)
    old = get_module(model, path)
    parent._modules[name] = new
    return old


def add(model: nn.Module, path: str, new: nn.Module) -> None:
    """Add `new` as `path` (`add_module`). Into an nn.Sequential, an index inserts it
    there and renumbers what follows, so the Sequential runs it in that place."""
    import torch.nn as tnn

    parent, name = _parent(model, path)
    if isinstance(parent, (tnn.Sequential, tnn.ModuleList)) and name.isdigit():
        items = list(parent._modules.values())
        items.insert(min(int(name), len(items)), new)
        parent._modules = OrderedDict((str(i), m) for i, m in enumerate(items))
        return
    if name in parent._modules:
        raise EditError(path, "a module of that name exists already", hint="use replace, or another name")
    if not name.isidentifier():
        raise EditError(path, f"{name!r} is not a valid module name")
    parent.add_module(name, new)


def delete(model: nn.Module, path: str) -> str:
    """Remove the module at `path` (`del`, removal from `_modules`).

    A container parent (Sequential, ModuleList, ModuleDict) simply loses it and keeps
    running. Any other parent calls it in its forward, so it becomes an `nn.Identity`
    there, which keeps the model runnable. Returns what was done.
    """
    import torch.nn as tnn

    parent, name = _parent(model, path)
    get_module(model, path)
    if isinstance(parent, tnn.ModuleList):  # indexed by position: keys must stay 0..n-1
        del parent._modules[name]
        parent._modules = OrderedDict((str(i), m) for i, m in enumerate(parent._modules.values()))
        return "removed (the list renumbered)"
    if isinstance(parent, (tnn.Sequential, tnn.ModuleDict)):
        del parent._modules[name]  # a Sequential runs its modules in order: the others keep their names
        return "removed"
    parent._modules[name] = tnn.Identity()
    return "replaced by Identity (its parent's forward calls it)"


def rename_module(model: nn.Module, path: str, new_name: str) -> bool:
    """Give the module at `path` another name under the same parent, keeping its place.

    Returns whether the parent is a container (else its forward may still call the old name).
    """
    import torch.nn as tnn

    parent, name = _parent(model, path)
    get_module(model, path)
    if not new_name.isidentifier() and not new_name.isdigit():
        raise EditError(new_name, "not a valid module name")
    if new_name in parent._modules:
        raise EditError(new_name, "a module of that name exists already")
    parent._modules = OrderedDict((new_name if k == name else k, v) for k, v in parent._modules.items())
    return isinstance(parent, (tnn.Sequential, tnn.ModuleList, tnn.ModuleDict))


def extract(model: nn.Module, paths: Sequence[str]) -> nn.Module:
    """Keep only the named submodules: one path gives that module (a backbone such as
    VGG `features`), several give an nn.Sequential of them in the order given."""
    import torch.nn as tnn

    modules = [get_module(model, p) for p in paths]
    if len(modules) == 1:
        return modules[0]
    return tnn.Sequential(OrderedDict((p.replace(".", "_"), m) for p, m in zip(paths, modules, strict=True)))


def without(model: nn.Module, drop: Sequence[str]) -> nn.Module:
    """The model's top-level children except `drop`, as an nn.Sequential (resnet without
    `avgpool` and `fc` is its convolutional backbone)."""
    import torch.nn as tnn

    for name in drop:
        get_module(model, name)
    kept = [(name, m) for name, m in model.named_children() if name not in drop]
    return tnn.Sequential(OrderedDict(kept))


# -- heads and inputs ---------------------------------------------------------
def find_head(model: nn.Module) -> str:
    """The classifier: `fc`, `classifier`, `head` or `heads` (the last Linear inside
    it, when it is a container), failing those the model's last Linear."""
    import torch.nn as tnn

    for name in HEAD_NAMES:
        module = model._modules.get(name)
        if isinstance(module, tnn.Linear):
            return name
        if module is not None:
            inner = [n for n, m in module.named_modules() if isinstance(m, tnn.Linear)]
            if inner:
                return f"{name}.{inner[-1]}"
    linears = [n for n, m in model.named_modules() if isinstance(m, tnn.Linear)]
    if not linears:
        raise EditError(type(model).__name__, "no classifier found: no fc, classifier, head, heads or Linear")
    return linears[-1]


def reset_head(model: nn.Module, num_classes: int) -> tuple[str, nn.Module]:
    """Replace the classifier by a fresh Linear for `num_classes`, keeping its input width."""
    import torch.nn as tnn

    path = find_head(model)
    old = get_module(model, path)
    new = tnn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    replace(model, path, new)
    return path, new


def first_conv(model: nn.Module) -> str:
    import torch.nn as tnn

    for name, module in model.named_modules():
        if isinstance(module, (tnn.Conv1d, tnn.Conv2d, tnn.Conv3d)):
            return name
    raise EditError(type(model).__name__, "no convolution to adapt to other input channels")


def adapt_conv_weight(weight: Any, in_chans: int) -> Any:
    """A conv weight for `in_chans` input channels, so activations keep their scale:
    3 -> 1 sums the channels; C -> N repeats them and rescales by C/N.

    Pure: tensor in, tensor out, in the weight's own dtype.
    """
    import torch

    if weight.ndim < 3:
        raise ValueError(f"a conv weight has 3 or more dims, got {weight.ndim}")
    dtype = weight.dtype
    w = weight.double() if dtype == torch.float64 else weight.float()
    have = w.shape[1]
    if in_chans == have:
        out = w.clone()
    elif in_chans == 1:
        out = w.sum(dim=1, keepdim=True)
    else:
        repeats = math.ceil(in_chans / have)
        out = w.repeat(1, repeats, *([1] * (w.ndim - 2)))[:, :in_chans] * (have / in_chans)
    return out.to(dtype)


def adapt_input(model: nn.Module, in_chans: int, *, adapt_weights: bool = True) -> str:
    """Rewrite the first conv for `in_chans` input channels; with `adapt_weights` its
    weight is derived from the current one (sum or repeat-and-rescale), else kept fresh."""
    import torch

    if in_chans < 1:
        raise BadArgument("in_chans", "must be 1 or more")
    path = first_conv(model)
    conv = get_module(model, path)
    if conv.groups != 1:
        raise EditError(path, "the first convolution is grouped: cannot change its input channels")
    with torch.no_grad():
        weight = adapt_conv_weight(conv.weight, in_chans) if adapt_weights else None
        new = type(conv)(
            in_chans,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
        )
        if weight is not None:
            new.weight.copy_(weight)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    replace(model, path, new)
    return path


# -- initialisation -----------------------------------------------------------
def initialise(module: nn.Module, scheme: str) -> None:
    """Initialise every conv, linear and norm layer in `module` (a new or replaced one).

    default: the layer's own reset_parameters(); kaiming: He normal (fan_out, relu) for
    conv and linear; xavier: Glorot uniform; normal: the classic rule, conv
    N(0, sqrt(2/n)) with n = k*k*out_channels, linear N(0, 0.01); zeros: conv and
    linear weights zero. Biases start at 0 and norm layers at weight 1, bias 0
    (except `default`, which leaves each layer to its own rule).
    """
    import torch
    import torch.nn as tnn

    if scheme not in INIT_SCHEMES:
        raise BadArgument("init", f"{scheme!r} is not one of {', '.join(INIT_SCHEMES)}")
    convs = (tnn.Conv1d, tnn.Conv2d, tnn.Conv3d, tnn.ConvTranspose2d)
    norms = (tnn.BatchNorm1d, tnn.BatchNorm2d, tnn.BatchNorm3d, tnn.GroupNorm, tnn.LayerNorm)
    with torch.no_grad():
        for m in module.modules():
            if scheme == "default":
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
                continue
            if isinstance(m, convs + (tnn.Linear,)):
                if scheme == "zeros":
                    m.weight.zero_()
                elif scheme == "kaiming":
                    tnn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif scheme == "xavier":
                    tnn.init.xavier_uniform_(m.weight)
                elif isinstance(m, convs):  # normal, the classic conv rule
                    n = math.prod(m.kernel_size) * m.out_channels
                    m.weight.normal_(0, math.sqrt(2.0 / n))
                else:
                    m.weight.normal_(0, 0.01)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, norms) and getattr(m, "weight", None) is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()


# -- specs ----------------------------------------------------------------------
def parse_spec(text: str, in_width: int | None = None) -> nn.Module:
    """Build a module from a spec such as `Sequential(Dropout(0.2), Linear(*, 10))`.

    Args:
        in_width: what `*` stands for (the replaced module's input width).

    Raises:
        EditError: the spec is not of the allowed form (`SPEC_FORM`), names something
            outside torch.nn, uses `*` with no width known, or the class refuses its arguments.
    """
    marked = re.sub(r"(?<=[(,])\s*\*\s*(?=[,)])", _STAR, text)
    try:
        tree = ast.parse(marked.strip(), mode="eval")
    except SyntaxError:
        raise EditError(text, f"not a module spec: write {SPEC_FORM}") from None
    return _build(tree.body, text, in_width)


def _build(node: ast.AST, text: str, in_width: int | None) -> nn.Module:
    import torch.nn as tnn

    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise EditError(text, f"not a module spec: write {SPEC_FORM}")
    name = node.func.id
    cls = getattr(tnn, name, None)
    if not (isinstance(cls, type) and issubclass(cls, tnn.Module)):
        raise EditError(text, f"{name!r} is not a torch.nn module class: write {SPEC_FORM}")
    args = [_value(a, text, in_width) for a in node.args]
    kwargs = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise EditError(text, f"no ** in a spec: write {SPEC_FORM}")
        kwargs[kw.arg] = _value(kw.value, text, in_width)
    try:
        return cls(*args, **kwargs)
    except Exception as exc:  # the class's own complaint about its arguments, in one line
        raise EditError(text, f"{name}{tuple(args)} cannot be built: {type(exc).__name__}: {exc}") from None


def _value(node: ast.AST, text: str, in_width: int | None) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
        return node.value
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant)
    ):
        value = node.operand.value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value
    if isinstance(node, (ast.Tuple, ast.List)):
        values = [_value(e, text, in_width) for e in node.elts]
        return tuple(values) if isinstance(node, ast.Tuple) else values
    if isinstance(node, ast.Name) and node.id == _STAR:
        if in_width is None:
            raise EditError(text, "`*` needs the input width of the replaced module, and none is known here")
        return in_width
    if isinstance(node, ast.Call):
        return _build(node, text, in_width)
    raise EditError(text, f"only literals and nested specs as arguments: write {SPEC_FORM}")


def input_width(module: nn.Module) -> int | None:
    """What `*` means when replacing `module`: its in_features / in_channels, or those of
    its first layer that has one."""
    for m in module.modules():
        for attr in ("in_features", "in_channels", "num_features", "embed_dim", "normalized_shape"):
            value = getattr(m, attr, None)
            if isinstance(value, int):
                return value
            if isinstance(value, tuple) and len(value) == 1:
                return value[0]
    return None


@dataclass(frozen=True)
class Edit:
    """One edit of a recipe, replayable: op is replace, add, delete, rename, extract,
    without, num_classes or in_chans."""

    op: str
    path: str = ""
    spec: str = (
        ""  # replace/add: the module spec; rename: the new name; extract/without: paths, comma-separated
    )
    value: int = 0  # num_classes, in_chans

    def to_json(self) -> dict[str, Any]:
        return {
            k: v
            for k, v in {"op": self.op, "path": self.path, "spec": self.spec, "value": self.value}.items()
            if v
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Edit:
        """From a recipe table; the flag names work as ops too (`drop`, `rename-module`, `num-classes`)."""
        op = OP_ALIASES.get(doc["op"], doc["op"])
        if op not in EDITS:
            raise EditError(str(doc["op"]), f"unknown edit: use one of {', '.join(EDITS)}")
        path, spec = doc.get("path", ""), doc.get("spec", "")
        if op in ("extract", "without") and not spec:
            spec, path = path, ""
        return cls(op, path, spec, int(doc.get("value", 0)))

    def __str__(self) -> str:
        if self.op in ("replace", "add"):
            return f"{self.op} {self.path} = {self.spec}"
        if self.op == "rename":
            return f"rename {self.path} -> {self.spec}"
        if self.op in ("num_classes", "in_chans"):
            return f"{self.op} = {self.value}"
        if self.op in ("extract", "without"):
            return f"{self.op} {self.spec}"
        return f"{self.op} {self.path}"


def apply(model: nn.Module, edit: Edit, *, adapt_weights: bool = True) -> tuple[nn.Module, list[str], str]:
    """Apply one edit. Returns (the model, which may be a new one after extract/without,
    the paths of new or replaced modules, what was done)."""
    run = EDITS.get(edit.op)
    if run is None:
        raise EditError(edit.op, f"unknown edit: use one of {', '.join(EDITS)}")
    return run(model, edit, adapt_weights)


Applied = tuple["nn.Module", list[str], str]


def _replace(model: nn.Module, edit: Edit, _: bool) -> Applied:
    old = get_module(model, edit.path)
    replace(model, edit.path, parse_spec(edit.spec, input_width(old)))
    return model, [edit.path], f"replaced {edit.path} ({type(old).__name__}) by {edit.spec}"


def _add(model: nn.Module, edit: Edit, _: bool) -> Applied:
    parent_path, _, name = edit.path.rpartition(".")
    siblings = list(get_module(model, parent_path).children())
    before = siblings[: int(name)] if name.isdigit() else siblings
    width = next((w for m in reversed(before) if (w := _output_width(m)) is not None), None)
    add(model, edit.path, parse_spec(edit.spec, width))
    return model, [edit.path], f"added {edit.path} = {edit.spec}"


def _delete(model: nn.Module, edit: Edit, _: bool) -> Applied:
    return model, [], f"deleted {edit.path}: {delete(model, edit.path)}"


def _rename(model: nn.Module, edit: Edit, _: bool) -> Applied:
    safe = rename_module(model, edit.path, edit.spec)
    note = "" if safe else " (its parent's forward may still call the old name)"
    return model, [], f"renamed {edit.path} to {edit.spec}{note}"


def _paths(spec: str) -> list[str]:
    return [p.strip() for p in spec.split(",") if p.strip()]


def _extract(model: nn.Module, edit: Edit, _: bool) -> Applied:
    return extract(model, _paths(edit.spec)), [], f"extracted {', '.join(_paths(edit.spec))}"


def _without(model: nn.Module, edit: Edit, _: bool) -> Applied:
    drop = _paths(edit.spec)
    return without(model, drop), [], f"kept the top-level modules except {', '.join(drop)}"


def _num_classes(model: nn.Module, edit: Edit, _: bool) -> Applied:
    path, _ = reset_head(model, edit.value)
    return model, [path], f"new head {path} for {edit.value} classes"


def _in_chans(model: nn.Module, edit: Edit, adapt_weights: bool) -> Applied:
    path = adapt_input(model, edit.value, adapt_weights=adapt_weights)
    channels = f"{edit.value} input channel{'s' if edit.value != 1 else ''}"
    return model, [], f"first conv {path} adapted to {channels}"


# Every edit a recipe or the flags can name, and what runs it.
EDITS = {
    "replace": _replace,
    "add": _add,
    "delete": _delete,
    "rename": _rename,
    "extract": _extract,
    "without": _without,
    "num_classes": _num_classes,
    "in_chans": _in_chans,
}


def _output_width(module: nn.Module) -> int | None:
    for m in reversed(list(module.modules())):
        for attr in ("out_features", "out_channels", "num_features"):
            value = getattr(m, attr, None)
            if isinstance(value, int):
                return value
    return None
