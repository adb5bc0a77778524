"""Runners for the networks, one per runtime. Each takes its inputs in the manifest's order.

Every component takes and returns torch tensors on its `device`, in float32 (token ids in
int64), whatever precision it computes in. The pipeline core keeps latents on that device
across the denoising steps, so a GPU runtime makes no host round trip per step.

| runtime            | device         | precision                  | verified                  |
|--------------------|----------------|----------------------------|---------------------------|
| `onnxruntime`      | CPU            | fp32                       | here (CPU tests)          |
| `torch`            | CUDA, else CPU | fp16 on CUDA, fp32 on CPU  | CPU here; CUDA not yet run |
| `torch` + compile  | CUDA, else CPU | as above, UNet compiled    | CPU here; CUDA not yet run |
| `onnxruntime_cuda` | CUDA           | fp32                       | needs onnxruntime-gpu     |
| `tensorrt`         | CUDA           | fp16 engines               | needs TensorRT            |

`torch_compile` compiles the torch runtime's UNet with torch.compile (dynamic shapes, so one
compilation serves every batch the batcher forms); mode "reduce-overhead" replays CUDA graphs.

The CUDA paths run only on a GPU; the CPU machine has none, and no session has yet been lent
the GPU machine with time to run perf/gpu_bench.py. The last two need onnxruntime-gpu or
TensorRT as well, which the lent GPU machine lacks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from sd_engines import (
    ENGINE_MANIFEST,
    ENGINES_DIR,
    EngineMismatch,
    current_gpu_key,
    describe_profiles,
    profile_covers,
    select_engines,
)

RUNTIMES = ("onnxruntime", "onnxruntime_cuda", "torch", "tensorrt")
# torch.compile modes for the torch runtime's UNet ("" = eager). "reduce-overhead" adds CUDA
# graphs on a GPU: small batches are bound by kernel launches, which a graph replays at once.
COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class Component(Protocol):
    device: torch.device

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor: ...


def _symbolic_dims(spec: dict[str, Any], inputs: tuple[torch.Tensor, ...]) -> dict[str, int]:
    dims: dict[str, int] = {}
    for t, x in zip(spec["inputs"], inputs, strict=True):
        for d, n in zip(t["shape"], x.shape, strict=True):
            if isinstance(d, str):
                dims[d] = int(n)
    return dims


def output_shape(
    spec: dict[str, Any], geometry: dict[str, Any], inputs: tuple[torch.Tensor, ...]
) -> tuple[int, ...]:
    """The first output's shape for these inputs, from the manifest's symbolic shapes."""
    dims = _symbolic_dims(spec, inputs)
    dims.setdefault("sequence", geometry["sequence"])
    dims.setdefault("hidden", geometry["hidden"])
    dims.setdefault("latent_channels", geometry["latent_channels"])
    if "latent_height" in dims:
        dims["image_height"] = dims["latent_height"] * geometry["vae_scale_factor"]
        dims["image_width"] = dims["latent_width"] * geometry["vae_scale_factor"]
    return tuple(d if isinstance(d, int) else dims[d] for d in spec["outputs"][0]["shape"])


def _ort_session(path: Path, threads: int, providers: list[Any]) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # per model instance, or instances fight
    options.inter_op_num_threads = 1
    # Spinning workers starve the server's and other instances' threads between calls.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=providers)


class OnnxRuntimeComponent:
    """One ONNX file in an ONNX Runtime CPU session (numpy views of CPU tensors, no copy)."""

    device = torch.device("cpu")

    def __init__(self, folder: Path, spec: dict[str, Any], *, threads: int) -> None:
        self.session = _ort_session(folder / spec["file"], threads, ["CPUExecutionProvider"])
        self.input_names = [t["name"] for t in spec["inputs"]]
        self.input_dtypes = [np.dtype(t["dtype"]) for t in spec["inputs"]]
        self.output_name = spec["outputs"][0]["name"]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        feed = {
            name: np.ascontiguousarray(x.numpy(), dtype=dtype)
            for name, dtype, x in zip(self.input_names, self.input_dtypes, inputs, strict=True)
        }
        return torch.from_numpy(self.session.run([self.output_name], feed)[0])


class OnnxRuntimeCudaComponent:
    """ONNX Runtime's CUDA execution provider with IO binding on torch CUDA tensors.

    Inputs and the output stay in GPU memory: ONNX Runtime reads and writes the torch
    tensors' buffers directly. Verified only where onnxruntime-gpu and a CUDA GPU exist;
    the CPU test machine and the lent GPU machine have neither (see DESIGN.md).
    """

    def __init__(
        self, folder: Path, spec: dict[str, Any], geometry: dict[str, Any], *, threads: int
    ) -> None:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(
                "runtime onnxruntime_cuda needs onnxruntime-gpu and a CUDA GPU; this "
                f"onnxruntime offers {ort.get_available_providers()}"
            )
        self.device = torch.device("cuda", torch.cuda.current_device())
        providers = [
            ("CUDAExecutionProvider", {"device_id": self.device.index}),
            "CPUExecutionProvider",
        ]
        self.session = _ort_session(folder / spec["file"], threads, providers)
        self.spec, self.geometry = spec, geometry
        self.input_dtypes = [getattr(torch, t["dtype"]) for t in spec["inputs"]]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        binding = self.session.io_binding()
        kept = []  # the contiguous copies must outlive run_with_iobinding
        for t, dtype, x in zip(self.spec["inputs"], self.input_dtypes, inputs, strict=True):
            x = x.to(self.device, dtype).contiguous()
            kept.append(x)
            binding.bind_input(
                t["name"],
                "cuda",
                self.device.index,
                np.dtype(t["dtype"]),
                tuple(x.shape),
                x.data_ptr(),
            )
        out = torch.empty(
            output_shape(self.spec, self.geometry, tuple(kept)),
            dtype=torch.float32,
            device=self.device,
        )
        binding.bind_output(
            self.spec["outputs"][0]["name"],
            "cuda",
            self.device.index,
            np.float32,
            tuple(out.shape),
            out.data_ptr(),
        )
        torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch
        self.session.run_with_iobinding(binding)
        return out


class TensorRTComponent:
    """A TensorRT engine (`engines/<component>.<gpu-key>.plan`), torch CUDA tensors as I/O.

    Written against TensorRT 10's Python runtime API (named tensors, `set_input_shape`,
    `set_tensor_address`, `execute_async_v3` on torch's current stream). Verified only where
    TensorRT and a CUDA GPU exist: neither this machine nor the lent GPU machine has
    TensorRT, so no test here runs it.
    """

    def __init__(self, plan: Path, spec: dict[str, Any], entry: dict[str, Any]) -> None:
        import tensorrt as trt

        self.engine_entry = entry  # its profiles: the pipeline refuses sizes they lack
        self.device = torch.device("cuda", torch.cuda.current_device())
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {plan}")
        self.context = self.engine.create_execution_context()
        self.profile = 0  # a fresh context uses profile 0
        self.input_names = [t["name"] for t in spec["inputs"]]
        self.input_dtypes = [getattr(torch, t["dtype"]) for t in spec["inputs"]]
        self.output_name = spec["outputs"][0]["name"]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        stream = torch.cuda.current_stream(self.device)
        shapes = {n: tuple(x.shape) for n, x in zip(self.input_names, inputs, strict=True)}
        wanted = next(
            (i for i, p in enumerate(self.engine_entry["profiles"]) if profile_covers(p, shapes)),
            None,
        )
        if wanted is None:
            raise EngineMismatch(
                f"{self.engine_entry['file']}: no optimisation profile holds {shapes}; its "
                f"profiles: {describe_profiles(self.engine_entry)}"
            )
        if wanted != self.profile:
            self.context.set_optimization_profile_async(wanted, stream.cuda_stream)
            self.profile = wanted
        kept = []
        for name, dtype, x in zip(self.input_names, self.input_dtypes, inputs, strict=True):
            x = x.to(self.device, dtype).contiguous()
            kept.append(x)
            self.context.set_input_shape(name, tuple(x.shape))
            self.context.set_tensor_address(name, x.data_ptr())
        shape = tuple(self.context.get_tensor_shape(self.output_name))
        out = torch.empty(shape, dtype=torch.float32, device=self.device)
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.output_name} failed")
        return out  # ordered on torch's stream: later torch ops see the result


class TorchComponent:
    """A diffusers network from the `diffusers/` copy the export writes (safetensors).

    fp16 on CUDA, fp32 on CPU. Inputs and output in float32 on `device`; the network computes
    in its own dtype. The CPU path is tested here against diffusers; CUDA only on a GPU.
    Unlike ONNX Runtime's CPU path, torch's kernels depend on the batch size, so a row's image
    may differ by one 8-bit level with its batch mates (tests/test_runtimes.py measures it).
    """

    def __init__(
        self, name: str, module: torch.nn.Module, device: torch.device, compile_mode: str = ""
    ) -> None:
        self.name, self.module, self.device = name, module, device
        self.dtype = next(module.parameters()).dtype
        # One compilation for every batch size and image size the batcher forms (dynamic
        # shapes); with CUDA graphs, torch records one graph per shape on first use.
        self.compiled = bool(compile_mode)
        self.forward: Any = (
            torch.compile(module, mode=compile_mode, dynamic=True) if compile_mode else module
        )

    @torch.inference_mode()
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.name == "text_encoder":
            (ids,) = inputs
            out = self.module(ids.to(self.device), return_dict=False)[0]
        elif self.name == "unet":
            sample, timestep, context = inputs
            rows = sample.shape[0]
            if self.compiled and rows == 1:
                # torch specialises a dimension of size 1, which would cost a second
                # compilation: an unguided single row runs as two copies instead.
                sample, timestep, context = (torch.cat([x, x]) for x in inputs)
            out = self.forward(
                sample.to(self.device, self.dtype),
                timestep.to(self.device),  # float32: fractional timesteps survive
                context.to(self.device, self.dtype),
                return_dict=False,
            )[0][:rows]
        else:
            (latents,) = inputs
            decode: Any = self.module.decode  # AutoencoderKL.decode
            out = decode(latents.to(self.device, self.dtype), return_dict=False)[0]
        return out.float()  # a copy on CUDA (fp16): a replayed CUDA graph reuses `out`


def _torch_components(
    folder: Path, manifest: dict[str, Any], compile_mode: str
) -> dict[str, Component]:
    if "diffusers" not in manifest:
        raise RuntimeError(
            f"{folder}: runtime torch needs the diffusers copy that `python -m export onnx` "
            "writes beside the ONNX files; re-run the export"
        )
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    source = folder / manifest["diffusers"]
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    modules: dict[str, torch.nn.Module] = {
        "text_encoder": CLIPTextModel.from_pretrained(source / "text_encoder", torch_dtype=dtype),
        "unet": UNet2DConditionModel.from_pretrained(source / "unet", torch_dtype=dtype),
        "vae_decoder": AutoencoderKL.from_pretrained(source / "vae", torch_dtype=dtype),
    }
    return {
        name: TorchComponent(
            name, module.to(device).eval(), device, compile_mode if name == "unet" else ""
        )
        for name, module in modules.items()
    }


def _tensorrt_components(
    folder: Path, manifest: dict[str, Any], max_batch_size: int
) -> dict[str, Component]:
    engines_dir = folder / ENGINES_DIR
    manifest_file = engines_dir / ENGINE_MANIFEST
    if not manifest_file.is_file():
        raise EngineMismatch(
            f"runtime tensorrt: {manifest_file} does not exist; build the engines on this GPU "
            "with `python -m export tensorrt`"
        )
    engines = json.loads(manifest_file.read_text())
    key = current_gpu_key()
    geo = manifest["geometry"]
    chosen = select_engines(
        engines,
        manifest,
        key,
        max_batch_size=max_batch_size,
        sizes=[(geo["default_size"], geo["default_size"])],
    )
    return {
        name: TensorRTComponent(engines_dir / entry["file"], manifest["components"][name], entry)
        for name, entry in chosen.items()
    }


def load_components(
    folder: Path,
    manifest: dict[str, Any],
    runtime: str,
    threads: int,
    *,
    max_batch_size: int = 1,
    compile_mode: str = "",
) -> dict[str, Component]:
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")
    if compile_mode not in COMPILE_MODES:
        raise ValueError(
            f"unknown torch_compile mode {compile_mode!r}; choose from "
            f"{', '.join(repr(m) for m in COMPILE_MODES)}"
        )
    if compile_mode and runtime != "torch":
        raise ValueError(f"torch_compile {compile_mode!r} applies to runtime torch, not {runtime}")
    if runtime == "torch":
        return _torch_components(folder, manifest, compile_mode)
    if manifest.get("runtime", "onnx") != "onnx":
        raise RuntimeError(
            f"{folder} holds no ONNX files (exported with --torch-only): use runtime torch, "
            "or re-run `python -m export onnx` without --torch-only"
        )
    if runtime == "tensorrt":
        return _tensorrt_components(folder, manifest, max_batch_size)
    if runtime == "onnxruntime_cuda":
        return {
            name: OnnxRuntimeCudaComponent(folder, spec, manifest["geometry"], threads=threads)
            for name, spec in manifest["components"].items()
        }
    return {
        name: OnnxRuntimeComponent(folder, spec, threads=threads)
        for name, spec in manifest["components"].items()
    }
