"""Crash-safe JSONL and file writing, and the rejects log every batch stage writes.

Why this exists: `cmkd prepare` runs for a long time and is resumed by re-running the same command. A writer can
be killed at any byte, so:

- appends write each batch of whole lines with one `write`, then flush + fsync, so at most the last line of a
  file can be partial;
- before appending to a file whose last line is partial, a newline is written first, so the partial line stays
  one bad line and never glues itself onto the next good row;
- readers report every bad line as a `ParseError` with its line number instead of raising, and name a partial
  last line as truncated;
- whole files (manifests, configs) are replaced atomically: temp file in the same directory, fsync, rename.

Bad input never stops a batch and never disappears: it becomes a `Reject(item_id, field, reason)` in a
`RejectsLog`, a JSONL file a user can read, with counts by reason for the end-of-stage summary.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

# ---------------------------------------------------------------------------------------------------------------
# Atomic whole-file writes
# ---------------------------------------------------------------------------------------------------------------

_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable; some filesystems refuse to open a directory, which only weakens durability."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` so readers see the old file or the new one, never a half-written one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.chmod(temp_name, 0o666 & ~_UMASK)  # mkstemp makes 0600; the final file gets the usual permissions
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(target.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8 text version of `atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------------------------
# JSONL append and read
# ---------------------------------------------------------------------------------------------------------------


def dumps_line(row: Mapping[str, Any]) -> bytes:
    """One JSON object as one UTF-8 line. NaN/Infinity are refused: they are not JSON and other tools choke."""
    return json.dumps(row, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8") + b"\n"


def _ends_with_partial_line(path: Path) -> bool:
    """True when the file is non-empty and its last byte is not a newline (a writer died mid-line)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    if size == 0:
        return False
    with path.open("rb") as handle:
        handle.seek(size - 1)
        return handle.read(1) != b"\n"


def append_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Append `rows` as JSON lines; return how many were written.

    All rows are serialised before anything is written, so an unserialisable row writes nothing. The lines go out
    in one write, then flush + fsync: a crash leaves at most one partial last line, which `read_jsonl` reports.
    """
    target = Path(path)
    payload = b"".join(dumps_line(row) for row in rows)
    if not payload:
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = b"\n" if _ends_with_partial_line(target) else b""
    with target.open("ab") as handle:
        handle.write(prefix + payload)
        handle.flush()
        os.fsync(handle.fileno())
    return payload.count(b"\n")


@dataclass(frozen=True)
class ParseError:
    """A JSONL line that could not be read as a JSON object.

    `reason` is short and stable (for counting), `detail` says exactly what went wrong, `raw` is the first 200
    characters of the line for the log.
    """

    line_no: int
    reason: str
    detail: str
    raw: str


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | ParseError]]:
    """Yield `(line_no, object)` per non-blank line (1-based); bad lines come as `ParseError`, never an exception.

    A last line without a newline that does not parse is reported as truncated: the mark of a killed writer.
    A missing file is the caller's problem to report (FileNotFoundError propagates).
    """
    with Path(path).open("rb") as handle:
        line_no = 0
        for raw_line in handle:
            line_no += 1
            complete = raw_line.endswith(b"\n")
            if not raw_line.strip():
                continue
            preview = raw_line[:200].decode("utf-8", errors="replace").rstrip("\n")
            try:
                text = raw_line.decode("utf-8")
            except UnicodeDecodeError as err:
                yield (
                    line_no,
                    ParseError(line_no, "not UTF-8", f"invalid byte at offset {err.start}", preview),
                )
                continue
            try:
                value = json.loads(text, parse_constant=_reject_constant)
            except ValueError as err:
                reason = "malformed JSON" if complete else "truncated last line"
                detail = (
                    str(err)
                    if complete
                    else f"no newline at the end and not valid JSON ({err}); writer killed?"
                )
                yield line_no, ParseError(line_no, reason, detail, preview)
                continue
            if not isinstance(value, dict):
                kind = type(value).__name__
                yield line_no, ParseError(line_no, "not a JSON object", f"got {kind}", preview)
                continue
            yield line_no, value


# ---------------------------------------------------------------------------------------------------------------
# Rejects
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reject:
    """One input item a batch stage refused: which item, which field, and why.

    `reason` is short and stable ("empty text", "corrupt audio"), so rejects can be counted by it; `detail` holds
    the specifics (the length, the decoder's message).
    """

    item_id: str
    field: str
    reason: str
    detail: str = ""

    def to_json(self) -> dict[str, str]:
        return asdict(self)


class RejectsLog:
    """Collects rejects in memory and, when given a path, appends each to a JSONL file as it happens.

    Each reject is flushed to the OS at once (a killed run keeps it); fsync happens on `close()`, which keeps a
    stage with many rejects from paying one disk sync per item.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.rejects: list[Reject] = []
        self._handle: IO[bytes] | None = None

    def _open(self) -> IO[bytes]:
        if self._handle is None:
            assert self.path is not None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = _ends_with_partial_line(self.path)
            self._handle = self.path.open("ab")
            if partial:
                self._handle.write(b"\n")
        return self._handle

    def add(self, item_id: str, field: str, reason: str, detail: str = "") -> Reject:
        """Record one reject and return it."""
        return self.add_reject(Reject(item_id, field, reason, detail))

    def add_reject(self, reject: Reject) -> Reject:
        self.rejects.append(reject)
        if self.path is not None:
            handle = self._open()
            handle.write(dumps_line(reject.to_json()))
            handle.flush()
        return reject

    @property
    def total(self) -> int:
        return len(self.rejects)

    def counts(self) -> Counter[str]:
        """Number of rejects per reason, for the end-of-stage summary."""
        return Counter(reject.reason for reject in self.rejects)

    def summary(self) -> str:
        """One line, e.g. `3 rejected: empty text 2, corrupt audio 1`."""
        if not self.rejects:
            return "0 rejected"
        parts = ", ".join(f"{reason} {count}" for reason, count in self.counts().most_common())
        return f"{self.total} rejected: {parts}"

    def close(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def __enter__(self) -> RejectsLog:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
