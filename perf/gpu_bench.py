"""The GPU benchmark of issue 7, one call on the lent GPU machine. NOT RUN YET.

This script has not been run: it was written on a CPU-only machine in a session without a GPU
machine, so no figure in perf/RESULTS.md comes from it. Expect to fix small things on the
first run (package versions on the device, timeouts), and say so beside its first figures.

What it measures, in one process and one run, on an SD 1.5-sized model with random weights
(UNet (320, 640, 1280, 1280), cross-attention 768, CLIP ViT-L-sized text encoder, SD VAE),
512x512, 25 steps, dpmpp_2m, guidance 7.5, fp16:
  (a) our model served by the real tritonserver (runtime `torch`, KIND_GPU, the dynamic
      batcher up to --max-batch-size): images/s and P50/P95/P99 latency for each
      concurrency of a sweep, gRPC clients in threads;
  (b) plain diffusers `StableDiffusionPipeline` (fp16, SDPA) serving the same requests one
      at a time: what a team would otherwise deploy;
  (c) plain diffusers at each batch size Triton's batcher formed in (a) (read from Triton's
      inference statistics), per image.
and the ratios the issue targets: (a) best images/s / (b) images/s (>= 5), (a) per-image
time / (c) at the same batch size (<= 1/1.6), (a) P50 at concurrency 1 / (b) P50 (<= 0.5).
A T4 projection multiplies the published T4 figure (DESIGN.md: ~2.4 s/image at 25 steps) by
the measured speed-up and is printed, and stored, as a PROJECTION, not a measurement.
Triton is stopped before (b) and (c), so they do not share the GPU with it.

The device machine has torch with CUDA, transformers, onnx and safetensors, but not
diffusers, tritonclient, nvidia-pytriton (the tritonserver binary) or open-clip-torch (the
CLIP vocabulary file), nor TensorRT or onnxruntime-gpu: so the served runtime is `torch`
and the export is `--torch-only` (tracing a 3.4 GB UNet to ONNX would spend the time budget).
Its Python is 3.12 with numpy 2; tritonclient 2.51 and nvidia-pytriton 0.7 were built
against numpy<2: carry numpy 1.26 as a wheel too. The wheels must fit the 64 MiB a call
carries; check their sizes first (`du -sh .whl`), and if nvidia-pytriton does not fit,
this benchmark cannot run on that machine as it is.

How to run it (from the repository root on the CPU machine):

  echo /.whl/ >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \\
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \\
      --platform manylinux2014_x86_64 -d .whl \\
      diffusers==0.35.2 tritonclient[all]==2.51.0 nvidia-pytriton==0.7.0 \\
      open-clip-torch==3.3.0 numpy==1.26.4 protobuf==4.25.8 python-rapidjson
  # then the device tool, with a limit that leaves time to rerun:
  run(command="python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \\
      .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && \\
      python3 perf/gpu_bench.py --out $OUT", carry=[".whl"], timeout_s=540)

`--quick` shrinks the sweep for a first smoke run. Results: `$OUT/gpu-bench.json` (copy it to
perf/results/gpu-<card>-bench.json) and a summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STEPS, SIZE, GUIDANCE, SCHEDULER = 25, 512, 7.5, "dpmpp_2m"
PROMPT = "a frost-forged legendary axe, game item icon, runes, studio light"
NEGATIVE = "blurry, low quality"
T4_PUBLISHED_SECONDS_PER_IMAGE = 2.4  # DESIGN.md, published, not ours


def percentiles(seconds: list[float]) -> dict[str, float]:
    q = statistics.quantiles(seconds, n=100, method="inclusive")
    return {"p50": statistics.median(seconds), "p95": q[94], "p99": q[98], "n": len(seconds)}


def triton_sweep(
    repository: Path, workdir: Path, concurrencies: list[int], per_level: int
) -> dict[str, Any]:
    """(a): the real tritonserver, runtime torch on the GPU, a gRPC concurrency sweep."""
    import tritonclient.grpc as grpcclient

    from gateway.triton_client import MODEL_NAME, ImageParams, generate
    from launcher.triton import Triton

    triton = Triton(repository, workdir).start()
    try:
        triton.load()
        params = [
            ImageParams(
                prompt=f"{PROMPT}, variant {i}",
                negative_prompt=NEGATIVE,
                seed=i,
                steps=STEPS,
                guidance_scale=GUIDANCE,
                width=SIZE,
                height=SIZE,
                scheduler=SCHEDULER,
            )
            for i in range(per_level * max(concurrencies))
        ]
        for p in params[:2]:  # warm-up: CUDA context, allocator, kernels
            generate(triton.grpc_url, [p])
        levels = []
        for c in concurrencies:
            todo = params[: per_level * c]

            def one(p: ImageParams) -> float:
                start = time.perf_counter()
                generate(triton.grpc_url, [p])
                return time.perf_counter() - start

            start = time.perf_counter()
            with ThreadPoolExecutor(c) as pool:
                latencies = list(pool.map(one, todo))
            wall = time.perf_counter() - start
            levels.append(
                {"concurrency": c, "images_per_s": len(todo) / wall, **percentiles(latencies)}
            )
            print(f"triton c={c}: {levels[-1]}", flush=True)
        with grpcclient.InferenceServerClient(triton.grpc_url) as client:
            (stats,) = client.get_inference_statistics(MODEL_NAME, as_json=True)["model_stats"]
        batches = {
            int(b["batch_size"]): int(b["compute_infer"].get("count", 0))
            for b in stats.get("batch_stats", [])
        }
        return {"levels": levels, "batch_sizes_formed": batches}
    finally:
        triton.stop()


def diffusers_runs(model: Path, one_at_a_time: int, batch_sizes: list[int]) -> dict[str, Any]:
    """(b) and (c): plain diffusers, fp16 on CUDA, the same prompts and settings."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model, torch_dtype=torch.float16, safety_checker=None, requires_safety_checker=False
    ).to("cuda")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2
    )
    pipe.set_progress_bar_config(disable=True)

    def call(n: int, seed: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        pipe(
            [PROMPT] * n,
            negative_prompt=[NEGATIVE] * n,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            width=SIZE,
            height=SIZE,
            generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(n)],
            output_type="np",
        )
        torch.cuda.synchronize()
        return time.perf_counter() - start

    call(1, 0)  # warm-up
    single = [call(1, i) for i in range(one_at_a_time)]
    batched = {}
    for b in batch_sizes:
        call(b, 0)
        runs = [call(b, 100 + i) for i in range(2)]
        batched[b] = {"seconds_per_call": statistics.median(runs), "per_image": min(runs) / b}
        print(f"diffusers batch {b}: {batched[b]}", flush=True)
    return {
        "one_at_a_time": {"images_per_s": len(single) / sum(single), **percentiles(single)},
        "batched": batched,
    }


