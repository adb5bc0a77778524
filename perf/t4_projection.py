"""A T4 projection from work counted on another GPU: a PROJECTION, not a measurement.

perf/gpu_bench.py counts, on the GPU it runs on, the FLOPs and bytes of one UNet call at each
batch size, of the text encoder and of the VAE decoder (perf/unet_work.py). Each call here
takes as long as the slower of its arithmetic and its memory traffic on the T4:

    seconds = max(flops / (compute_efficiency x 65 TFLOP/s),
                  bytes / (memory_efficiency x 320 GB/s)) + overhead

and an image at batch size b costs (steps x UNet call + b x text encoder + b x VAE decode) / b.
The efficiencies are ASSUMPTIONS, parameters of every function here: the share of the T4's
fp16 tensor-core peak and of its memory bandwidth the kernels reach (a T4 also lowers its
clocks under its 70 W limit). `bytes_basis` picks the traffic: "operands" (every operation
reads and writes its tensors, no fusion: pessimistic for a compiled model) or "weights" (each
weight read once, activations free: optimistic). A batch size fits when the weights plus its
largest working set (UNet's or b VAE decodes') fit in the T4's 16 GB.

`python perf/t4_projection.py RESULTS.json [--compute-efficiency 0.35] ...` prints the table
for a results file of perf/gpu_bench.py (tests/test_t4_projection.py).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COMPUTE_EFFICIENCY = 0.35  # assumption: share of the fp16 tensor-core peak reached
MEMORY_EFFICIENCY = 0.7  # assumption: share of the memory bandwidth reached
BYTES_BASES = ("operands", "weights")


@dataclass(frozen=True)
class Accelerator:
    """A GPU's published fp16 tensor-core peak, memory bandwidth and memory."""

    name: str
    fp16_flops: float
    bandwidth: float  # bytes/s
    memory_bytes: float


T4 = Accelerator("NVIDIA T4", 65e12, 320e9, 16e9)


def call_seconds(
    flops: float,
    bytes_moved: float,
    gpu: Accelerator,
    *,
    compute_efficiency: float,
    memory_efficiency: float,
) -> tuple[float, str]:
    """Seconds of one call on `gpu` and what bounds it ("compute" or "memory")."""
    if not (0 < compute_efficiency <= 1 and 0 < memory_efficiency <= 1):
        raise ValueError("efficiencies must be in (0, 1]")
    compute = flops / (compute_efficiency * gpu.fp16_flops)
    memory = bytes_moved / (memory_efficiency * gpu.bandwidth)
    return (compute, "compute") if compute >= memory else (memory, "memory")


def _traffic(call: dict[str, Any], weights: int, bytes_basis: str) -> float:
    if bytes_basis not in BYTES_BASES:
        raise ValueError(f"bytes_basis {bytes_basis!r}: choose from {', '.join(BYTES_BASES)}")
    return float(call["operand_bytes"] if bytes_basis == "operands" else weights)


def project(
    work: dict[str, Any],
    steps: int,
    *,
    gpu: Accelerator = T4,
    compute_efficiency: float = COMPUTE_EFFICIENCY,
    memory_efficiency: float = MEMORY_EFFICIENCY,
    bytes_basis: str = "operands",
    overhead_s_per_call: float = 0.0,
) -> dict[str, Any]:
    """Seconds per image and images/hour on `gpu` at each batch size of `work` (the
    `unet_work` part of perf/gpu_bench.py's results), and the best batch size that fits."""
    weights = work["weights_bytes"]
    rates = dict(compute_efficiency=compute_efficiency, memory_efficiency=memory_efficiency)
    text = work["text_encoder_per_image"]
    vae = work["vae_decoder_per_image"]
    text_s, _ = call_seconds(
        text["flops"], _traffic(text, weights["text_encoder"], bytes_basis), gpu, **rates
    )
    vae_s, _ = call_seconds(vae["flops"], _traffic(vae, weights["vae"], bytes_basis), gpu, **rates)
    batches: dict[int, dict[str, Any]] = {}
    for key, unet in work["unet_per_call"].items():
        b = int(key)
        unet_s, bound = call_seconds(
            unet["flops"], _traffic(unet, weights["unet"], bytes_basis), gpu, **rates
        )
        image_s = (steps * (unet_s + overhead_s_per_call) + b * (text_s + vae_s)) / b
        working = max(
            unet.get("peak_activation_bytes") or 0, b * (vae.get("peak_activation_bytes") or 0)
        )
        batches[b] = {
            "unet_call_s": unet_s,
            "unet_bound_by": bound,
            "seconds_per_image": image_s,
            "images_per_hour": 3600 / image_s,
            "memory_bytes": sum(weights.values()) + working,
            "fits": sum(weights.values()) + working <= gpu.memory_bytes,
        }
    fitting = [b for b in batches if batches[b]["fits"]]
    best = max(fitting, key=lambda b: batches[b]["images_per_hour"]) if fitting else None
    return {
        "kind": "PROJECTION, not a measurement",
        "gpu": gpu.name,
        "assumptions": {
            **rates,
            "bytes_basis": bytes_basis,
            "overhead_s_per_call": overhead_s_per_call,
            "steps": steps,
        },
        "per_batch_size": batches,
        "best_batch_size": best,
        "images_per_hour": batches[best]["images_per_hour"] if best is not None else None,
        "batch1_seconds_per_image": batches[1]["seconds_per_image"] if 1 in batches else None,
    }


def render(projection: dict[str, Any]) -> str:
    """A Markdown table of a projection."""
    a = projection["assumptions"]
    out = [
        f"{projection['kind']}: {projection['gpu']}, {a['steps']} steps, compute efficiency "
        f"{a['compute_efficiency']:.0%}, memory efficiency {a['memory_efficiency']:.0%}, "
        f"bytes basis {a['bytes_basis']}",
        "",
        "| batch | UNet call ms | bound by | s/image | images/hour | memory GB | fits |",
        "|---:|---:|---|---:|---:|---:|---|",
    ]
    for b, row in sorted(projection["per_batch_size"].items()):
        out.append(
            f"| {b} | {row['unet_call_s'] * 1000:.0f} | {row['unet_bound_by']} | "
            f"{row['seconds_per_image']:.2f} | {row['images_per_hour']:,.0f} | "
            f"{row['memory_bytes'] / 1e9:.1f} | {'yes' if row['fits'] else 'no'} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Print the projection of a perf/gpu_bench.py results file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="a perf/gpu_bench.py results JSON")
    parser.add_argument("--compute-efficiency", type=float, default=COMPUTE_EFFICIENCY)
    parser.add_argument("--memory-efficiency", type=float, default=MEMORY_EFFICIENCY)
    parser.add_argument("--bytes-basis", choices=BYTES_BASES, default="operands")
    parser.add_argument("--overhead-ms", type=float, default=0.0, help="per UNet call")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    if results.get("unet_work", {}).get("status") != "ok":
        parser.error(f"{args.results} has no unet_work results")
    projection = project(
        results["unet_work"],
        int(results["settings"]["steps"]),
        compute_efficiency=args.compute_efficiency,
        memory_efficiency=args.memory_efficiency,
        bytes_basis=args.bytes_basis,
        overhead_s_per_call=args.overhead_ms / 1000,
    )
    print(render(projection))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
