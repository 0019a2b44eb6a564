"""The TTS engines behind `cmkd.data.tts.TTSBackend`: hibari, espeak-ng, and any local command.

Why these three: hibari (PyPI `hibari-tts`) and espeak-ng (a Debian package) run offline on a CPU and need no
model hub, so the embedded default can speak its questions anywhere (design §3). Their voices differ a lot
(neural vs formant), which is what a seen/unseen-voice evaluation needs. Every other engine (CosyVoice 2 as in
the paper, Piper, a vendor CLI) is reached through `CommandBackend`, so cmkd never has to import it.

Each engine returns (float32 samples, native sample rate); resampling and writing live in `cmkd.data.tts`.
"""

from __future__ import annotations

import functools
import hashlib
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from cmkd.errors import UserError

_STDERR_TAIL = 400  # characters of a failing command's stderr kept in the error message


def _stderr_tail(stderr: bytes) -> str:
    text = stderr.decode("utf-8", errors="replace").strip()
    return text[-_STDERR_TAIL:] if text else "(no stderr)"


# ---------------------------------------------------------------------------------------------------------------
# hibari
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _load_hibari(voice: str, threads: int) -> Any:
    """One hibari model per (voice, threads) per process: the ONNX session plus lexicons take about a second."""
    from hibari import Hibari

    return Hibari(voice=voice, threads=threads)


