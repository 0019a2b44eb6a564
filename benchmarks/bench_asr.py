"""ASR round-trip check: Whisper tiny.en decoded in short per-clip windows (cmkd's default) vs CTranslate2 int8.

The ASR check was the slowest stage of `cmkd prepare` on the demo set: CTranslate2 only decodes 30 s windows, so a
2-3 s question pays for 30 s of encoder. cmkd's default recogniser (`PosteriorWhisperASR`) pads each clip to its own
short window and keeps the posteriors for the feature cache. Both run here on the same held-out clips, in one
process, with one torch / CTranslate2 thread, and both are scored against the prompt text with the same WER.

    cmkd prepare configs/demo.yaml          # once: the clips (data/demo)
    python benchmarks/bench_asr.py [--data data/demo] [--clips 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from bench_common import (
    add_threads_argument,
    apply_threads,
    command_line,
    generated_line,
    machine_info,
    render_machine,
    write_report,
)

from cmkd.data.asr_check import CT2WhisperASR, corpus_wer
from cmkd.data.audio import load_audio
from cmkd.data.posterior_asr import PosteriorWhisperASR
from cmkd.data.records import read_manifest


def _clips(data: Path, n_clips: int) -> dict[str, tuple[list[np.ndarray], list[str]]]:
    """Held-out clips by voice, the first `n_clips` of each voice, with the text each should say."""
    by_voice: dict[str, tuple[list[np.ndarray], list[str]]] = {}
    for record in read_manifest(data / "heldout.jsonl"):
        for clip in record.speech:
            audio, texts = by_voice.setdefault(f"{clip.source}:{clip.voice or 'default'}", ([], []))
            if len(audio) < n_clips:
                audio.append(load_audio(data / clip.audio))
                texts.append(record.prompt)
    if not by_voice:
        raise SystemExit(f"{data}: no held-out clips; run `cmkd prepare configs/demo.yaml` first")
    return by_voice


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/demo"))
    parser.add_argument("--clips", type=int, default=64, help="clips per voice")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "asr.md")
    add_threads_argument(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    info = machine_info()
    import torch

    threads = torch.get_num_threads()
    recognisers = {
        "CTranslate2 int8, 30 s windows": CT2WhisperASR(batch_size=8, threads=threads),
        "short windows (cmkd default)": PosteriorWhisperASR.load(batch_size=8),
    }
    rows = []
    for voice, (audio, texts) in _clips(args.data, args.clips).items():
        seconds_of_audio = sum(len(clip) for clip in audio) / 16000
        timings: dict[str, float] = {}
        for name, recogniser in recognisers.items():
            recogniser.transcribe(audio[:2])  # warm-up
            if isinstance(recogniser, PosteriorWhisperASR):
                recogniser.forget()  # it remembers decoded clips; time a cold decode
            start = time.perf_counter()
            transcripts = recogniser.transcribe(audio)
            timings[name] = time.perf_counter() - start
            if isinstance(recogniser, PosteriorWhisperASR):
                recogniser.forget()
            wer = corpus_wer(texts, transcripts)
            rows.append((voice, name, len(audio), seconds_of_audio, timings[name], wer))
        base = timings["CTranslate2 int8, 30 s windows"]
        rows.append((voice, "speed-up", 0, 0.0, base / timings["short windows (cmkd default)"], float("nan")))
    command = command_line()
    lines = [
        "# ASR round-trip check: short per-clip windows vs CTranslate2",
        "",
        generated_line(command),
        "",
        "| voice | recogniser | clips | audio s | seconds | s/clip | corpus WER |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for voice, name, n, audio_s, seconds, wer in rows:
        if name == "speed-up":
            lines.append(f"| {voice} | **short windows vs CTranslate2** | | | **{seconds:.2f}×** | | |")
        else:
            lines.append(
                f"| {voice} | {name} | {n} | {audio_s:.0f} | {seconds:.1f} | {seconds / n:.2f} | {wer:.3f} |"
            )
    lines += ["", *render_machine(info, command), ""]
    write_report(args.out, "\n".join(lines))


if __name__ == "__main__":
    main()
