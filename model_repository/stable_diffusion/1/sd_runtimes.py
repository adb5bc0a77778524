"""Runners for the networks, one per runtime. Each takes its inputs in the manifest's order.

Every component takes and returns torch tensors on its `device`, in float32 (token ids in
int64), whatever precision it computes in. The pipeline core keeps latents on that device
across the denoising steps, so a GPU runtime makes no host round trip per step.

| runtime            | device         | precision                  | verified here            |
|--------------------|----------------|----------------------------|--------------------------|
| `onnxruntime`      | CPU            | fp32                       | yes (CPU tests)          |
| `torch`            | CUDA, else CPU | fp16 on CUDA, fp32 on CPU  | CPU; CUDA where a GPU is |
| `torch` + compile  | CUDA, else CPU | as above, UNet compiled    | CPU; CUDA where a GPU is |
| `onnxruntime_cuda` | CUDA           | fp32                       | needs onnxruntime-gpu    |
| `tensorrt`         | CUDA           | fp16 engines               | needs TensorRT           |

`torch_compile` compiles the torch runtime's UNet with torch.compile (dynamic shapes, so one
compilation serves every batch the batcher forms); mode "reduce-overhead" replays CUDA graphs.

The CUDA paths run only on a CUDA GPU, the last two only with onnxruntime-gpu or TensorRT
installed; this repository's CI has none of these, so their tests skip there.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from sd_contract import ConfigError
from sd_engines import (
    EngineMismatch,
    current_gpu,
    describe_profiles,
    profile_covers,
    select_engines,
)
from sd_weights import load_engine_manifest, output_shape, weights_file

RUNTIMES = ("onnxruntime", "onnxruntime_cuda", "torch", "tensorrt")
# torch.compile modes for the torch runtime's UNet ("" = eager). "reduce-overhead" adds CUDA
# graphs on a GPU: small batches are bound by kernel launches, which a graph replays at once.
COMPILE_MODES = ("", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def positive_integer(parameters: Mapping[str, str], name: str) -> int:
    """The config parameter `name` as an integer of at least 1; ConfigError names it when
    it is missing or anything else."""
    if name not in parameters:
        raise ConfigError(f"model config parameter {name} is missing")
    value = parameters[name]
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise ConfigError(f"model config parameter {name} {value!r} is not a positive integer")
    return int(value)


@dataclass(frozen=True)
class RuntimeSettings:
    """How the networks run: from the model config's parameters `runtime`,
    `intra_op_threads`, `torch_compile` and `style_memory_mb` (no defaults: config.pbtxt
    sets each). `style_memory_mb` 0 serves no styles."""

    runtime: str
    threads: int
    compile_mode: str
    style_memory_mb: int = 0

    @classmethod
    def from_config(cls, parameters: Mapping[str, str]) -> RuntimeSettings:
        """The settings in the config's parameters, checked."""
        for name in ("runtime", "intra_op_threads", "torch_compile", "style_memory_mb"):
            if name not in parameters:
                raise ConfigError(f"model config parameter {name} is missing")
        threads = positive_integer(parameters, "intra_op_threads")
        budget = parameters["style_memory_mb"]
        if not (budget.isascii() and budget.isdigit()):
            raise ConfigError(
                f"model config parameter style_memory_mb {budget!r} is not an integer of 0 or more"
            )
        return cls(parameters["runtime"], threads, parameters["torch_compile"], int(budget))

    @property
    def torch_threads(self) -> int:
        """The CPU threads for torch's own operations: `threads` on runtime torch, whose
        networks they run; 1 on the others, where torch does only the arithmetic between the
        networks (schedulers, guidance, previews, pixels, style merges). A pool gains little
        there, and its workers wait busy after each parallel operation (GNU OpenMP's
        default), taking the cores from ONNX Runtime's threads and the server's."""
        return self.threads if self.runtime == "torch" else 1

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ConfigError(
                f"model config parameter runtime {self.runtime!r}: choose from "
                f"{', '.join(RUNTIMES)}"
            )
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(
                f"model config parameter torch_compile {self.compile_mode!r}: choose from "
                f"{', '.join(repr(m) for m in COMPILE_MODES)}"
            )
        if self.compile_mode and self.runtime != "torch":
            raise ConfigError(
                f"model config parameter torch_compile {self.compile_mode!r} applies to "
                f"runtime torch, not {self.runtime}"
            )


