"""`hf:` targets: a transformers model built from a config, with no weights and no remote code.

    hf:path/to/folder                                    the folder's config.json, its architectures[0]
    hf:BertForSequenceClassification?num_labels=3&config=path   a class and config keywords

The class must be one of the `transformers` package's own model classes (a
`PreTrainedModel` subclass it exports), looked up by name: never `AutoModel`, never
`from_pretrained`, never `trust_remote_code`. config.json is read as JSON and handed to
the class's own config class. A config whose `auto_map` names a repository's code is
refused unless the caller passes `trust`; even then that code is not imported: the
transformers class is built and `auto_map` dropped. `import transformers` (seconds) happens
only here, when an `hf:` target is built. `output_config` says what config.json an
`--format hf` output folder gets.
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgery.errors import SurgeryError, UsageError
from surgery.formats.hf import CONFIG, architectures, read_config, remote_code
from surgery.trust import Untrusted

if TYPE_CHECKING:
    from torch import nn

    from surgery.models.targets import Target

# Attention and experts implementations that run transformers' own code: other values
# name kernels that transformers fetches from the Hub and runs (`kernels-community/...`).
LOCAL_IMPLEMENTATIONS = {
    "attn_implementation": (None, "eager", "sdpa"),
    "experts_implementation": (None, "eager", "grouped_mm", "batched_mm"),
}


def build_hf(spec: str, name: str, kwargs: dict[str, Any], *, trust: bool = False) -> nn.Module:
    """The model an `hf:` spec names, randomly initialised, on the CPU.

    Args:
        name: a folder (or config.json) whose `architectures[0]` is the class, or a class name.
        kwargs: config keywords (`num_labels=3`); `config=PATH` gives a class name its config.json.
        trust: build a config whose `auto_map` names remote code (the code is still not imported).

    Raises:
        UsageError: not a transformers model class, a config of another model type, a kernel
            to download, a missing or unreadable config.
        Untrusted: the config names remote code and `trust` is not set.
        SurgeryError: the class failed to build from the config.
    """
    if not name:
        raise UsageError(
            spec, "name a transformers model class (hf:BertModel) or a folder (hf:path/to/model)"
        )
    kwargs = dict(kwargs)
    config_path = kwargs.pop("config", None)
    _refuse_kernels(spec, kwargs)
    by_name = name.isidentifier() and not Path(name).exists()
    if by_name and config_path is None:
        cls = model_class(spec, name)
        return _instantiate(spec, cls, lambda: cls.config_class(**kwargs))
    if not by_name and config_path is not None:
        raise UsageError(spec, "hf:FOLDER takes its config from the folder: drop config=")
    if by_name and not isinstance(config_path, str):
        raise UsageError(spec, f"config={config_path!r} is not a path to a config.json or its folder")
    where = Path(config_path if by_name else name)
    raw = read_config(where)
    where = where / CONFIG if where.is_dir() else where
    names = [name] if by_name else architectures(raw)
    if not names:
        raise UsageError(where, "names no architectures: say the class", hint=f"hf:BertModel?config={where}")
    _refuse_remote_code(where, raw, names[0], trust=trust)
    cls = model_class(spec, names[0], where=spec if by_name else where, code=bool(remote_code(raw)))
    _check_config(where, raw, cls)
    return _instantiate(spec, cls, lambda: cls.config_class.from_dict(raw, **kwargs))


def model_class(spec: str, name: str, *, where: object = None, code: bool = False) -> type:
    """The transformers model class of this name: a `PreTrainedModel` subclass the package
    exports, with a config class of its own (not an abstract base).

    Raises:
        UsageError: naming what the name is instead, with the closest model classes.
    """
    where = where or spec
    if not name.isidentifier() or name.startswith("_"):
        raise UsageError(where, f"{name!r} is not a class name")
    transformers = import_transformers(spec)
    from transformers import PreTrainedModel

    try:
        found = getattr(transformers, name, None)
    except Exception:  # a class whose module needs a package not installed
        found = None
    if isinstance(found, type) and issubclass(found, PreTrainedModel):
        config_class = getattr(found, "config_class", None)
        if config_class is not None and getattr(config_class, "model_type", ""):
            return found
        raise UsageError(where, f"{name} is a base class of transformers models: name a model class")
    near = difflib.get_close_matches(name, [n for n in dir(transformers) if n[:1].isupper()], n=4)
    what = "no such name in transformers" if found is None else f"a {type(found).__name__}, not a model class"
    hint = f"did you mean {', '.join(near)}?" if near else "name a transformers model class such as BertModel"
    if code:
        hint = "the config's auto_map names a repository's own code, which surgery never imports; " + hint
    raise UsageError(where, f"{name!r} is not a transformers model class ({what})", hint=hint)


def import_transformers(spec: object) -> Any:
    """`transformers`, offline: nothing it does for surgery needs the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise UsageError(spec, "transformers is not installed", hint='pip install -e ".[hf]"') from None
    return transformers