def prepare(workdir: Path, max_batch_size: int) -> tuple[Path, Path]:
    """SD 1.5-sized random model, exported --torch-only into a fresh model repository."""
    from export.onnx_export import export_onnx
    from export.tiny import write_tiny
    from export.triton_config import ConfigOverrides, write_exported_config

    model = workdir / "sd15-random"
    write_tiny(model, architecture="sd15")  # SD 1.5's shapes, seeded random weights
    repo = workdir / "model_repository"
    code = repo / "stable_diffusion" / "1"
    code.mkdir(parents=True)
    source = ROOT / "model_repository" / "stable_diffusion"
    shutil.copy(source / "config.pbtxt", code.parent / "config.pbtxt")
    for file in (source / "1").glob("*.py"):
        shutil.copy(file, code / file.name)
    export_onnx(str(model), repo, torch_only=True)
    write_exported_config(
        repo / "stable_diffusion",
        ConfigOverrides(
            runtime="torch",
            instance_kind="KIND_GPU",
            instances=1,
            max_batch_size=max_batch_size,
            max_queue_delay_us=20_000,
        ),
    )
    return model, repo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/forge-gpu-bench"))
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="a small sweep for a smoke run")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("error: no CUDA GPU: this benchmark runs on the GPU machine", file=sys.stderr)
        return 2
    concurrencies = [1, 4] if args.quick else [1, 2, 4, 8, 16]
    per_level = 2 if args.quick else 4
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, repo = prepare(args.workdir, args.max_batch_size)
    print(f"prepared in {time.perf_counter() - t0:.0f} s", flush=True)
    served = triton_sweep(repo, args.workdir / "triton", concurrencies, per_level)
    formed = sorted(b for b, n in served["batch_sizes_formed"].items() if n > 0)
    plain = diffusers_runs(model, 4 if args.quick else 8, formed)
    best = max(served["levels"], key=lambda lv: lv["images_per_s"])
    c1 = next(lv for lv in served["levels"] if lv["concurrency"] == 1)
    speedup = best["images_per_s"] / plain["one_at_a_time"]["images_per_s"]
    ratios = {
        "throughput_vs_diffusers_one_at_a_time": speedup,  # target >= 5
        "batch1_p50_vs_diffusers_p50": c1["p50"] / plain["one_at_a_time"]["p50"],  # <= 0.5
    }
    # Against diffusers at the largest batch Triton formed: best served images/s times
    # diffusers' seconds per image at that batch (target >= 1.6). Served figures include
    # queueing and gRPC; diffusers' do not.
    if formed:
        b = formed[-1]
        ratios[f"throughput_vs_diffusers_batch{b}"] = (
            best["images_per_s"] * plain["batched"][b]["per_image"]
        )
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": "SD 1.5 architecture, random weights, fp16",
        "settings": {"steps": STEPS, "size": SIZE, "scheduler": SCHEDULER, "guidance": GUIDANCE},
        "triton": served,
        "diffusers": plain,
        "ratios": ratios,
        "t4_projection": {
            "kind": "PROJECTION, not a measurement",
            "basis": "published T4 ~2.4 s/image at 25 steps x the measured speed-up over "
            "diffusers one at a time; the published figure is not plain diffusers, so this "
            "is optimistic if the speed-up came from what the published run already had",
            "images_per_hour": 3600 / T4_PUBLISHED_SECONDS_PER_IMAGE * speedup,
        },
    }
    (args.out / "gpu-bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"gpu": result["gpu"], "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
