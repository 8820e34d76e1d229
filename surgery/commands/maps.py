"""Rule files from disk and the presets shipped with surgery (`--map`, `--preset`, `surgery presets`).

A rule file is TOML read as data: its ops are a closed set (`plans.ops`), so a file,
reviewed or not, can rename, cut and reshape tensors but never run code.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from surgery.errors import UsageError
from surgery.plans.rules import RuleError, RuleSet, rules_from_doc

PRESETS = Path(__file__).resolve().parent.parent / "presets"


def read_rules(path: str | Path) -> RuleSet:
    """A rule file, every rule checked.

    Raises:
        UsageError: `error: rules.toml: rule 2: unknown op 'tranpose' ...`, one line.
    """
    import tomllib

    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(path, "no such rule file") from None
    except IsADirectoryError:
        raise UsageError(path, "a directory, not a rule file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(path, f"not a TOML file ({exc})") from None
    try:
        return rules_from_doc(doc, path.name)
    except RuleError as exc:
        raise UsageError(path, str(exc)) from None


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.toml"))


def read_preset(name: str) -> RuleSet:
    """A preset by name (`llama-meta-to-hf`).

    Raises:
        UsageError: no preset of that name, naming the ones there are.
    """
    path = PRESETS / f"{name}.toml"
    if "/" in name or "\\" in name or not path.is_file():
        raise UsageError(
            name, "no such preset", hint=f"presets: {', '.join(preset_names())} (surgery presets)"
        )
    rules = read_rules(path)
    return RuleSet(rules.rules, f"preset {name}", rules.args, rules.description, rules.verified)


def rule_sets(files: tuple[str, ...] = (), presets: tuple[str, ...] = ()) -> tuple[RuleSet, ...]:
    """The presets, then the rule files, in the order given."""
    return tuple(read_preset(n) for n in presets) + tuple(read_rules(f) for f in files)


@dataclass(frozen=True)
class PresetsReport:
    """`surgery presets`: each preset with its one line and the versions it was checked with."""

    presets: tuple[RuleSet, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "surgery_json": 1,
            "presets": [
                {
                    "name": r.origin.removeprefix("preset "),
                    "description": r.description,
                    "rules": len(r.rules),
                    "verified": dict(r.verified),
                }
                for r in self.presets
            ],
        }


def list_presets() -> PresetsReport:
    return PresetsReport(tuple(read_preset(name) for name in preset_names()))
