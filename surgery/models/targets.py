"""Turning a target spec into the keys and shapes a checkpoint must fill.

    torchvision:resnet18?num_classes=2     torchvision's builder, weights=None
    timm:convnext_tiny?num_classes=10      timm.create_model, pretrained=False
    hf:BertModel?config=folder             a transformers model class from a config (no weights)
    hf:path/to/folder                      the class and config a Hugging Face folder's config.json names
    mypkg.models:build_net?width=64        a factory or class of your own
    template.safetensors                   a checkpoint whose keys and shapes are the target

Keyword arguments come after `?` (joined by `&`) or as repeated `--arg k=v`; values
are Python literals (`2`, `0.1`, `True`, `(3, 3)`) or else strings. Nothing is
downloaded: pretrained weights are always off.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgery.errors import SurgeryError, UsageError
from surgery.trust import LOADING_KWARGS
from surgery.values import Entry, ties

if TYPE_CHECKING:
    import torch
    from torch import nn

    from surgery.formats.checkpoint import Checkpoint


@dataclass
class Target:
    """What a port fills: the keys, shapes and dtypes, in order, and where they come from."""

    spec: str
    entries: list[Entry]
    module: nn.Module | None = None  # built for torchvision, timm and factory targets
    template: Checkpoint | None = None  # for a checkpoint used as the target
    kwargs: dict[str, Any] = field(default_factory=dict)

    def aliases(self) -> dict[str, str]:
        """Target keys that are the very same tensor as an earlier key (tied weights):
        alias -> the first key (`values.ties`, the rule every side uses)."""
        if self.module is None:
            return {}
        return ties(
            (name, (_storage_of(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype))
            for name, t in self.module.state_dict(keep_vars=True).items()
            if t.numel()
        )

    @property
    def meta(self) -> bool:
        """Built on the meta device: shapes and dtypes, no values (`build_target(meta=True)`)."""
        return self.module is not None and any(t.is_meta for t in self.module.state_dict().values())


def _storage_of(t: torch.Tensor) -> int:
    """What identifies a tensor's storage: its address, or on the meta device (where every
    address is 0) the tensor object itself, which tied parameters share; a tensor sharded across
    ranks (a DTensor) by the object too, its own block being all this rank holds."""
    return id(t) if t.is_meta or hasattr(t, "device_mesh") else t.untyped_storage().data_ptr()


def parse_value(text: str) -> Any:
    """`2` -> 2, `True` -> True, `(3, 3)` -> (3, 3); anything else stays a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def parse_kwargs(pairs: Sequence[str], where: str) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.isidentifier():
            raise UsageError(where, f"argument {pair!r} is not NAME=VALUE")
        out[name] = parse_value(value)
    return out


def build_target(spec: str, args: Sequence[str] = (), *, trust: bool = False, meta: bool = False) -> Target:
    """Build the target a spec names, with `args` (`k=v`) added to its keyword arguments.

    `trust` lets an `hf:` config whose `auto_map` names a repository's code be built
    (with transformers' own class: that code is never imported).

    Raises:
        UsageError: the spec names nothing that can be built (unknown model, missing module).
        SurgeryError: the builder itself failed.
    """
    base, _, query = spec.partition("?")
    kwargs = parse_kwargs([q for q in query.split("&") if q], spec)
    kwargs.update(parse_kwargs(args, spec))
    if args:  # one spelling in reports and provenance, however the arguments were given
        spec = (
            base
            + "?"
            + "&".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in kwargs.items())
        )
    kind, sep, name = base.partition(":")
    if sep and kind in LIBRARY_BUILDERS:
        build = LIBRARY_BUILDERS[kind]
        return target_of_module(
            _on_device(meta, lambda: build(spec, name, kwargs, trust=trust)), spec, kwargs
        )
    if Path(base).exists():
        if kwargs:
            raise UsageError(spec, "a checkpoint used as the target takes no arguments")
        return _from_template(spec, Path(base))
    if sep and kind and name:
        return target_of_module(_on_device(meta, lambda: _factory(spec, kind, name, kwargs)), spec, kwargs)
    raise UsageError(
        spec,
        "unknown target",
        hint="use torchvision:NAME, timm:NAME, hf:CLASS or hf:FOLDER, package.module:callable, "
        "or a checkpoint file as a template",
    )


def _on_device(meta: bool, build: Callable[[], nn.Module]) -> nn.Module:
    """The module `build` makes; with `meta`, its tensors only described (shape, dtype, no
    memory), when its builder allows: a port that fills every tensor from the source never
    needs the target's own values, so a 7B target costs nothing to plan and write."""
    if not meta:
        return build()
    import torch

    try:
        with torch.device("meta"):
            return build()
    except UsageError:
        raise  # the spec itself is wrong, on any device (and its checks consumed the arguments)
    except SurgeryError:
        return build()  # a builder that does arithmetic on its values: built for real


def target_of_module(
    module: nn.Module, spec: str | None = None, kwargs: dict[str, Any] | None = None
) -> Target:
    """A live module as the target: its state_dict's keys, shapes and dtypes.

    Raises:
        SurgeryError: the module has lazy parameters not initialised yet (no shape to match).
    """
    refuse_lazy(module, spec or type(module).__name__)
    entries = [
        Entry(name, tuple(t.shape), str(t.dtype).removeprefix("torch."))
        for name, t in module.state_dict(keep_vars=True).items()
    ]
    return Target(spec or type(module).__name__, entries, module=module, kwargs=kwargs or {})