class Component(Protocol):
    """A network on a device: torch tensors in (the manifest's input order), one out."""

    device: torch.device

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The network's first output for these inputs, on `device`, float32."""
        ...


def ort_session(
    path: Path, threads: int, providers: list[Any], overridable: Collection[str] = ()
) -> Any:
    """An ONNX Runtime session on `path` with `threads` intra-op threads, quiet and not
    spinning, on the first of `providers` that can run it; the initializers `overridable`
    may be overridden by a run's feed (`sd_style_onnx.overridable_model`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # per model instance, or instances fight
    options.inter_op_num_threads = 1
    # Spinning workers starve the server's and other instances' threads between calls.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    if not overridable:
        return ort.InferenceSession(str(path), options, providers=providers)
    from sd_style_onnx import overridable_model

    # The model comes as bytes: its external data is found in its own folder.
    options.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str(path.parent)
    )
    model = overridable_model(path, overridable)
    return ort.InferenceSession(model, options, providers=providers)


class OnnxRuntimeComponent:
    """One ONNX file in an ONNX Runtime CPU session (numpy views of CPU tensors, no copy).

    `style_targets` (module name -> `sd_style_onnx.Target`) are the weights a style may
    change, and `overrides` (initializer name -> array) the values a style gives them now.
    Without overrides a call runs the plain session, whose weights ONNX Runtime pre-packs;
    with them, a second session whose style targets are overridable initializers (which
    ONNX Runtime cannot pre-pack: a call is slower), made at the first styled call, so a
    deployment that serves no style pays neither its memory nor its speed."""

    device = torch.device("cpu")

    def __init__(
        self,
        folder: Path,
        spec: dict[str, Any],
        *,
        threads: int,
        style_targets: dict[str, Any] | None = None,
    ) -> None:
        self.path, self.threads = folder / spec["file"], threads
        self.style_targets = style_targets or {}
        self.overrides: dict[str, np.ndarray] = {}
        self.session = ort_session(self.path, threads, ["CPUExecutionProvider"])
        self._styled_session: Any = None
        self.input_names = [t["name"] for t in spec["inputs"]]
        self.input_dtypes = [np.dtype(t["dtype"]) for t in spec["inputs"]]
        self.output_name = spec["outputs"][0]["name"]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The network's output for these inputs, float32 on `device`."""
        feed = {
            name: np.ascontiguousarray(x.numpy(), dtype=dtype)
            for name, dtype, x in zip(self.input_names, self.input_dtypes, inputs, strict=True)
        }
        session = self.session
        if self.overrides:
            session = self.styled_session()
            feed.update(self.overrides)
        return torch.from_numpy(session.run([self.output_name], feed)[0])

    def styled_session(self) -> Any:
        """The session whose style targets a run may override (made once, when first asked)."""
        if self._styled_session is None:
            overridable = {t.initializer for t in self.style_targets.values()}
            self._styled_session = ort_session(
                self.path, self.threads, ["CPUExecutionProvider"], overridable
            )
        return self._styled_session


