"""The JSON documents: one per command, `surgery_json` versioned, laid out to read and diff well."""

from __future__ import annotations

import json
from typing import Any

JSON_VERSION = 1
LINE = 120  # a container whose JSON is at most this long stays on one line


def dumps(doc: Any, indent: int = 0) -> str:
    """JSON that reads well and diffs well: anything short on one line, the rest one entry a line."""
    if _surely_long(doc):
        if _is_record(doc):
            return json.dumps(doc)
    else:
        flat = json.dumps(doc)
        if len(flat) <= LINE or not isinstance(doc, (dict, list)) or not doc or _is_record(doc):
            return flat
    pad = "  " * (indent + 1)
    if isinstance(doc, dict):
        body = ",\n".join(f"{pad}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in doc.items())
        return "{\n" + body + "\n" + "  " * indent + "}"
    body = ",\n".join(pad + dumps(v, indent + 1) for v in doc)
    return "[\n" + body + "\n" + "  " * indent + "]"


def _surely_long(doc: Any) -> bool:
    """Whether `doc` is a container too long for one line, by its length alone: each item
    takes at least 3 characters (`0, `), each entry 7 (`"": 0, `). Spares encoding a long
    document once more at every level (a 400-tensor inspect, 3 times)."""
    if isinstance(doc, list):
        return 3 * len(doc) > LINE
    return isinstance(doc, dict) and 7 * len(doc) > LINE


def _is_record(doc: Any) -> bool:
    """An object of scalars and lists of scalars, such as one tensor's entry."""
    return isinstance(doc, dict) and all(
        not isinstance(v, dict) and not (isinstance(v, list) and any(isinstance(x, (dict, list)) for x in v))
        for v in doc.values()
    )