def refuse_lazy(module: nn.Module, where: object) -> None:
    """Refuse a module whose lazy layers (`nn.LazyLinear`, ...) have not run yet: their tensors
    have no shape, so nothing can be matched, loaded, frozen or grouped for them, and torch
    would fail deep inside with a RuntimeError that names no parameter.

    Raises:
        SurgeryError: naming the uninitialised tensors, their modules and the fix.
    """
    from torch.nn.parameter import is_lazy

    lazy = [name for name, t in module.state_dict(keep_vars=True).items() if is_lazy(t)]
    if not lazy:
        return
    kinds = sorted({type(module.get_submodule(n.rpartition(".")[0])).__name__ for n in lazy})
    shown = ", ".join(lazy[:4]) + (f" and {len(lazy) - 4} more" if len(lazy) > 4 else "")
    raise SurgeryError(
        where,
        f"{shown} {'is' if len(lazy) == 1 else 'are'} not initialised yet ({', '.join(kinds)}): "
        "run one forward pass first to initialise the lazy modules",
        hint="e.g. model(torch.zeros(1, 3, 224, 224)), with your input's shape; a factory can do it",
    )


def _from_template(spec: str, path: Path) -> Target:
    from surgery.formats.checkpoint import open_checkpoint

    template = open_checkpoint(path)
    entries = [Entry(t.name, t.shape, t.dtype) for t in template.tensors]
    if not entries:
        raise UsageError(spec, "the template checkpoint holds no tensors")
    return Target(spec, entries, template=template)


def _call(spec: str, builder: Any, kwargs: dict[str, Any]) -> nn.Module:
    from torch import nn

    try:
        module = builder(**kwargs)
    except Exception as exc:  # the user's factory: any failure is theirs to see, in one line
        raise SurgeryError(spec, f"building the target failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(module, nn.Module):
        raise SurgeryError(spec, f"the target builder returned {type(module).__name__!r}, not an nn.Module")
    return module


def _torchvision(spec: str, name: str, kwargs: dict[str, Any], *, trust: bool = False) -> nn.Module:
    import torchvision

    _refuse_loading(spec, "torchvision", kwargs)
    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError:
        near = difflib.get_close_matches(name, torchvision.models.list_models(), n=4)
        hint = f"did you mean {', '.join(near)}?" if near else "see torchvision.models.list_models()"
        raise UsageError(spec, f"torchvision has no model {name!r}", hint=hint) from None
    # Detection and segmentation builders default to ImageNet backbone weights: off too.
    off = {p: None for p in ("weights", "weights_backbone") if p in inspect.signature(builder).parameters}
    return _call(spec, lambda **kw: builder(**off, **kw), kwargs)


def _timm(spec: str, name: str, kwargs: dict[str, Any], *, trust: bool = False) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise UsageError(spec, "timm is not installed", hint='pip install -e ".[timm]"') from None
    _refuse_loading(spec, "timm", kwargs)
    if not timm.is_model(name):
        near = difflib.get_close_matches(name, timm.list_models(), n=4)
        hint = f"did you mean {', '.join(near)}?" if near else "see timm.list_models()"
        raise UsageError(spec, f"timm has no model {name!r}", hint=hint)
    return _call(spec, lambda **kw: timm.create_model(name, pretrained=False, **kw), kwargs)


def _hf(spec: str, name: str, kwargs: dict[str, Any], *, trust: bool = False) -> nn.Module:
    """A transformers model class built from a config (`surgery.models.hf`): no weights, no remote code."""
    from surgery.models.hf import build_hf

    _refuse_loading(spec, "hf", kwargs)
    return build_hf(spec, name, kwargs, trust=trust)


def _refuse_loading(spec: str, library: str, kwargs: dict[str, Any]) -> None:
    """Drop the builder's weight-loading keywords left unset; refuse any set: a builder
    that downloads or `torch.load`s a file is not surgery's to run (it ports weights itself)."""
    for name in LOADING_KWARGS[library]:
        if kwargs.pop(name, None) not in (None, False):
            raise UsageError(
                spec,
                f"pretrained weights cannot be downloaded here, nor loaded by {library}: leave `{name}` unset",
                hint="port the weights with `surgery port CHECKPOINT --to ...` instead",
            )


def _factory(spec: str, module_name: str, attr: str, kwargs: dict[str, Any]) -> nn.Module:
    """`package.module:callable`, importable from the current folder or PYTHONPATH."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(spec, f"cannot import {module_name!r}: {exc}") from None
    except Exception as exc:
        raise SurgeryError(spec, f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    builder = module
    for part in attr.split("."):
        builder = getattr(builder, part, None)
        if builder is None:
            raise UsageError(spec, f"{module_name!r} has no {attr!r}")
    if not callable(builder):
        raise UsageError(spec, f"{module_name}:{attr} is not callable")
    return _call(spec, builder, kwargs)


# The libraries whose builders a target may name (`torchvision:resnet18`): the same
# names trust.LIBRARY_TARGETS lets a file name without trust. Each takes (spec, name,
# kwargs, trust=): only `hf:` reads a file (config.json) whose contents trust may widen.
LIBRARY_BUILDERS = {"torchvision": _torchvision, "timm": _timm, "hf": _hf}
