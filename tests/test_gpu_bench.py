"""perf/gpu_bench.py: its arithmetic, its part runner, and the whole script run here.

The GPU workloads need a CUDA GPU; the `smoke` workload runs the same code (the export and
launcher commands, the correctness checks with their CPU reference subprocess, real
tritonserver, gRPC sweep and operating point, Triton's batch statistics, plain diffusers,
FLOP and byte counts, compiled diffusers, ratios, projections) on this CPU with the tiny
model, so that a GPU run does not fail on something a CPU could have caught. Its numbers are
not figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from perf import gpu_bench as gb
from perf import gpu_checks

ROOT = Path(__file__).resolve().parents[1]


def level(c: int, ips: float, p50: float, p99: float) -> dict[str, float]:
    return {"concurrency": c, "images_per_s": ips, "p50": p50, "p95": p99, "p99": p99}


SERVED = {
    "levels": [level(1, 2.0, 0.5, 0.6), level(4, 6.0, 0.8, 1.0)],
    "batches_formed": {1: {"compute_s_per_image": 0.4}, 4: {"compute_s_per_image": 0.1}},
}
PLAIN = {
    "one_at_a_time": {"images_per_s": 1.0, "p50": 1.0},
    "batched": {1: {"per_image": 1.0}, 4: {"per_image": 0.2}},
}


def test_ratios_compare_like_with_like() -> None:
    compiled = {"status": "ok", "one_at_a_time": {"p50": 0.4}}
    assert gb.ratios(SERVED, PLAIN, compiled) == pytest.approx(
        {
            "throughput_vs_diffusers_one_at_a_time": 6.0,  # best served level / plain
            "batch1_p50_vs_diffusers_p50": 0.5,  # concurrency 1, not the best level
            "speed_vs_diffusers_batch1": 2.5,
            "speed_vs_diffusers_batch4": 2.0,
            "batch1_p50_vs_compiled_diffusers_p50": 1.25,
        }
    )


def test_ratios_use_whichever_parts_have_results() -> None:
    assert gb.ratios(None, PLAIN) == {}
    assert set(gb.ratios(SERVED, None)) == set()
    failed = {"status": "failed"}
    assert "batch1_p50_vs_compiled_diffusers_p50" not in gb.ratios(SERVED, PLAIN, failed)
    # JSON turns batch sizes into strings: the ratios read them back.
    as_json = json.loads(json.dumps({"served": SERVED, "plain": PLAIN}))
    assert gb.ratios(as_json["served"], as_json["plain"]) == gb.ratios(SERVED, PLAIN)


def test_targets_are_the_issues() -> None:
    verdicts = gb.meets_targets(
        {
            "throughput_vs_diffusers_one_at_a_time": 6.0,
            "batch1_p50_vs_diffusers_p50": 0.41,
            "speed_vs_diffusers_batch8": 1.7,
            "batch1_p50_vs_compiled_diffusers_p50": 1.1,
        }
    )
    assert verdicts == {
        "throughput_vs_diffusers_one_at_a_time": True,
        "batch1_p50_vs_diffusers_p50": False,
        "speed_vs_diffusers_batch8": True,
        "batch1_p50_vs_compiled_diffusers_p50": True,
    }


def test_published_t4_projection_scales_by_the_plain_batch1_slowdown() -> None:
    levels = [level(1, 2.0, 0.5, 0.6), level(2, 3.0, 0.6, 0.9), level(8, 4.0, 2.0, 3.0)]
    projection = gb.t4_projection_published(levels, diffusers_seconds=0.6)
    k = gb.T4_PUBLISHED_SECONDS_PER_IMAGE / 0.6
    assert projection["kind"].startswith("PROJECTION")
    assert projection["slowdown_k"] == pytest.approx(k)
    assert projection["images_per_hour"] == pytest.approx(4.0 * 3600 / k)
    # 70% of the best 4.0 images/s is 2.8: concurrency 2 is the first level to reach it.
    assert projection["load_concurrency"] == 2
    assert projection["p50_s"] == pytest.approx(0.6 * k)
    assert projection["p99_s"] == pytest.approx(0.9 * k)


def test_the_gpu_workloads_are_sd15_at_512_and_25_steps() -> None:
    for name in ("gpu", "quick"):
        work = gb.WORKLOADS[name]
        assert (work.architecture, work.size, work.steps, work.device) == ("sd15", 512, 25, "cuda")
        assert work.instance_kind == "KIND_GPU" and 1 in work.concurrencies
        assert work.torch_compile == "reduce-overhead" and work.budget_s is not None
    gpu = gb.WORKLOADS["gpu"]
    assert gpu.level_requests >= 32 and gpu.operating_requests >= 100
    assert gb.WORKLOADS["smoke"].instance_kind == "KIND_CPU"
    assert len(gb.served_requests(gpu)) >= gpu.operating_requests


def test_image_differences_are_stated_in_8_bit_levels() -> None:
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 0, 0], b[1, 1] = 30, 1
    stats = gpu_checks.compare(b, a)
    assert stats["max_levels"] == 30 and stats["mean_levels"] == pytest.approx(33 / 48)
    assert stats["share_of_pixels_differing"] == pytest.approx(2 / 16)
    assert stats["psnr_db"] == pytest.approx(10 * np.log10(255**2 / (903 / 48)))  # 35.4 dB
    assert not stats["identical"] and gpu_checks.compare(a, a)["psnr_db"] is None
    # fp16 against fp32: a mean of 0.69 levels and 35 dB hold; the largest is not judged.
    assert gpu_checks.judged(stats, same_device=False)["within_tolerance"]
    assert not gpu_checks.judged(stats, same_device=True)["within_tolerance"]  # mean > 0.5


class FakeRun:
    """What run_part uses of a Run."""

    def __init__(self, budget_s: float | None, elapsed: float = 0.0) -> None:
        self.work = replace(gb.WORKLOADS["smoke"], budget_s=budget_s)
        self.results: dict[str, Any] = {}
        self.saved = 0
        self._elapsed = elapsed
        self.timer = gb.BudgetTimer(None)

    def elapsed(self) -> float:
        return self._elapsed

    def left_s(self) -> float | None:
        budget = self.work.budget_s
        return None if budget is None else budget - self._elapsed

    def save(self) -> None:
        self.saved += 1


def test_a_failing_part_is_recorded_and_the_next_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(run: Any, record: dict[str, Any]) -> None:
        record["partial"] = 1
        raise ValueError("no GPU today")

    def fine(run: Any, record: dict[str, Any]) -> None:
        record["value"] = 2

    monkeypatch.setitem(gb.PART_BODIES, "serving", boom)
    monkeypatch.setitem(gb.PART_BODIES, "diffusers", fine)
    run = FakeRun(None)
    gb.run_part(run, "serving")  # type: ignore[arg-type]
    gb.run_part(run, "diffusers")  # type: ignore[arg-type]
    served = run.results["triton"]
    assert served["status"] == "failed" and "no GPU today" in served["error"]
    assert "Traceback" in served["traceback"] and served["partial"] == 1
    assert run.results["diffusers"] == {**run.results["diffusers"], "status": "ok", "value": 2}
    assert run.saved == 2


def test_a_part_that_cannot_fit_the_budget_is_skipped_saying_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(gb.PART_BODIES, "serving", lambda run, record: pytest.fail("ran"))
    run = FakeRun(budget_s=470.0, elapsed=400.0)
    gb.run_part(run, "serving")  # type: ignore[arg-type]
    record = run.results["triton"]
    assert record["status"] == "skipped"
    assert "needs at least 150 s; 70 s of the 470 s budget left" in record["reason"]


def test_a_part_past_its_cap_is_ended_and_the_next_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    monkeypatch.setitem(gb.PART_CAP_S, "serving", 0.2)
    monkeypatch.setitem(gb.PART_BODIES, "serving", lambda run, record: time.sleep(5))
    monkeypatch.setitem(gb.PART_BODIES, "diffusers", lambda run, record: None)
    run = FakeRun(budget_s=470.0)
    run.timer = gb.BudgetTimer(470.0)
    try:
        gb.run_part(run, "serving")  # type: ignore[arg-type]
        gb.run_part(run, "diffusers")  # type: ignore[arg-type]
    finally:
        run.timer.cancel()
    assert run.results["triton"]["status"] == "failed"
    assert "serving ran past its 0.2 s cap" in run.results["triton"]["error"]
    assert run.results["diffusers"]["status"] == "ok"


def test_parts_can_be_selected_and_unknown_ones_are_refused() -> None:
    args = gb.parse_args(["--out", "x", "--parts", "serving,unet_work"])
    assert args.parts == ["serving", "unet_work"]
    assert gb.parse_args(["--out", "x"]).parts == list(gb.PARTS)
    with pytest.raises(SystemExit):
        gb.parse_args(["--out", "x", "--parts", "serving,everything"])


def check_correctness(result: dict[str, Any]) -> None:
    correctness = result["correctness"]
    assert correctness["status"] == "ok"
    checks = correctness["checks"]
    for name in (
        "batch_independence_tiny",
        "schedulers_vs_cpu",
        "compiled_vs_eager",
        "batch_independence_served_model",
        "served_model_vs_cpu",
    ):
        assert checks[name]["status"] == "ok", checks[name].get("traceback")
    # Every scheduler's image against the CPU reference: here CPU against CPU, identical.
    images = checks["schedulers_vs_cpu"]["images"]
    assert sorted(images) == sorted(gpu_checks.SCHEDULERS)
    assert all(stats["identical"] for stats in images.values())
    for name in ("batch_independence_tiny", "batch_independence_served_model"):
        compositions = checks[name]["compositions"]
        assert len(compositions) == 4 and all("max_levels" in c for c in compositions.values())
    compiled = checks["compiled_vs_eager"]
    assert compiled["mode"] == "default" and not compiled["recompiled_after_warm_up"]
    assert compiled["graphs_compiled_after_warm_up"] == 0
    summary = correctness["summary"]
    assert summary["checks_failed"] == [] and summary["no_recompilation_after_warm_up"]


def check_serving(result: dict[str, Any], work: gb.Workload) -> None:
    served = result["triton"]
    assert served["status"] == "ok"
    assert served["server_start_s"] > 0 and served["model_load_s"] > 0
    assert served["cold_start_s"] >= served["model_load_s"]
    assert served["log_lines_after_sweep"]["recompilations"] >= 0
    levels = served["levels"]
    assert [lv["concurrency"] for lv in levels] == list(work.concurrencies)
    for lv in levels:
        assert lv["n"] == work.level_requests
        assert 0 < lv["p50"] <= lv["p95"] <= lv["p99"] and lv["images_per_s"] > 0
    point = served["operating_point"]
    assert point["n"] == work.operating_requests
    assert point["concurrency"] == max(levels, key=lambda lv: lv["images_per_s"])["concurrency"]
    # Triton's statistics, less the warm-up, account for exactly the sweep's images.
    formed = {int(b): v for b, v in served["batches_formed"].items()}
    sent = sum(lv["n"] for lv in levels) + point["n"]
    assert sum(b * v["executions"] for b, v in formed.items()) == sent
    assert served["gpu_memory_used_mib"]["before_server"] is None  # no nvidia-smi here


def check_plain_and_work(result: dict[str, Any], work: gb.Workload) -> None:
    formed = sorted(int(b) for b in result["triton"]["batches_formed"])
    plain = result["diffusers"]
    assert plain["status"] == "ok" and plain["one_at_a_time"]["n"] == work.one_at_a_time
    assert sorted(int(b) for b in plain["batched"]) == formed
    assert plain["one_at_a_time"]["peak_memory_bytes"] is None  # CUDA only
    unet = result["unet_work"]
    assert unet["status"] == "ok" and unet["steps"] == work.steps
    calls = {int(b): v for b, v in unet["unet_per_call"].items()}
    assert sorted(calls) == list(range(1, result["settings"]["max_batch_size"] + 1))
    assert calls[2]["flops"] == 2 * calls[1]["flops"] > 0  # FLOPs grow with the batch
    assert calls[2]["operand_bytes"] > calls[1]["operand_bytes"] > unet["weights_bytes"]["unet"]
    assert unet["vae_decoder_per_image"]["flops"] > 0
    compiled = result["diffusers_compiled"]
    assert compiled["status"] == "ok" and compiled["mode"] == work.torch_compile
    assert compiled["one_at_a_time"]["n"] == work.one_at_a_time


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
    assert result["settings"]["torch_compile"] == "default"  # compiled as on the GPU
    assert result["prepare"]["tiny"]["status"] == "ok"
    check_correctness(result)
    check_serving(result, work)
    check_plain_and_work(result, work)
    formed = [int(b) for b in result["triton"]["batches_formed"]]
    for b in formed:
        assert result["ratios"][f"speed_vs_diffusers_batch{b}"] > 0
    assert set(result["meets_targets"]) == set(result["ratios"])
    assert "batch1_p50_vs_compiled_diffusers_p50" in result["ratios"]
    projections = result["t4_projection"]
    for name in ("published_scaling", "roofline"):
        assert "PROJECTION" in projections[name]["kind"]
        assert projections[name]["images_per_hour"] > 0
    assert (out / "smoke-bench-tritonserver.log").read_text()


def test_packages_built_for_another_numpy_are_found() -> None:
    from perf.numpy_guard import needs_other_numpy

    scipy_118 = ["numpy<2.8,>=2.0.0", 'numpydoc; extra == "doc"', "pytest; extra == 'test'"]
    assert needs_other_numpy(scipy_118, "1.26.4")
    assert not needs_other_numpy(scipy_118, "2.5.2")
    assert not needs_other_numpy(["numpy<2.7,>=1.26.4"], "1.26.4")  # scipy 1.17
    assert not needs_other_numpy(["Pillow", 'numpy>=3; python_version < "3"'], "1.26.4")