def _check_config(where: Path, raw: dict[str, Any], cls: type) -> None:
    """Refuse a config of another model type, or one that asks for a kernel from the Hub;
    drop `auto_map` (remote code is refused before, without trust)."""
    raw.pop("auto_map", None)  # with trust: the transformers class is built, the code never imported
    model_type, expected = raw.get("model_type"), cls.config_class.model_type
    if model_type is not None and model_type != expected:
        raise UsageError(
            where,
            f"a {model_type!r} config; {cls.__name__} takes a {expected!r} config",
            hint="name its class",
        )
    _refuse_kernels(where, {k.lstrip("_"): v for k, v in raw.items()})


def _refuse_remote_code(where: Path, raw: dict[str, Any], named: str, *, trust: bool) -> None:
    """Without trust, refuse a config whose `auto_map` names a repository's own code, before
    transformers is even imported."""
    code = remote_code(raw)
    if code and not trust:
        raise Untrusted(
            where,
            f"auto_map names a repository's own code ({', '.join(code[:3])}); refused",
            hint=f"pass --trust to build transformers' own {named} and ignore auto_map "
            "(surgery never imports a repository's code)",
        )


def _refuse_kernels(where: object, values: dict[str, Any]) -> None:
    for key, allowed in LOCAL_IMPLEMENTATIONS.items():
        value = values.get(key)
        if value not in allowed:
            raise UsageError(
                where,
                f"{key}={value!r} is not built here: only {', '.join(a for a in allowed if a)} "
                "(other kernels are code transformers downloads and runs)",
            )


def _instantiate(spec: str, cls: type, make_config: Any) -> nn.Module:
    try:
        config = make_config()
        module = cls(config)
    except Exception as exc:  # transformers' own failure on this config: one line
        raise SurgeryError(spec, f"building the target failed: {type(exc).__name__}: {exc}") from None
    return module


def config_json(module: nn.Module) -> str | None:
    """The config.json `save_pretrained` would write for a transformers model (None for
    any other module), naming the model's class in `architectures`, as it does."""
    transformers = sys.modules.get("transformers")  # a transformers model means it is imported
    if transformers is None or not isinstance(module, transformers.PreTrainedModel):
        return None
    config = module.config
    config.architectures = [type(module).__name__]
    return config.to_json_string(use_diff=True)


def output_config(target: Target) -> str:
    """The config.json an output folder gets: the built transformers model's config
    (naming its class, as `save_pretrained` writes it), or the template folder's file as it is.

    Raises:
        UsageError: the target is neither, so no config says what model the weights are.
    """
    if target.module is not None:
        text = config_json(target.module)
        if text is not None:
            return text
    if target.template is not None and "hf_folder" in target.template.metadata:
        from surgery.writers.hf import folder_config

        return folder_config(target.template.metadata, target.spec)
    raise UsageError(
        target.spec,
        "--format hf needs a config.json: port into an hf: target (or a transformers model), "
        "or a Hugging Face folder as template",
    )
