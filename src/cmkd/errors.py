"""Errors a user can fix.

A `UserError` is a problem with the user's input, config or files. The CLI prints it as one line and exits with
code 2, so a bad value never ends in a traceback. Anything else that escapes is a bug in cmkd, except a full disk
(`disk_full`): the CLI reports that as one line too, since every stage resumes once space is freed.
"""

from __future__ import annotations

import errno

_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "os error 28")


class UserError(Exception):
    """A problem with the user's input, config or files; the CLI prints it as one line and exits 2."""


def disk_full(error: BaseException) -> OSError | bool:
    """The OSError saying the disk (or quota) is full, if `error` is one or was raised while handling one; else
    whether its message says so (safetensors' Rust writer reports `No space left on device (os error 28)`).

    Why the chain: writers that are not Python (torch.save's zip writer) turn a failed write into their own
    RuntimeError, raised while the file object's OSError is being handled."""
    seen: set[int] = set()
    current: BaseException | None = error
    said_so = False
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return current
        said_so = said_so or any(text in str(current).lower() for text in _DISK_FULL_TEXT)
        current = current.__cause__ or current.__context__
    return said_so
