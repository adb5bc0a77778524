"""Hides the machine's packages that were built for a newer numpy than the one first on the path.

perf/gpu_device.sh puts numpy 1.26 (which Triton 2.51's Python backend stub needs) before
the GPU machine's own environment, whose compiled packages may require numpy 2 (scipy 1.18
does). diffusers imports scipy wherever it is installed; built for numpy 2, its import fails
under numpy 1.26 and takes diffusers' schedulers with it. Each package in WATCHED whose
declared numpy requirement the first numpy does not meet is made absent, as if not installed
(`sys.modules[name] = None`: importlib.util.find_spec answers None, an import raises
ImportError), so that the libraries that probe for it go on without it.

gpu_device.sh copies this file into the benchmark's venv as `forge_numpy_guard` and calls
`install()` from a .pth file that sorts after the one adding the machine's site-packages, so
it runs at the start of every process of that venv (the benchmark, the export and launcher
commands, Triton's backend stub). `install()` never raises: a failure leaves everything as
it was.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

# distribution -> the module it installs
WATCHED = {
    "scipy": "scipy",
    "scikit-learn": "sklearn",
    "pandas": "pandas",
    "opencv-python-headless": "cv2",
    "opencv-python": "cv2",
    "numba": "numba",
}
HIDDEN: list[str] = []


def needs_other_numpy(requirements: Iterable[str], numpy_version: str) -> bool:
    """Whether a distribution's Requires-Dist lines ask for a numpy other than this one."""
    from packaging.requirements import Requirement

    for line in requirements:
        requirement = Requirement(line)
        if requirement.name.lower() != "numpy":
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        if not requirement.specifier.contains(numpy_version, prereleases=True):
            return True
    return False


def hide_incompatible() -> list[str]:
    """Make absent every watched module whose distribution needs another numpy; their names."""
    from importlib import metadata

    numpy_version = metadata.version("numpy")
    hidden = []
    for distribution, module in WATCHED.items():
        try:
            requirements = metadata.requires(distribution) or []
        except metadata.PackageNotFoundError:
            continue
        if module not in sys.modules and needs_other_numpy(requirements, numpy_version):
            sys.modules[module] = None  # type: ignore[assignment]
            hidden.append(module)
    return hidden


def install() -> None:
    """`hide_incompatible()` at interpreter start, its modules kept in HIDDEN; never raises."""
    try:
        HIDDEN.extend(hide_incompatible())
    except Exception as exc:  # a guard at interpreter start must never stop it
        print(f"forge_numpy_guard: {exc!r}", file=sys.stderr)
