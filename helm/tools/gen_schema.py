"""values.yaml (with its comments) -> values.schema.json, so the two cannot drift.

    python helm/tools/gen_schema.py          # rewrite helm/forge/values.schema.json
    python helm/tools/gen_schema.py --check  # exit 1 if the committed schema is stale

Rules (see the head of values.yaml): the comment lines right above a key are its
description, and every key must have one; "@schema {json}" merges JSON-schema keywords;
"@free" makes an object or list a pass-through (type only, content unchecked). Types come
from the defaults (a null default needs an @schema "type", e.g. ["integer", "null"]); maps
that are not @free get additionalProperties: false, so a typo in a values file fails
`helm lint` / `helm template`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[1] / "forge"
VALUES = CHART / "values.yaml"
SCHEMA = CHART / "values.schema.json"

KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-/]+):(?:\s|$)")


def comments_by_path(text: str) -> dict[tuple[str, ...], list[str]]:
    """Map each mapping key's path to the comment lines right above it."""
    found: dict[tuple[str, ...], list[str]] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        if not stripped:
            pending = []
            continue
        match = KEY.match(line)
        if not match or stripped.startswith("-"):
            pending = []
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        found[tuple(k for _, k in stack)] = pending
        pending = []
    return found


def type_of(value: Any) -> str:
    """The JSON-schema type of a default value."""
    if value is None:  # an optional setting: its @schema names the type ("type": [..., "null"])
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    raise TypeError(f"no JSON type for {value!r}")


def build(value: Any, path: tuple[str, ...], comments: dict, errors: list[str]) -> dict:
    """The schema of one value and (for a map) its keys; a key without a comment is an error."""
    lines = comments.get(path)
    if path and not lines:
        errors.append(f"values.yaml: {'.'.join(path)} has no comment describing it")
        lines = []
    extra: dict[str, Any] = {}
    free = False
    text: list[str] = []
    for line in lines or []:
        if line.startswith("@schema "):
            extra.update(json.loads(line[len("@schema ") :]))
        elif line == "@free":
            free = True
        else:
            text.append(line)
    node: dict[str, Any] = {"type": type_of(value)}
    if text:
        node["description"] = " ".join(text)
    if isinstance(value, dict) and not free and "additionalProperties" not in extra:
        node["properties"] = {k: build(v, (*path, k), comments, errors) for k, v in value.items()}
        node["additionalProperties"] = False
    node.update(extra)
    return node


def generate() -> str:
    """values.schema.json's text for the current values.yaml; exits on a key without a comment."""
    text = VALUES.read_text()
    errors: list[str] = []
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "Crafterse Forge chart values",
        **build(yaml.safe_load(text), (), comments_by_path(text), errors),
    }
    if errors:
        sys.exit("\n".join(errors))
    return json.dumps(schema, indent=2) + "\n"


def main() -> int:
    """Write the schema, or with --check return 1 if the committed one is stale."""
    schema = generate()
    if "--check" in sys.argv[1:]:
        if not SCHEMA.exists() or SCHEMA.read_text() != schema:
            print(f"{SCHEMA} is stale: run python helm/tools/gen_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA.write_text(schema)
    print(f"wrote {SCHEMA}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
