"""Weapons from game terms: the studio's templates turn a weapon into prompt and negative prompt."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field

REQUIRED = ("weapon_type", "material")
OPTIONAL = ("element", "rarity", "look")


@dataclass(frozen=True)
class WeaponTemplates:
    """The studio's weapon templates: a prompt format, its fields' choices and defaults, and
    the studio style (a LoRA the model serves) weapons are made in unless they name one."""

    prompt: str
    negative_prompt: str
    fields: dict[str, dict[str, str]]
    defaults: dict[str, str]
    default_style: str | None = None

    @classmethod
    def load(cls, path: Path) -> WeaponTemplates:
        """Read and check a templates file (every field present, defaults among choices)."""
        data = yaml.safe_load(path.read_text())
        templates = cls(
            data["prompt"],
            data.get("negative_prompt", ""),
            {k: {str(a): str(b or "") for a, b in v.items()} for k, v in data["fields"].items()},
            data.get("defaults", {}),
            data.get("default_style"),
        )
        missing = [f for f in (*REQUIRED, *OPTIONAL) if f not in templates.fields]
        if missing:
            raise ValueError(f"{path}: fields {missing} are missing")
        for name, value in templates.defaults.items():
            if value not in templates.fields[name]:
                raise ValueError(f"{path}: default {name}={value!r} is not one of its choices")
        return templates

    def fields_schema(self) -> dict[str, Any]:
        """The weapon fields of a request body: the template's choices as enums, free text."""
        fields: dict[str, Any] = {}
        for name in (*REQUIRED, *OPTIONAL):
            choices = Literal[tuple(self.fields[name])]  # type: ignore[valid-type]
            default = self.defaults.get(name, ...) if name in OPTIONAL else ...
            fields[name] = (choices, Field(default))
        fields["text"] = (
            str,
            Field("", max_length=120, description="free text, added to the prompt"),
        )
        return fields

    def render(self, weapon: BaseModel) -> tuple[str, str]:
        """(prompt, negative prompt) for a validated weapon request."""
        phrases = {
            name: self.fields[name][getattr(weapon, name)] for name in (*REQUIRED, *OPTIONAL)
        }
        text = getattr(weapon, "text", "").strip()
        prompt = self.prompt.format(**phrases, text=f", {text}" if text else "")
        return re.sub(r"\s+", " ", prompt).strip(), self.negative_prompt.strip()