def _stable_seed(voice: str, text: str) -> int:
    """A seed that depends only on the voice and the text: hibari's vocoder adds random noise, and an unseeded
    call gives different samples every run, which would make resumed or parallel runs differ from serial ones."""
    digest = hashlib.sha256(f"{voice}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class HibariBackend:
    """hibari-tts (neural, 24 kHz). Only voices already on this machine are used: cmkd downloads nothing at run
    time, and hibari ships one voice ("heart", American English) in its wheel; the others must be fetched once
    by the user (hibari's own CLI caches them)."""

    name = "hibari"

    def __init__(self, threads: int = 1) -> None:
        try:
            import hibari  # noqa: F401  # only checks that the package is installed
        except ImportError as error:
            raise UserError(
                "tts backend 'hibari': the hibari-tts package is not installed (pip install hibari-tts)"
            ) from error
        if threads < 1:
            raise UserError(f"tts backend 'hibari': threads must be >= 1, got {threads}")
        self.threads = threads

    def voices(self) -> list[str]:
        from hibari.voices import VOICES, voice_path

        available: list[str] = []
        for voice in VOICES:
            try:
                voice_path(voice, download_missing=False)
            except FileNotFoundError:
                continue
            available.append(voice)
        return available

    def synthesize(self, text: str, voice: str) -> tuple[np.ndarray, int]:
        from hibari.voices import DEFAULT, VOICES

        voice = voice or DEFAULT
        if voice not in VOICES:
            raise UserError(f"hibari voice {voice!r}: unknown; known voices: {', '.join(VOICES)}")
        if voice not in self.voices():
            raise UserError(
                f"hibari voice {voice!r}: not on this machine and cmkd does not download at run time; "
                f'fetch it once with hibari (python -c "from hibari.voices import voice_path; '
                f"voice_path('{voice}')\") or use one of: {', '.join(self.voices())}"
            )
        model = _load_hibari(voice, self.threads)
        samples = np.asarray(model(text, seed=_stable_seed(voice, text)), dtype=np.float32)
        if samples.size == 0:
            raise UserError(f"hibari: nothing to speak in {text[:60]!r} (no phonemes)")
        return samples, int(model.sample_rate)


# ---------------------------------------------------------------------------------------------------------------
# espeak-ng
# ---------------------------------------------------------------------------------------------------------------

_ESPEAK_MISSING = (
    "tts backend 'espeak': espeak-ng is not on PATH; install it (Debian/Ubuntu: apt-get install espeak-ng, "
    "macOS: brew install espeak-ng) or choose another backend"
)
_LISTED_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4", "f5")


class EspeakBackend:
    """espeak-ng through its command line. A voice is `LANGUAGE[+VARIANT]`, e.g. "en-us", "en-us+m3",
    "en-gb+f2". espeak-ng silently ignores an unknown variant, so variants are checked against its data
    directory here; an unknown language makes espeak-ng itself fail, which becomes the job's error."""

    name = "espeak"

    def __init__(self, executable: str = "espeak-ng", timeout_s: float = 60.0) -> None:
        found = shutil.which(executable)
        if found is None:
            raise UserError(_ESPEAK_MISSING)
        self.executable = found
        self.timeout_s = timeout_s
        self._variants = self._installed_variants()

    def _run(self, args: list[str], text: str | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [self.executable, *args],
            input=None if text is None else text.encode("utf-8"),
            capture_output=True,
            timeout=self.timeout_s,
            check=False,
        )

    def _installed_variants(self) -> set[str]:
        """Variant names from `<data dir>/voices/!v`; the data dir is what `espeak-ng --version` reports."""
        match = re.search(
            r"Data at:\s*(\S.*)$", self._run(["--version"]).stdout.decode(errors="replace"), re.M
        )
        if match is None:
            return set()  # unknown layout: variants go unchecked rather than all being refused
        variant_dir = Path(match.group(1).strip()) / "voices" / "!v"
        return {entry.name for entry in variant_dir.iterdir()} if variant_dir.is_dir() else set()

    def voices(self) -> list[str]:
        """English languages espeak-ng has, plus common male/female variants of en-us and en-gb.

        Not the whole space: any `LANGUAGE+VARIANT` espeak-ng knows is accepted by `synthesize`.
        """
        listing = self._run(["--voices=en"]).stdout.decode(errors="replace").splitlines()[1:]
        languages: list[str] = []
        for line in listing:
            columns = line.split()
            # columns: priority, language, age/gender, voice name, file, ...; mbrola voices need extra packages
            # and "!v/" entries are variants listed as pseudo-languages.
            if (
                len(columns) >= 5
                and not columns[4].startswith(("mb/", "!v/"))
                and columns[1] not in languages
            ):
                languages.append(columns[1])
        variants = [
            variant for variant in _LISTED_VARIANTS if variant in self._variants or not self._variants
        ]
        extra = [f"{language}+{variant}" for language in ("en-us", "en-gb") if language in languages
                 for variant in variants]  # fmt: skip
        return languages + extra

    def synthesize(self, text: str, voice: str) -> tuple[np.ndarray, int]:
        voice = voice or "en-us"
        if not re.fullmatch(r"[A-Za-z0-9_-]+(\+[A-Za-z0-9_-]+)?", voice):
            raise UserError(f"espeak voice {voice!r}: expected LANGUAGE or LANGUAGE+VARIANT, e.g. en-us+m3")
        _, _, variant = voice.partition("+")
        if variant and self._variants and variant not in self._variants:
            raise UserError(f"espeak voice {voice!r}: variant {variant!r} is not installed")
        with tempfile.TemporaryDirectory(prefix="cmkd-espeak-") as temp_dir:
            wav_path = Path(temp_dir) / "out.wav"
            # Text goes in on stdin: never parsed as options (a question may start with "-") or by a shell.
            done = self._run(["-v", voice, "-w", str(wav_path), "--stdin"], text=text)
            if done.returncode != 0 or not wav_path.is_file():
                raise RuntimeError(f"espeak-ng exited with {done.returncode}: {_stderr_tail(done.stderr)}")
            samples, sample_rate = sf.read(str(wav_path), dtype="float32")
        return np.asarray(samples, dtype=np.float32), int(sample_rate)


# ---------------------------------------------------------------------------------------------------------------
# any local command
# ---------------------------------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{(text|out|voice)\}")
_SHELL_OPERATORS = frozenset({"|", "||", "&", "&&", ";", ">", ">>", "<", "<<", "2>", "2>&1", "$(", "`"})


class CommandBackend:
    """Runs a user's command per clip: a template with `{out}` (required), `{text}` and `{voice}` placeholders.

    Example: `python my_cosyvoice.py --text {text} --voice {voice} --out {out}`, or for Piper (which reads text
    on stdin when `{text}` is absent) `piper --model en_US-amy.onnx --output_file {out}`.

    The template is split once with shlex and run WITHOUT a shell; each placeholder is replaced inside its own
    argument, so the text is always exactly data: quotes, `;`, `$(...)` in a question cannot run anything.
    Pipelines and redirections are therefore refused; put them in a script that takes the text and the output
    path as arguments. The command writes any format libsndfile reads (WAV is safe) to `{out}`.
    """

    def __init__(
        self, command: str, name: str = "command", voices: Sequence[str] = (), timeout_s: float = 300.0
    ) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self._declared_voices = list(voices)
        where = f"tts backend {name!r} command {command!r}"
        try:
            argv = shlex.split(command)
        except ValueError as error:
            raise UserError(f"{where}: cannot parse ({error})") from error
        if not argv:
            raise UserError(f"{where}: empty command")
        if not any("{out}" in arg for arg in argv):
            raise UserError(f"{where}: needs an {{out}} placeholder for the audio file to write")
        operators = [arg for arg in argv if arg in _SHELL_OPERATORS or arg.startswith("$(")]
        if operators:
            raise UserError(
                f"{where}: runs without a shell, so {operators[0]!r} would not work; put the pipeline in a "
                "script that takes {text} and {out} as arguments"
            )
        if _PLACEHOLDER.search(argv[0]):
            raise UserError(f"{where}: the program name cannot be a placeholder")
        if shutil.which(argv[0]) is None:
            raise UserError(f"{where}: program {argv[0]!r} not found or not executable")
        self._argv_template = argv
        self._text_on_stdin = not any("{text}" in arg for arg in argv)

    def voices(self) -> list[str]:
        """The voices given at construction; empty means any string is passed through to `{voice}`."""
        return list(self._declared_voices)

    def synthesize(self, text: str, voice: str) -> tuple[np.ndarray, int]:
        if self._declared_voices and voice not in self._declared_voices:
            raise UserError(f"{self.name} voice {voice!r}: not one of {', '.join(self._declared_voices)}")
        with tempfile.TemporaryDirectory(prefix="cmkd-tts-") as temp_dir:
            out_path = Path(temp_dir) / "out.wav"
            values = {"text": text, "out": str(out_path), "voice": voice}
            argv = [
                _PLACEHOLDER.sub(lambda match: values[match.group(1)], arg) for arg in self._argv_template
            ]
            done = subprocess.run(
                argv,
                input=text.encode("utf-8") if self._text_on_stdin else None,
                capture_output=True,
                timeout=self.timeout_s,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"{self.name}: command exited with {done.returncode}: {_stderr_tail(done.stderr)}"
                )
            if not out_path.is_file() or out_path.stat().st_size == 0:
                raise RuntimeError(f"{self.name}: command exited 0 but wrote no audio to {{out}}")
            samples, sample_rate = sf.read(str(out_path), dtype="float32")
        return np.asarray(samples, dtype=np.float32), int(sample_rate)
