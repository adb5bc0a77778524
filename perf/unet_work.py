"""Work per network call, counted on the device: the inputs of the T4 projection.

For one UNet call at each batch size (a guided image is two UNet rows), one text-encoder call
for one guided image (prompt and negative prompt) and one VAE decode of one image, each in the
pipeline's own dtype and attention:
  - `flops`: torch.utils.flop_counter.FlopCounterMode (matrix products, convolutions and
    fused attention; element-wise work is not counted);
  - `operand_bytes`: the bytes every aten operation reads and writes, summed over the call
    (each operation's tensor arguments and results, views excluded): the traffic of an
    unfused, eager execution with no reuse through the caches; an upper bound of what a
    compiled one moves;
  - `peak_activation_bytes`: torch.cuda.max_memory_allocated over the call above what was
    allocated before it (the working set beside the weights; None on a CPU);
  - `weights_bytes` of each network as loaded: the least a call reads.
On a CPU attention runs as SDPA's math backend, so that its matrix products are counted.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode


def _moves_data(func: Any) -> bool:
    """False for views: an operation whose result aliases an argument without writing it."""
    returns = func._schema.returns
    return not any(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _nbytes(tensor: torch.Tensor) -> int:
    """A tensor's bytes, a broadcast one's counted once (at most its storage)."""
    logical = tensor.numel() * tensor.element_size()
    try:
        return min(logical, tensor.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return logical


class OperandBytes(TorchDispatchMode):
    """Sums the bytes of every aten operation's tensor arguments and results, views excluded."""

    def __init__(self) -> None:
        """Start at zero bytes and zero operations."""
        super().__init__()
        self.bytes = 0
        self.operations = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        """Run the operation; count its operands' bytes unless it is a view."""
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _moves_data(func):
            leaves = tree_leaves((args, kwargs, out))
            self.bytes += sum(_nbytes(t) for t in leaves if isinstance(t, torch.Tensor))
            self.operations += 1
        return out


def measure(call: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """FLOPs, operand bytes, aten operations and peak activation bytes of one `call`."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    flops, operands = FlopCounterMode(display=False), OperandBytes()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    attention = nullcontext() if cuda else sdpa_kernel([SDPBackend.MATH])
    with torch.inference_mode(), attention, flops, operands:
        call()
    peak = None
    if cuda:
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    return {
        "flops": int(flops.get_total_flops()),
        "operand_bytes": operands.bytes,
        "aten_operations": operands.operations,
        "peak_activation_bytes": peak,
    }


def weights_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def pipeline_work(pipe: Any, *, size: int, batch_sizes: list[int]) -> dict[str, Any]:
    """Work per call of a diffusers StableDiffusionPipeline's networks at `size` x `size`:
    the UNet at each guided batch size (2 rows per image), the text encoder for one guided
    image, the VAE decoder for one image."""
    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    device, dtype = unet.device, unet.dtype
    latent = size // pipe.vae_scale_factor
    channels = unet.config.in_channels
    hidden = pipe.text_encoder.config.hidden_size
    generator = torch.Generator("cpu").manual_seed(0)

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype)

    per_batch = {}
    for b in batch_sizes:
        rows = 2 * b
        sample, context = noise(rows, channels, latent, latent), noise(rows, 77, hidden)
        timestep = torch.full((rows,), 500.0, device=device)
        per_batch[b] = {
            "unet_rows": rows,
            **measure(partial(unet, sample, timestep, context, return_dict=False), device),
        }
    ids = torch.randint(0, pipe.tokenizer.vocab_size, (2, 77), generator=generator).to(device)
    latents = noise(1, channels, latent, latent)
    return {
        "size": size,
        "dtype": str(dtype),
        "device": str(device),
        "weights_bytes": {
            "unet": weights_bytes(unet),
            "text_encoder": weights_bytes(pipe.text_encoder),
            "vae": weights_bytes(pipe.vae),
        },
        "unet_per_call": per_batch,
        "text_encoder_per_image": measure(lambda: pipe.text_encoder(ids), device),
        "vae_decoder_per_image": measure(lambda: pipe.vae.decode(latents), device),
    }
