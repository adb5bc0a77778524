"""perf/gpu_bench.py: its arithmetic, and the whole script run here on the tiny model.

The GPU workload needs the lent GPU machine; the `smoke` workload runs the same code (export,
real tritonserver, gRPC sweep, Triton's batch statistics, plain diffusers, ratios, the T4
projection) on this CPU with the tiny model, so a device session's one call does not fail
on something a CPU could have caught. Its numbers are not figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from perf import gpu_bench as gb

ROOT = Path(__file__).resolve().parents[1]


def level(c: int, ips: float, p50: float, p99: float) -> dict[str, float]:
    return {"concurrency": c, "images_per_s": ips, "p50": p50, "p95": p99, "p99": p99}


def test_ratios_compare_like_with_like() -> None:
    served = {
        "levels": [level(1, 2.0, 0.5, 0.6), level(4, 6.0, 0.8, 1.0)],
        "batches_formed": {1: {"compute_s_per_image": 0.4}, 4: {"compute_s_per_image": 0.1}},
    }
    plain = {
        "one_at_a_time": {"images_per_s": 1.0, "p50": 1.0},
        "batched": {1: {"per_image": 1.0}, 4: {"per_image": 0.2}},
    }
    assert gb.ratios(served, plain) == pytest.approx(
        {
            "throughput_vs_diffusers_one_at_a_time": 6.0,  # best served level / plain
            "batch1_p50_vs_diffusers_p50": 0.5,  # concurrency 1, not the best level
            "speed_vs_diffusers_batch1": 2.5,
            "speed_vs_diffusers_batch4": 2.0,
        }
    )


def test_t4_projection_scales_by_the_plain_batch1_slowdown() -> None:
    levels = [level(1, 2.0, 0.5, 0.6), level(2, 3.0, 0.6, 0.9), level(8, 4.0, 2.0, 3.0)]
    projection = gb.t4_projection(levels, diffusers_seconds=0.6)
    k = gb.T4_PUBLISHED_SECONDS_PER_IMAGE / 0.6
    assert projection["kind"].startswith("PROJECTION")
    assert projection["slowdown_k"] == pytest.approx(k)
    assert projection["images_per_hour"] == pytest.approx(4.0 * 3600 / k)
    # 70% of the best 4.0 images/s is 2.8: concurrency 2 is the first level to reach it.
    assert projection["load_concurrency"] == 2
    assert projection["p50_s"] == pytest.approx(0.6 * k)
    assert projection["p99_s"] == pytest.approx(0.9 * k)


def test_the_gpu_workloads_are_the_issues() -> None:
    for name in ("gpu", "quick"):
        work = gb.WORKLOADS[name]
        assert (work.architecture, work.size, work.steps, work.device) == ("sd15", 512, 25, "cuda")
        assert work.instance_kind == "KIND_GPU" and 1 in work.concurrencies
    assert gb.WORKLOADS["smoke"].instance_kind == "KIND_CPU"


def test_the_benchmark_runs_end_to_end_on_the_tiny_model(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["perf/gpu_bench.py", "--workload", "smoke", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, *argv, "--workdir", str(tmp_path / "work")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "smoke-bench.json").read_text())
    work = gb.WORKLOADS["smoke"]
    assert result["device"] == "cpu" and result["settings"]["steps"] == work.steps
    assert result["settings"]["torch_compile"] == "default"  # compiled inside the stub
    levels = result["triton"]["levels"]
    assert [lv["concurrency"] for lv in levels] == list(work.concurrencies)
    for lv in levels:
        assert lv["n"] == work.per_level * lv["concurrency"]
        assert 0 < lv["p50"] <= lv["p95"] <= lv["p99"] and lv["images_per_s"] > 0
    # Triton's statistics, less the warm-up, account for exactly the sweep's images.
    formed = {int(b): v for b, v in result["triton"]["batches_formed"].items()}
    assert sum(b * v["executions"] for b, v in formed.items()) == sum(lv["n"] for lv in levels)
    # Plain diffusers ran at every batch size Triton formed, and each has its ratio.
    assert sorted(int(b) for b in result["diffusers"]["batched"]) == sorted(formed)
    for b in formed:
        assert result["ratios"][f"speed_vs_diffusers_batch{b}"] > 0
    assert result["t4_projection"]["images_per_hour"] > 0
    assert "PROJECTION" in result["t4_projection"]["kind"]
