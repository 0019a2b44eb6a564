"""Library entry points may set torch's thread count (`run.threads`), but must give the caller back its own.

Why: torch's thread count is process-wide. `cmkd demo` prepares with one thread (faster for tiny batched decoding
on a shared 2-core box) and then trains and evaluates in the same process; without restoring, training and
evaluation silently ran on one core as well (measured: 99% CPU on 2 cores for the whole demo).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")


def restores_torch_threads(function: Callable[P, R]) -> Callable[P, R]:
    """Decorate an entry point: whatever thread count it sets is undone when it returns or raises."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        threads = torch.get_num_threads()
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper
