"""Wait on a condition, not a fixed time: what the fault, resume and cluster tests poll for
(a trial recorded, a server up, a process gone) comes sooner or later on a loaded machine."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.1,
               message: str | Callable[[], str] = "condition not met", *,
               raise_on_timeout: bool = True) -> T:
    """Poll ``predicate`` every ``interval`` seconds until it returns something truthy, and
    return that. After ``timeout`` seconds it is asked once more; then an AssertionError with
    ``message`` (a string, or a callable asked only then), or, with ``raise_on_timeout=False``,
    the last (falsy) value is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            value = predicate()  # a last look: the condition may have come during the sleep
            if value or not raise_on_timeout:
                return value
            text = message() if callable(message) else message
            raise AssertionError(f"{text} (after {timeout:g} s)")
        time.sleep(interval)
