"""Waiting in tests: poll until something holds, or fail naming what never happened.

A deadline here fails a test only when the awaited thing never happens, never because a
slow machine took longer than usual: the deadlines are long, and no test asserts on time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

WAIT_S = 600.0


def wait_until(
    what: str, check: Callable[[], Any], timeout: float = WAIT_S, every: float = 0.2
) -> Any:
    """Poll `check` until it returns something true, and return that; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting until {what}")
        time.sleep(every)