class OnnxRuntimeCudaComponent:
    """ONNX Runtime's CUDA execution provider with IO binding on torch CUDA tensors.

    Inputs and the output stay in GPU memory: ONNX Runtime reads and writes the torch
    tensors' buffers directly; the output is allocated at the shape the manifest gives for
    the inputs. Verified only where onnxruntime-gpu and a CUDA GPU exist; this repository's
    CI has neither.
    """

    def __init__(
        self, folder: Path, manifest: Mapping[str, Any], name: str, *, threads: int
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
        self.manifest, self.name = manifest, name
        self.spec = manifest["components"][name]
        self.session = ort_session(folder / self.spec["file"], threads, providers)
        self.input_dtypes = [getattr(torch, t["dtype"]) for t in self.spec["inputs"]]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The network's output for these inputs, float32 on `device`."""
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
            output_shape(self.manifest, self.name, [tuple(x.shape) for x in kept]),
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
    """A TensorRT plan from the engines folder, torch CUDA tensors as I/O.

    Written against TensorRT 10's Python runtime API (named tensors, `set_input_shape`,
    `set_tensor_address`, `execute_async_v3` on torch's current stream). Verified only where
    TensorRT and a CUDA GPU exist; this repository's CI has neither.
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
        """The network's output for these inputs, float32 on `device`."""
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
        """The network's output for these inputs, float32 on `device`."""
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
        elif self.name == "vae_encoder":
            (images,) = inputs
            encode: Any = self.module.encode  # AutoencoderKL.encode: the posterior's moments
            out = encode(images.to(self.device, self.dtype), return_dict=False)[0].parameters
        else:
            (latents,) = inputs
            decode: Any = self.module.decode  # AutoencoderKL.decode
            out = decode(latents.to(self.device, self.dtype), return_dict=False)[0]
        return out.float()  # a copy on CUDA (fp16): a replayed CUDA graph reuses `out`


def _torch_components(
    folder: Path, manifest: dict[str, Any], compile_mode: str
) -> dict[str, Component]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    source = folder / manifest["diffusers"]
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    vae = AutoencoderKL.from_pretrained(source / "vae", torch_dtype=dtype)  # decodes and encodes
    modules: dict[str, torch.nn.Module] = {
        "text_encoder": CLIPTextModel.from_pretrained(source / "text_encoder", torch_dtype=dtype),
        "unet": UNet2DConditionModel.from_pretrained(source / "unet", torch_dtype=dtype),
        "vae_decoder": vae,
        "vae_encoder": vae,
    }
    return {
        name: TorchComponent(
            name, module.to(device).eval(), device, compile_mode if name == "unet" else ""
        )
        for name, module in modules.items()
    }


def _tensorrt_components(
    folder: Path, manifest: dict[str, Any], *, max_batch_size: int, default_size: int
) -> dict[str, Component]:
    engines = load_engine_manifest(folder)
    chosen = select_engines(
        engines,
        manifest,
        current_gpu(),
        max_batch_size=max_batch_size,
        sizes=[(default_size, default_size)],
    )
    engines_dir = folder / weights_file("engines_dir")
    return {
        name: TensorRTComponent(engines_dir / entry["file"], manifest["components"][name], entry)
        for name, entry in chosen.items()
    }


def load_components(
    folder: Path,
    manifest: dict[str, Any],
    settings: RuntimeSettings,
    *,
    max_batch_size: int,
    default_size: int,
) -> dict[str, Component]:
    """text_encoder, unet, vae_decoder and vae_encoder on `settings.runtime`. TensorRT engines must
    cover batches of 1..max_batch_size images at the default size."""
    if settings.runtime == "torch":
        return _torch_components(folder, manifest, settings.compile_mode)
    if manifest["runtime"] != "onnx":
        raise RuntimeError(
            f"{folder} holds no ONNX files (exported with --torch-only): use runtime torch, "
            "or re-run `python -m export onnx` without --torch-only"
        )
    if settings.runtime == "tensorrt":
        return _tensorrt_components(
            folder, manifest, max_batch_size=max_batch_size, default_size=default_size
        )
    if settings.runtime == "onnxruntime_cuda":
        return {
            name: OnnxRuntimeCudaComponent(folder, manifest, name, threads=settings.threads)
            for name in manifest["components"]
        }
    from sd_style_onnx import style_targets

    # The weights styles may change, where styles are served.
    targets = style_targets(folder, manifest) if settings.style_memory_mb else {}
    return {
        name: OnnxRuntimeComponent(
            folder, spec, threads=settings.threads, style_targets=targets.get(name)
        )
        for name, spec in manifest["components"].items()
    }
