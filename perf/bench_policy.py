"""`make bench` (part 4): what the content policy check adds to a request.

One run, one machine, the tiny model; Triton, Redis, the broker and the gateway on free
ports (`python -m launcher up --free-ports`), called over HTTP. Two API keys send the same
kind of request, a cached image (an explicit seed made once before, so no generation
hides a millisecond): one key in strict mode (its text normalised and matched against every
term of the shipped policy, and the policy's negative prompt added) and one with the
policy off. Rounds of alternating calls (perf/rounds.py): the milliseconds strict adds at
p50, the median of the rounds with their spread (target under 1 ms). Writes
perf/results/cpu-policy.json.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from perf import rounds, workload  # noqa: E402
from perf.launch import stack  # noqa: E402

# A weapon prompt of ordinary length, with words that contain blocked terms ("assassin's").
PROMPT = (
    "an assassin's curved dagger of frost-forged glass steel, ornate classic hilt wrapped in "
    "bass-wood and leather, glowing blue runes along the blade, legendary, game asset"
)
REQUEST = {**workload.REQUEST, "prompt": PROMPT, "seed": 424242}
TARGET_MS = 1.0
ENV = {"FORGE_RATE_LIMIT": "1000000/minute"}  # no rate limit in the way
RESULTS = ROOT / "perf" / "results"
PAIRS = 60  # per round


def keyed_call(c: httpx.Client, admin: dict[str, str], mode: str) -> httpx.Client:
    """A client whose key has content policy `mode`, its image made once (then cached)."""
    reply = c.post(
        "/v1/admin/keys", json={"name": f"bench-{mode}", "content_policy": mode}, headers=admin
    )
    reply.raise_for_status()
    keyed = httpx.Client(
        base_url=str(c.base_url),
        timeout=120,
        headers={"Authorization": f"Bearer {reply.json()['key']}"},
    )
    keyed.post("/v1/images", json=REQUEST).raise_for_status()
    return keyed


def cached_call(c: httpx.Client) -> None:
    """One cached image, answered as JSON."""
    reply = c.post("/v1/images", json=REQUEST)
    reply.raise_for_status()
    if reply.headers["X-Cache"] != "hit":
        raise RuntimeError("the measured request was not a cache hit")


def main() -> int:
    """Run the benchmark, write perf/results/cpu-policy.json, print the figures."""
    with (
        tempfile.TemporaryDirectory(prefix="forge-bench-policy-") as work,
        stack(Path(work), ["triton", "redis", "broker", "gateway"], env=ENV) as state,
    ):
        admin = {"Authorization": f"Bearer {state['dev_api_key']}"}
        with httpx.Client(base_url=state["services"]["gateway"]["url"], timeout=120) as c:
            off, strict = (keyed_call(c, admin, mode) for mode in ("off", "strict"))
            try:
                measured = rounds.alternating(
                    lambda: cached_call(off), lambda: cached_call(strict), pairs=PAIRS
                )
            finally:
                off.close()
                strict.close()
    overhead = rounds.summary(measured)
    figures = {
        "benchmark": "make bench (perf/bench_policy.py)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()}, {platform.machine()}, CPU only",
        "request": REQUEST,
        "strict_over_off_p50": overhead,
        "added_ms_p50": overhead["added_ms_median"],
        "target": f"< {TARGET_MS} ms",
        "met": overhead["added_ms_median"] < TARGET_MS,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu-policy.json").write_text(json.dumps(figures, indent=2) + "\n")
    for key, value in figures.items():
        if key == "strict_over_off_p50":
            value = {k: v for k, v in value.items() if k != "rounds"}
        if key not in ("request", "benchmark"):
            print(f"{key:24s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
