"""What TensorRT engines are built for: batches and sizes, as optimisation profiles.

A plan holds one or more optimisation profiles, each a box of input shapes from `min` to
`max` (tuned for `opt`). Batches run from one unguided image to `max_batch_size` guided
images: the rows each network sees come from its `ComponentSpec.rows_per_image` (the text
encoder and the UNet see two rows per guided image), the other dimensions from the weights
manifest's dimension table. Sizes are either one dynamic profile over min_size..max_size or
one profile per `--sizes` entry (the fastest engines).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from export.components import ComponentSpec, Dimension, dimension_sizes
from export.errors import ExportError

Size = tuple[int, int]  # (width, height) in pixels
Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


def parse_sizes(text: str) -> list[Size]:
    """'512x512,768x512' -> [(512, 512), (768, 512)] as (width, height)."""
    sizes = []
    for item in text.split(","):
        try:
            width, height = (int(v) for v in item.strip().lower().split("x"))
        except ValueError as exc:
            raise ExportError(f"size {item!r} is not WIDTHxHEIGHT, e.g. 512x512") from exc
        sizes.append((width, height))
    return sizes


@dataclass(frozen=True)
class ProfilePlan:
    """What to build for: batches, and either a size range or a list of fixed sizes."""

    max_batch_size: int
    opt_batch: int
    size_multiple: int
    min_size: int
    max_size: int
    opt_size: Size
    sizes: tuple[Size, ...] = ()  # empty: one dynamic profile over min_size..max_size

    @classmethod
    def make(
        cls,
        *,
        max_batch_size: int,
        size_multiple: int,
        min_size: int,
        max_size: int,
        default_size: int,
        sizes: list[Size] | None = None,
        opt_batch: int | None = None,
    ) -> ProfilePlan:
        """Checked against the config's limits; sizes rounded inwards to the multiple."""
        if max_batch_size < 1:
            raise ExportError(f"max batch size {max_batch_size} must be at least 1")
        low = -(-min_size // size_multiple) * size_multiple
        high = max_size // size_multiple * size_multiple
        if low > high:
            raise ExportError(
                f"no size between min_size {min_size} and max_size {max_size} is a multiple "
                f"of the model's size multiple {size_multiple}"
            )
        for width, height in sizes or []:
            for name, value in (("width", width), ("height", height)):
                if value % size_multiple or not low <= value <= high:
                    raise ExportError(
                        f"{name} {value} of size {width}x{height}: sizes must be multiples of "
                        f"{size_multiple} within {low}..{high} (the model config's min_size "
                        "and max_size)"
                    )
        opt_b = min(max_batch_size, opt_batch or min(4, max_batch_size))
        if opt_b < 1:
            raise ExportError(f"opt batch {opt_batch} must be at least 1")
        opt = min(max(default_size, low), high) // size_multiple * size_multiple
        return cls(
            max_batch_size=max_batch_size,
            opt_batch=opt_b,
            size_multiple=size_multiple,
            min_size=low,
            max_size=high,
            opt_size=sizes[0] if sizes else (opt, opt),
            sizes=tuple(sizes or ()),
        )

    def boxes(self) -> list[tuple[Size, Size, Size]]:
        """(smallest, tuned-for, largest) image size of each profile."""
        if not self.sizes:
            low, high = (self.min_size,) * 2, (self.max_size,) * 2
            return [(low, self.opt_size, high)]
        return [(size, size, size) for size in self.sizes]


def profiles(
    spec: ComponentSpec, dimensions: Mapping[str, Dimension], plan: ProfilePlan
) -> list[Profile]:
    """TensorRT profiles for `spec`: per input, (min, opt, max) shapes; `dimensions` is the
    weights manifest's dimension table."""

    def dims(images: int, guided: bool, size: Size) -> dict[str, int]:
        width, height = size
        rows = spec.rows(images, guided=guided)
        return dimension_sizes(dimensions, rows=rows, height=height, width=width)

    return [
        spec.profile(
            dims(1, False, low),
            dims(plan.opt_batch, True, opt),
            dims(plan.max_batch_size, True, high),
        )
        for low, opt, high in plan.boxes()
    ]


def profiles_as_manifest(built: list[Profile]) -> list[dict[str, dict[str, list[int]]]]:
    """Profiles as the engine manifest records them: {input: {min, opt, max}}."""
    return [
        {
            name: {"min": list(lo), "opt": list(op), "max": list(hi)}
            for name, (lo, op, hi) in p.items()
        }
        for p in built
    ]
