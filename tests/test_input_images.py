"""Input images for image-to-image, as the gateway checks and fits them (one piece of logic;
tests/test_uploads.py sends the same files through the real gateway)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from gateway.contract import GenerationContract
from gateway.input_images import (
    InputImageError,
    Limits,
    decode,
    fit,
    normalized_png,
    target_size,
)

LIMITS = Limits(max_bytes=10_485_760, max_pixels=16_777_216)


def contract(**changes: object) -> GenerationContract:
    values: dict[str, object] = {
        "contract_version": 1,
        "model_name": "m",
        "model_version": "v",
        "schedulers": ("euler",),
        "default_scheduler": "euler",
        "min_size": 64,
        "max_size": 1024,
        "size_multiple": 8,
        "default_size": 128,
        "min_steps": 1,
        "max_steps": 50,
        "default_steps": 8,
        "min_guidance": 0.0,
        "max_guidance": 30.0,
        "default_guidance": 7.5,
        "unguided_at_most": 1.0,
        "max_prompt_chars": 2000,
        "max_prompt_tokens": 77,
        "prompt_overflow": "reject",
        "max_seed": 2**63 - 1,
        "min_strength": 0.0,
        "max_strength": 1.0,
        "default_strength": 0.75,
        "min_style_weight": 0.0,
        "max_style_weight": 2.0,
        "default_style_weight": 1.0,
        "max_rows": 8,
    }
    return GenerationContract.model_validate(values | changes)


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gradient(width: int, height: int) -> Image.Image:
    """Red rising left to right, green top to bottom, blue flat: every pixel tells where it
    is, so a turn or a crop shows."""
    red = np.broadcast_to(np.linspace(0, 255, width, dtype=np.uint8)[None, :], (height, width))
    green = np.broadcast_to(np.linspace(0, 255, height, dtype=np.uint8)[:, None], (height, width))
    blue = np.full((height, width), 90, np.uint8)
    return Image.fromarray(np.stack([red, green, blue], axis=2))


def noise(width: int, height: int) -> Image.Image:
    """Seeded random pixels: they do not compress, so a cut file lacks most of its data."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width x height, with a few bytes of data: what a
    decompression bomb looks like before it is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
        + chunk(b"IEND", b"")
    )


BAD_FILES = {
    "zero bytes": (b"", 422, "no bytes"),
    "an SVG": (b'<svg xmlns="http://www.w3.org/2000/svg"></svg>', 415, "SVG"),
    "a PDF named .png": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", 415, "PDF"),
    "a GIF": (encoded(gradient(8, 8), "GIF"), 415, "GIF"),
    "a truncated PNG": (encoded(noise(64, 64), "PNG")[:3000], 422, "truncated or corrupt"),
    "a 20000 x 20000 PNG": (png_claiming(20_000, 20_000), 413, "not decoded"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_files_are_refused_with_their_reason(name: str) -> None:
    data, status, reason = BAD_FILES[name]
    with pytest.raises(InputImageError) as refused:
        decode(data, LIMITS)
    assert refused.value.status == status and reason in refused.value.detail


def test_a_bomb_is_refused_by_its_header_before_any_decoding() -> None:
    # Its pixel data is a sliver of what the header claims: decoding it would fail as
    # truncated (422). 413 says the header was read and nothing more.
    with pytest.raises(InputImageError) as refused:
        decode(png_claiming(20_000, 20_000), LIMITS)
    assert refused.value.status == 413 and "not decoded" in refused.value.detail
    with pytest.raises(InputImageError) as refused:  # under PIL's limit, over ours
        decode(png_claiming(5_000, 4_000), LIMITS)
    assert refused.value.status == 413 and "5000x4000" in refused.value.detail
    with pytest.raises(InputImageError) as decoded:  # the same sliver at a small size
        decode(png_claiming(640, 640), LIMITS)
    assert decoded.value.status == 422 and "truncated or corrupt" in decoded.value.detail


def test_too_many_bytes_are_refused_before_reading() -> None:
    data = encoded(gradient(64, 64), "PNG")
    with pytest.raises(InputImageError) as refused:
        decode(data, Limits(max_bytes=len(data) - 1, max_pixels=LIMITS.max_pixels))
    assert refused.value.status == 413


def test_exif_orientation_is_applied() -> None:
    # A phone photo stored sideways: 64 wide, 32 high, EXIF orientation 6 (turn 90 degrees
    # clockwise to view): upright it is 32 wide and 64 high.
    stored = gradient(64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = decode(encoded(stored, "JPEG", exif=exif, quality=95), LIMITS)
    assert upright.size == (32, 64)
    expected = stored.transpose(Image.Transpose.ROTATE_270)
    difference = np.abs(np.asarray(upright, np.int16) - np.asarray(expected, np.int16))
    assert difference.mean() < 4  # JPEG's loss, not a wrong rotation (that differs by ~80)


def test_transparency_is_laid_over_white_and_webp_is_taken() -> None:
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    flat = decode(encoded(rgba, "PNG"), LIMITS)
    assert flat.mode == "RGB"
    assert flat.getpixel((5, 5)) == (255, 255, 255) and flat.getpixel((0, 0)) == (0, 0, 255)
    webp = decode(encoded(gradient(32, 16), "WEBP", lossless=True), LIMITS)
    assert webp.size == (32, 16)
    assert np.array_equal(np.asarray(webp), np.asarray(gradient(32, 16)))


@pytest.mark.parametrize(
    ("source", "width", "height", "expected"),
    [
        # Aspect kept at the default size's area (128 x 128), sides to multiples of 8.
        ((3000, 2000), None, None, (160, 104)),
        ((512, 512), None, None, (128, 128)),
        ((100, 4000), None, None, (64, 808)),  # the short side held at min_size
        ((4000, 10), None, None, (1024, 64)),  # the long side held at max_size
        # The request's size where given; a missing side follows the aspect ratio.
        ((3000, 2000), 256, 256, (256, 256)),
        ((3000, 2000), 240, None, (240, 160)),
        ((3000, 2000), None, 96, (144, 96)),
    ],
)
def test_the_size_rule(
    source: tuple[int, int],
    width: int | None,
    height: int | None,
    expected: tuple[int, int],
) -> None:
    assert target_size(source, width, height, contract()) == expected


def test_fit_covers_and_crops_about_the_centre() -> None:
    # A 200x100 image with a black left half and white right half, fitted to 100x100: the
    # middle square, half black and half white.
    two = Image.new("RGB", (200, 100), (0, 0, 0))
    two.paste((255, 255, 255), (100, 0, 200, 100))
    square = np.asarray(fit(two, (100, 100)))
    assert square.shape == (100, 100, 3)
    assert square[:, :45].max() == 0 and square[:, 55:].min() == 255


def test_an_upload_is_stored_as_a_png_at_the_rule_size() -> None:
    png, size = normalized_png(encoded(gradient(300, 200), "JPEG"), contract(), LIMITS)
    assert size == (160, 104)
    stored = Image.open(io.BytesIO(png))
    assert (stored.format, stored.mode, stored.size) == ("PNG", "RGB", (160, 104))
