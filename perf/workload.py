"""The request the CPU benchmarks measure, one definition for all of them: a weapon at the
tiny model's default size, 25 steps, guided, with the default scheduler."""

from __future__ import annotations

from typing import Any

REQUEST: dict[str, Any] = {
    "prompt": "a frost-forged legendary axe, game item icon",
    "steps": 25,
    "guidance_scale": 7.5,
    "width": 128,
    "height": 128,
    "scheduler": "dpmpp_2m",
}
