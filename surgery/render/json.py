"""The JSON documents: one per command, `surgery_json` versioned, laid out to read and diff well."""

from __future__ import annotations

import json
from typing import Any

JSON_VERSION = 1


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
