"""A live preview of an image in progress, decoded from latents without the VAE.

The preview is a linear map of the four latent channels to RGB, one pixel per latent (an
eighth of the image's width and height). For SD 1.x/2.x latents these coefficients (a linear
fit of VAE-decoded colours to latents; the web UIs' "approximate cheap" preview) give
recognisable colours and shapes for twelve multiply-adds per pixel, where a VAE decode
costs about as much as a denoising step. A model with another
latent space (other channels or another VAE) gets wrong colours from it, not wrong images:
the final image is always the VAE's.
"""

from __future__ import annotations

import numpy as np
import torch

# latent channel x RGB
LATENT_RGB = torch.tensor(
    [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ]
)


def preview_pixels(latents: torch.Tensor) -> np.ndarray:
    """An (H/8)x(W/8)x3 uint8 preview of one row's 1x4x(H/8)x(W/8) latents."""
    coefficients = LATENT_RGB.to(latents.device, latents.dtype)
    rgb = torch.einsum("chw,cr->hwr", latents[0], coefficients)
    pixels = ((rgb + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)
    return pixels.cpu().numpy()
