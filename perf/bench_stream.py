"""`make bench` (part 3): what streaming progress and previews cost, end to end.

One run, one machine, the tiny model (25 steps, 128x128), Triton, Redis, the broker and the
gateway on free ports (`python -m launcher up --free-ports`), called over HTTP:
  - streamed p50 / JSON p50: `POST /v1/images` with `Accept: text/event-stream` and a
    preview every 5 steps, read to its `result` event, against the same request answered as
    JSON, in rounds of alternating calls (perf/rounds.py; target <= 1.05 on the median of
    the rounds), with its spread and the milliseconds streaming adds;
  - time to first preview (request sent to the first `preview` event): p50 and p95, and the
    same for the first `progress` event.
Every call has a new seed (no cache hits). Writes perf/results/cpu-tiny-stream.json.
"""

from __future__ import annotations

import itertools
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from perf import rounds, workload  # noqa: E402
from perf.launch import stack  # noqa: E402

REQUEST = workload.REQUEST
PREVIEW_EVERY = 5
TARGET = 1.05
ENV = {"FORGE_RATE_LIMIT": "1000000/minute"}  # no rate limit in the way
RESULTS = ROOT / "perf" / "results"
PAIRS = 12  # per round


class Client:
    """The two calls measured, and the first-event times of the streamed ones."""

    def __init__(self, c: httpx.Client, rng: random.Random) -> None:
        self.c = c
        self.seeds = (rng.randrange(2**62) for _ in itertools.count())
        self.first_progress: list[float] = []
        self.first_preview: list[float] = []

    def as_json(self) -> None:
        """One image answered as JSON."""
        reply = self.c.post("/v1/images", json={**REQUEST, "seed": next(self.seeds)})
        reply.raise_for_status()

    def streamed(self) -> None:
        """One image streamed, read to its result; first-event times noted."""
        start = time.perf_counter()
        seen: dict[str, float] = {}
        body = {**REQUEST, "seed": next(self.seeds)}
        with self.c.stream(
            "POST",
            "/v1/images",
            json=body,
            params={"preview_every": PREVIEW_EVERY},
            headers={"Accept": "text/event-stream"},
        ) as reply:
            reply.raise_for_status()
            for line in reply.iter_lines():
                if line.startswith("event:"):
                    seen.setdefault(line.split(":", 1)[1].strip(), time.perf_counter() - start)
        if "result" not in seen:
            raise RuntimeError(f"the stream ended without a result: {sorted(seen)}")
        self.first_progress.append(seen["progress"])
        self.first_preview.append(seen["preview"])


def ms(values: list[float], q: int) -> float:
    """The q-th percentile of `values` (seconds), in milliseconds."""
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000, 1)


def main() -> int:
    """Run the benchmark, write perf/results/cpu-tiny-stream.json, print the figures."""
    with (
        tempfile.TemporaryDirectory(prefix="forge-bench-stream-") as work,
        stack(Path(work), ["triton", "redis", "broker", "gateway"], env=ENV) as state,
    ):
        gateway = state["services"]["gateway"]["url"]
        auth = {"Authorization": f"Bearer {state['dev_api_key']}"}
        with httpx.Client(base_url=gateway, timeout=120, headers=auth) as c:
            client = Client(c, random.Random(7))
            measured = rounds.alternating(client.as_json, client.streamed, pairs=PAIRS)
    overhead = rounds.summary(measured)
    figures = {
        "benchmark": "make bench (perf/bench_stream.py)",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()}, {platform.machine()}, CPU only",
        "request": REQUEST,
        "preview_every": PREVIEW_EVERY,
        "streamed_over_json_p50": overhead,
        "target": f"<= {TARGET}",
        "met": overhead["ratio_median"] <= TARGET,
        "first_progress_p50_ms": ms(client.first_progress, 50),
        "first_preview_p50_ms": ms(client.first_preview, 50),
        "first_preview_p95_ms": ms(client.first_preview, 95),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cpu-tiny-stream.json").write_text(json.dumps(figures, indent=2) + "\n")
    for key, value in figures.items():
        if key == "streamed_over_json_p50":
            value = {k: v for k, v in value.items() if k != "rounds"}
        if key not in ("request", "benchmark"):
            print(f"{key:32s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
