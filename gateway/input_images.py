"""Input images for image-to-image: what a client may send, and the size the model gets.

An input image is checked before anything decodes it: its bytes counted, its type read
from the bytes themselves (PNG, JPEG and WebP; never from a name or a declared type), and
its width and height read from its header, so a decompression bomb (a small file of
enormous dimensions) is refused unread. Then it is decoded whole (a truncated file fails
here), turned upright as its EXIF orientation says, and flattened to RGB (transparency over
white: a sketch on a transparent layer is a sketch on paper).

The size rule: a request's width and height, where it gives them, are the image's size; a
missing one follows the input image's aspect ratio. With neither, the image keeps its aspect
ratio at the area of the model's default size (default_size x default_size). Each side is
rounded to the nearest multiple of size_multiple within [min_size, max_size]. The image is
then scaled to cover that size and cropped to it about its centre (`fit`).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from gateway.contract import GenerationContract

# Formats taken, by PIL's name; WebP is recognised by its RIFF header below.
SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}
# What a refused file most likely is, for the message (first bytes, stripped of whitespace).
KNOWN_OTHERS = {
    b"%PDF": "a PDF document",
    b"<svg": "an SVG image",
    b"<?xml": "an XML document (SVG?)",
    b"GIF8": "a GIF image",
    b"BM": "a BMP image",
}


class InputImageError(Exception):
    """An input image the gateway does not take: the HTTP status, a title and why."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail = status, title, detail


@dataclass(frozen=True)
class Limits:
    """The most bytes and pixels (width x height) an input image may have."""

    max_bytes: int
    max_pixels: int


def sniff(data: bytes) -> str:
    """The image format of `data` by its first bytes: PNG, JPEG or WEBP; else 415 (or 422
    for no bytes at all)."""
    if not data:
        raise InputImageError(422, "Empty image", "the image has no bytes")
    for signature, fmt in SIGNATURES.items():
        if data.startswith(signature):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    head = data[:64].lstrip()
    seen = next((what for magic, what in KNOWN_OTHERS.items() if head.startswith(magic)), None)
    raise InputImageError(
        415,
        "Unsupported Media Type",
        "input images must be PNG, JPEG or WebP"
        + (f"; this is {seen}" if seen else "; these bytes are none of them"),
    )


def decode(data: bytes, limits: Limits) -> Image.Image:
    """`data` as an upright RGB image, refused (InputImageError) over the limits before it is
    decoded, or when it is not a whole PNG, JPEG or WebP image."""
    if len(data) > limits.max_bytes:
        raise InputImageError(
            413, "Content Too Large", f"the image is over {limits.max_bytes} bytes"
        )
    fmt = sniff(data)
    too_many = f"at most {limits.max_pixels} pixels are taken (it was not decoded)"
    try:
        image = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:  # PIL's own, far larger, limit
        raise InputImageError(413, "Content Too Large", f"{exc}; {too_many}") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputImageError(422, "Unreadable image", f"the {fmt} header is broken") from exc
    width, height = image.size
    if width * height > limits.max_pixels:
        raise InputImageError(
            413, "Content Too Large", f"the image is {width}x{height} pixels; {too_many}"
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputImageError(
            422, "Unreadable image", f"the {fmt} image is truncated or corrupt ({exc})"
        ) from exc
    return flatten(ImageOps.exif_transpose(image))


def flatten(image: Image.Image) -> Image.Image:
    """RGB, with any transparency laid over white."""
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def header_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a stored image, read from its header: the forge writes its images
    upright and without EXIF, so the header's size is the image's."""
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def allowed(length: float, contract: GenerationContract) -> int:
    """`length` rounded to the nearest multiple of size_multiple within the size bounds."""
    m = contract.size_multiple
    low, high = math.ceil(contract.min_size / m) * m, contract.max_size // m * m
    return min(max(round(length / m) * m, low), high)


def target_size(
    source: tuple[int, int],
    width: int | None,
    height: int | None,
    contract: GenerationContract,
) -> tuple[int, int]:
    """(width, height) of an image made from a `source`-sized input image: the request's
    width and height where given, else the module docstring's rule."""
    aspect = source[0] / source[1]
    if width is not None and height is not None:
        return width, height
    if width is not None:
        return width, allowed(width / aspect, contract)
    if height is not None:
        return allowed(height * aspect, contract), height
    scale = contract.default_size / math.sqrt(source[0] * source[1])
    return allowed(source[0] * scale, contract), allowed(source[1] * scale, contract)


def fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` scaled to cover `size` (width, height) and cropped to it about its centre."""
    if image.size == size:
        return image
    return ImageOps.fit(image, size, method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def normalized_png(
    data: bytes, contract: GenerationContract, limits: Limits
) -> tuple[bytes, tuple[int, int]]:
    """An uploaded image checked, decoded, upright, flattened and fitted to the size the
    rule gives it: its PNG bytes (what the forge stores) and (width, height)."""
    image = decode(data, limits)
    size = target_size(image.size, None, None, contract)
    buffer = io.BytesIO()
    fit(image, size).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue(), size


def pixels(data: bytes, size: tuple[int, int], limits: Limits) -> np.ndarray:
    """A stored image's height x width x 3 uint8 pixels at `size` (width, height)."""
    return np.asarray(fit(decode(data, limits), size), dtype=np.uint8)
