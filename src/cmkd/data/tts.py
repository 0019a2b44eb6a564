"""Text to speech for the S→T channel: Q_a = TTS(Q_t), many voices, resumable, in parallel (prepare stage).

Why this shape: the paper speaks every question with a TTS engine (CosyVoice 2); cmkd's embedded default uses two
engines that need no model hub (design §3): hibari (neural, 24 kHz, ONNX) and espeak-ng (formant, many voices).
Anything else a user has locally (CosyVoice 2, Piper, a cloud CLI) plugs in through `CommandBackend`, a command
template. All backends share one small protocol, so `synthesize_many` does not care which engine it drives.

`synthesize_many` is a batch job: it never raises for one bad item. A failure comes back as a `TTSResult` with its
error (`to_reject()` turns it into the rejects log entry). Outputs are 16 kHz mono FLAC written atomically, and a
job whose output already exists and decodes is skipped, so re-running the same command resumes. Output is
deterministic for the same text and voice (hibari's noise is seeded from them), so 1 and N workers give the same
files.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import re
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cmkd.data.audio import TARGET_SAMPLE_RATE, duration_seconds, is_valid_audio, resample, write_flac
from cmkd.data.jsonl_io import Reject
from cmkd.data.tts_backends import CommandBackend, EspeakBackend, HibariBackend
from cmkd.errors import UserError, disk_full

__all__ = [
    "CommandBackend",
    "EspeakBackend",
    "HibariBackend",
    "TTSBackend",
    "TTSJob",
    "TTSResult",
    "clip_relpath",
    "make_backend",
    "synthesize_many",
]


class TTSBackend(Protocol):
    """A speech synthesiser. `synthesize` returns (float32 samples, sample rate); mono or (frames, channels)."""

    name: str

    def voices(self) -> list[str]: ...

    def synthesize(self, text: str, voice: str) -> tuple[np.ndarray, int]: ...


BUILTIN_BACKENDS = ("hibari", "espeak")


def make_backend(name: str, command: str = "") -> TTSBackend:
    """Build a backend by name: "hibari", "espeak" (alias "espeak-ng"), or any name with a `command` template.

    With a command, `name` only labels the audio's source in the manifest (e.g. "cosyvoice2", "piper").
    """
    if command:
        return CommandBackend(command, name=name or "command")
    if name == "hibari":
        return HibariBackend()
    if name in ("espeak", "espeak-ng"):
        return EspeakBackend()
    if name == "command":
        raise UserError("tts backend 'command': needs a command template with {text} and {out} placeholders")
    raise UserError(
        f"tts backend {name!r}: unknown; use one of {', '.join(BUILTIN_BACKENDS)} or give a command"
    )


def clip_relpath(item_id: str, backend: str, voice: str, text: str) -> str:
    """A relative, filesystem-safe path for one clip: `<backend>/<voice>/<item>-<hash>.flac`.

    The hash covers item, backend, voice and text, so editing a prompt gives a new file name and resume never
    reuses audio of the old wording (resume only checks that a file exists and decodes). Item ids may hold any
    characters; they are reduced to a safe stem and the hash keeps distinct ids apart.
    """
    digest = hashlib.sha256(f"{item_id}\0{backend}\0{voice}\0{text}".encode()).hexdigest()[:12]
    return f"{_safe_part(backend)}/{_safe_part(voice or 'default')}/{_safe_part(item_id)}-{digest}.flac"


def _safe_part(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", part).strip("._")[:80] or "_"


@dataclass(frozen=True)
class TTSJob:
    """One clip to make: speak `text` for item `item_id` with `backend`/`voice` into `out_path` (a .flac)."""

    item_id: str
    text: str
    backend: str
    voice: str
    out_path: Path
    command: str = ""  # the CommandBackend template when `backend` is not built in


@dataclass(frozen=True)
class TTSResult:
    """What happened to one job. `path` is None exactly when `error` is set; `reused` marks a resume skip."""

    item_id: str
    voice: str
    path: Path | None
    seconds: float
    error: str | None
    reused: bool = False

    def to_reject(self) -> Reject:
        """The rejects-log entry for a failed job (call only when `error` is set)."""
        return Reject(self.item_id, "speech.audio", "tts failed", f"voice {self.voice!r}: {self.error}")


# ---------------------------------------------------------------------------------------------------------------
# One job, in whichever process runs it
# ---------------------------------------------------------------------------------------------------------------

_BackendKey = tuple[str, str]  # (backend name, command template)


class _Backends:
    """Backends of one process, built once each; a backend that cannot be built is remembered as its error.

    Loading a TTS model costs about a second (hibari's ONNX session and lexicons), so it happens once per process,
    not per job. A construction error (espeak-ng missing, say) fails only the jobs that need that backend.
    """

    def __init__(self) -> None:
        self._built: dict[_BackendKey, TTSBackend | str] = {}

    def get(self, key: _BackendKey) -> TTSBackend | str:
        if key not in self._built:
            try:
                self._built[key] = make_backend(key[0], key[1])
            except Exception as error:  # a batch never raises for one bad backend; its jobs report it
                self._built[key] = f"backend {key[0]!r} unavailable: {error}"
        return self._built[key]


def _run_job(job: TTSJob, backends: _Backends) -> TTSResult:
    """Synthesise, convert to 16 kHz mono and write one job; any exception becomes the result's error."""
    try:
        backend = backends.get((job.backend, job.command))
        if isinstance(backend, str):
            raise RuntimeError(backend)
        if not job.text.strip():
            raise ValueError("empty text")
        samples, sample_rate = backend.synthesize(job.text, job.voice)
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim == 2:
            samples = samples.mean(axis=1, dtype=np.float32)  # frames, channels -> frames
        if samples.ndim != 1 or samples.size == 0:
            raise RuntimeError(f"backend returned no audio (shape {samples.shape})")
        if not np.isfinite(samples).all():
            raise RuntimeError("backend returned NaN or infinite samples")
        audio_16k = resample(samples, int(sample_rate), TARGET_SAMPLE_RATE)
        write_flac(job.out_path, audio_16k, TARGET_SAMPLE_RATE)
        return TTSResult(job.item_id, job.voice, job.out_path, audio_16k.size / TARGET_SAMPLE_RATE, None)
    except Exception as error:
        if disk_full(error):  # not this item's fault: stop the stage instead of rejecting every clip
            raise
        return TTSResult(job.item_id, job.voice, None, 0.0, f"{type(error).__name__}: {error}")


# Pool workers keep their backends here between jobs: the process pool can only hand a worker plain functions,
# so per-process state set up by the initializer has to live at module level. Unused in the parent process.
_worker_backends: _Backends | None = None


def _init_worker(keys: list[_BackendKey]) -> None:
    global _worker_backends
    _worker_backends = _Backends()
    for key in keys:
        _worker_backends.get(key)


def _run_job_in_worker(job: TTSJob) -> TTSResult:
    assert _worker_backends is not None, "worker initializer did not run"
    return _run_job(job, _worker_backends)


# ---------------------------------------------------------------------------------------------------------------
# The batch
# ---------------------------------------------------------------------------------------------------------------


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def _reuse_or_none(job: TTSJob) -> TTSResult | None:
    """A finished output from an earlier run, if there is one that decodes as 16 kHz audio."""
    if not is_valid_audio(job.out_path, expected_sr=TARGET_SAMPLE_RATE):
        return None
    return TTSResult(job.item_id, job.voice, job.out_path, duration_seconds(job.out_path), None, reused=True)


def synthesize_many(jobs: Sequence[TTSJob], workers: int = 1, progress: bool = True) -> list[TTSResult]:
    """Run every job; return one result per job, in the order given.

    workers: processes synthesising at once (1 runs in this process). Each worker builds each backend it needs
    once, in its initializer. Jobs whose valid output already exists are skipped (result `reused=True`).
    A failing job (bad text, backend missing, a worker killed) is returned with its error, never raised.
    """
    if workers < 1:
        raise UserError(f"tts.workers: must be >= 1, got {workers}")
    results: list[TTSResult | None] = [None] * len(jobs)
    pending: list[int] = []
    owner_of_path: dict[Path, str] = {}
    for index, job in enumerate(jobs):
        resolved = Path(job.out_path).resolve()
        if resolved in owner_of_path:  # two jobs writing one file would race and one clip would be lost
            error = f"output path {job.out_path} is also the output of item {owner_of_path[resolved]!r}"
            results[index] = TTSResult(job.item_id, job.voice, None, 0.0, error)
            continue
        owner_of_path[resolved] = job.item_id
        results[index] = _reuse_or_none(job)
        if results[index] is None:
            pending.append(index)

    with _progress_bar(progress) as bar:
        task = bar.add_task("tts", total=len(jobs), completed=len(jobs) - len(pending))
        if workers == 1 or len(pending) <= 1:
            backends = _Backends()
            for index in pending:
                results[index] = _run_job(jobs[index], backends)
                bar.advance(task)
        else:
            _run_in_pool(jobs, pending, min(workers, len(pending)), results, lambda: bar.advance(task))
    return [
        result
        if result is not None
        else TTSResult(job.item_id, job.voice, None, 0.0, "internal: job never ran")
        for job, result in zip(jobs, results, strict=True)
    ]


def _run_in_pool(
    jobs: Sequence[TTSJob],
    pending: list[int],
    workers: int,
    results: list[TTSResult | None],
    on_done: Callable[[], None],
) -> None:
    """Run `pending` jobs in a process pool, filling `results`; a crashed worker fails only its own jobs.

    "spawn" rather than fork: the parent may already hold onnxruntime or torch thread pools, which do not
    survive a fork reliably, and spawn behaves the same on Linux and macOS.
    """
    keys = sorted({(jobs[index].backend, jobs[index].command) for index in pending})
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(keys,))
    try:
        futures: dict[Future[TTSResult], int] = {
            pool.submit(_run_job_in_worker, jobs[index]): index for index in pending
        }
        for future in as_completed(futures):
            index = futures[future]
            job = jobs[index]
            try:
                results[index] = future.result()
            except Exception as error:  # BrokenProcessPool (a worker died), pickling errors, ...
                if disk_full(error):
                    raise
                error_text = f"{type(error).__name__}: {error}"
                results[index] = TTSResult(job.item_id, job.voice, None, 0.0, error_text)
            on_done()
    except BaseException:
        # Ctrl-C: drop the queued jobs instead of waiting for all of them; finished files are already in place.
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
