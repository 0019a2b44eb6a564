"""Feature cache: a clip's speech features read from the prepare-stage cache vs recomputed from its audio.

Claim checked (issue 8, item 5): with a frozen speech front end, training and evaluation should read each clip's
features from the cache `cmkd prepare` writes instead of recomputing them every epoch, every run and every
student. Measured on 100 demo clips (hibari, about 2 s each), for both kinds of features the library has:

- `frames`: Whisper tiny.en encoder frames [T_enc, 384] (stack_mlp / conv projectors). Recompute = read the FLAC
  + `encode_clip` (the code path both the cache and the online student use, one clip at a time); read =
  `FeatureCache.get` on the per-clip safetensors file (what train and eval read).
- `posterior`: Whisper's greedy decode with its top-8 posteriors and decoder states (the posterior connector, the
  demo's). Recompute = read the FLAC + `posterior_features` in batches of 8 (the prepare stage's ASR check and the
  student decode this way); read = `FeatureCache.get` of the packed float32 [N, 2k + 384] per-clip file, unpacked
  with `PosteriorFeatures.from_packed` (what the student gets), or the single-file fp16 cache
  (`save_posterior_cache` / `load_posterior_cache`) for comparison.

Each variant runs in its own process (model load not timed; its peak RSS is its own), interleaved over rounds;
seconds per 100 clips = the median round. Reads are from a warm page cache (the files were just written; a
training run re-reads the same files every epoch). Bytes per clip are the files on disk, next to the FLAC itself.

    python benchmarks/bench_feature_cache.py --threads 1                # 100 clips, 3 rounds
    python benchmarks/bench_feature_cache.py --threads 1 --clips 50 --rounds 2 --data runs/demo/data
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from bench_common import (
    RESULTS_DIR,
    add_threads_argument,
    apply_threads,
    command_line,
    generated_line,
    load_average,
    machine_info,
    peak_rss_bytes,
    render_machine,
    write_report,
)
from bench_demo_data import add_data_argument, copy_subset, prepared_root

MIB = 2**20
DECODE_BATCH = 8  # the prepare stage's ASR-check batch (PosteriorWhisperASR's default)
FRAMES_ROOT, FRAMES_BF16_ROOT, POSTERIOR_ROOT = "frames", "frames-bf16", "posterior"
POSTERIOR_FILE = "posteriors.safetensors"
VARIANTS = ("frames-compute", "frames-read", "posterior-compute", "posterior-read", "posterior-read-file")
LABELS = {
    "frames-compute": "frames: FLAC + Whisper encoder (`encode_clip`)",
    "frames-read": "frames: `FeatureCache.get`, float32 per-clip file",
    "posterior-compute": f"posteriors: FLAC + Whisper greedy decode (`posterior_features`, batch {DECODE_BATCH})",
    "posterior-read": "posteriors: `FeatureCache.get` + `from_packed`, float32 per-clip file",
    "posterior-read-file": "posteriors: `load_posterior_cache`, one fp16 file for all clips",
}


@dataclass
class Measured:
    """One variant's round: seconds for all clips, and what else it found."""

    variant: str
    seconds: float = 0.0
    audio_seconds: float = 0.0  # of `seconds`, reading the FLAC files (compute variants)
    write_seconds: float = 0.0  # writing the cache afterwards (compute variants, not in `seconds`)
    tokens: int = 0  # posterior steps (LM positions) over all clips
    frames: int = 0  # encoder frames over all clips
    max_abs_diff: float = 0.0  # read-file variant: fp16 single file vs the float32 per-clip cache
    max_relative_diff: float = 0.0  # the same, relative to each tensor's largest magnitude
    ids_equal: bool = True
    peak_rss: int = 0


@dataclass
class Results:
    rounds: dict[str, list[Measured]] = field(default_factory=dict)

    def median(self, variant: str) -> float:
        return statistics.median(m.seconds for m in self.rounds[variant])


# ---------------------------------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------------------------------


def _whisper() -> tuple[Any, Any]:
    """(encoder, posterior decoder) with the posterior connector's default decode settings."""
    from cmkd.models.encoder import WhisperSpeechEncoder
    from cmkd.models.posterior import WhisperPosteriorDecoder, load_whisper_with_tokenizer
    from cmkd.stage_configs import ProjectorSettings

    settings = ProjectorSettings()
    model, tokenizer = load_whisper_with_tokenizer("whisper-tiny.en")
    decoder = WhisperPosteriorDecoder(
        model,
        tokenizer,
        top_k=settings.posterior_top_k,
        max_tokens=settings.posterior_max_tokens,
        window_s=settings.posterior_window_s,
    )
    return WhisperSpeechEncoder.from_model(model), decoder


def child(variant: str, scratch: Path, keys: list[str]) -> Measured:
    from cmkd.data.audio import load_audio
    from cmkd.data.features import FeatureCache, FeatureMeta, write_clip_features, write_feature_meta
    from cmkd.models.posterior import PosteriorFeatures, load_posterior_cache, save_posterior_cache
    from cmkd.stage_configs import DType, ProjectorSettings

    audio_root = scratch / "data"
    measured = Measured(variant)
    top_k = ProjectorSettings().posterior_top_k
    if variant.endswith("-compute"):
        encoder, decoder = _whisper()
        start = time.perf_counter()
        audios = [load_audio(audio_root / key) for key in keys]
        measured.audio_seconds = time.perf_counter() - start
        if variant == "frames-compute":
            from cmkd.data.features import encode_clip, encoder_weights_hash

            outputs = [encode_clip(encoder, audio) for audio in audios]  # T_enc, D each
            measured.seconds = time.perf_counter() - start
            measured.frames = sum(int(frames.shape[0]) for frames in outputs)
            write_start = time.perf_counter()
            for root, dtype in ((FRAMES_ROOT, DType.FLOAT32), (FRAMES_BF16_ROOT, DType.BFLOAT16)):
                for key, frames in zip(keys, outputs, strict=True):
                    write_clip_features(scratch / root, key, frames, dtype)
                meta = FeatureMeta(
                    "whisper-tiny.en", encoder_weights_hash(encoder), encoder.hidden_size, dtype.value
                )
                write_feature_meta(scratch / root, meta)
                if dtype is DType.FLOAT32:
                    measured.write_seconds = time.perf_counter() - write_start
        else:
            from cmkd.data.features import posterior_meta
            from cmkd.models.posterior import posterior_features

            decoded = posterior_features(audios, encoder, decoder, batch_size=DECODE_BATCH)
            measured.seconds = time.perf_counter() - start
            measured.tokens = sum(int(features.topk_ids.shape[0]) for features in decoded)
            write_start = time.perf_counter()
            for key, features in zip(keys, decoded, strict=True):
                write_clip_features(scratch / POSTERIOR_ROOT, key, features.packed(), DType.FLOAT32)
            write_feature_meta(scratch / POSTERIOR_ROOT, posterior_meta(encoder, decoder, "whisper-tiny.en"))
            measured.write_seconds = time.perf_counter() - write_start
            save_posterior_cache(scratch / POSTERIOR_FILE, dict(zip(keys, decoded, strict=True)))
    elif variant == "frames-read":
        start = time.perf_counter()
        cache = FeatureCache(scratch / FRAMES_ROOT)
        outputs = [cache.get(key) for key in keys]  # T_enc, D each, float32
        measured.seconds = time.perf_counter() - start
        measured.frames = sum(int(frames.shape[0]) for frames in outputs)
    elif variant == "posterior-read":
        start = time.perf_counter()
        cache = FeatureCache(scratch / POSTERIOR_ROOT)
        read = [PosteriorFeatures.from_packed(cache.get(key), top_k) for key in keys]
        measured.seconds = time.perf_counter() - start
        measured.tokens = sum(int(features.topk_ids.shape[0]) for features in read)
    else:  # posterior-read-file
        start = time.perf_counter()
        by_key = load_posterior_cache(scratch / POSTERIOR_FILE)
        read = [by_key[key] for key in keys]
        measured.seconds = time.perf_counter() - start
        measured.tokens = sum(int(features.topk_ids.shape[0]) for features in read)
        cache = FeatureCache(scratch / POSTERIOR_ROOT)  # the float32 reference, untimed
        for key, features in zip(keys, read, strict=True):
            reference = PosteriorFeatures.from_packed(cache.get(key), top_k)
            measured.ids_equal &= bool(torch.equal(reference.topk_ids, features.topk_ids))
            for ours, theirs in ((features.topk_probs, reference.topk_probs),
                                 (features.decoder_hidden, reference.decoder_hidden)):  # fmt: skip
                difference = float((ours - theirs).abs().max()) if ours.numel() else 0.0
                scale = float(theirs.abs().max()) if theirs.numel() else 1.0
                measured.max_abs_diff = max(measured.max_abs_diff, difference)
                measured.max_relative_diff = max(measured.max_relative_diff, difference / max(scale, 1e-12))
    measured.peak_rss = peak_rss_bytes()
    return measured


def run_child(variant: str, scratch: Path) -> Measured:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, __file__, "--child", variant, str(scratch)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{done.stderr[-3000:]}")
    return Measured(**json.loads(done.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def _bytes_per_clip(path: Path, n_clips: int) -> float:
    files = (
        [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and p.name != "meta.json"]
    )
    return sum(p.stat().st_size for p in files) / n_clips


def render(
    results: Results,
    sizes: dict[str, float],
    n_clips: int,
    clip_seconds: float,
    args: argparse.Namespace,
    info: dict[str, str],
    command: str,
) -> str:
    per_100 = 100 / n_clips
    lines = [
        "# Feature cache: read vs recompute",
        "",
        generated_line(command),
        "",
        f"{n_clips} demo clips (hibari, {clip_seconds:.1f} s of speech per clip on average), Whisper tiny.en, "
        f"{args.rounds} interleaved round(s), one fresh process per variant and round (model load not timed). "
        "Seconds per 100 clips = the median round, scaled; FLAC = reading and decoding the audio files, part of "
        "the recompute time. Speed-up = recompute / read of the same kind of features.",
        "",
        "| variant | s per 100 clips (median) | all rounds (s per 100 clips) | of which FLAC | speed-up vs recompute "
        "| output per clip | process peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    compute_of = {
        "frames-read": "frames-compute",
        "posterior-read": "posterior-compute",
        "posterior-read-file": "posterior-compute",
    }
    for variant in VARIANTS:
        rounds = results.rounds[variant]
        median = results.median(variant) * per_100
        speedup = (
            f"{results.median(compute_of[variant]) / results.median(variant):,.0f}x"
            if variant in compute_of
            else "1x"
        )
        audio = statistics.median(m.audio_seconds for m in rounds) * per_100
        first = rounds[0]
        output = (
            f"{first.frames / n_clips:.0f} frames x 384"
            if variant.startswith("frames")
            else f"{first.tokens / n_clips:.1f} tokens x (2·8 + 384)"
        )
        lines.append(
            f"| {LABELS[variant]} | {median:.3f} | {', '.join(f'{m.seconds * per_100:.3f}' for m in rounds)} | "
            f"{audio:.2f} | {speedup} | {output} | {max(m.peak_rss for m in rounds) / MIB:,.0f} |"
        )
    frames_write = statistics.median(m.write_seconds for m in results.rounds["frames-compute"]) * per_100
    posterior_write = (
        statistics.median(m.write_seconds for m in results.rounds["posterior-compute"]) * per_100
    )
    file_check = results.rounds["posterior-read-file"][0]
    lines += [
        "",
        f"Writing the cache once (prepare's job): frames {frames_write:.2f} s, posteriors {posterior_write:.2f} s per "
        "100 clips. The single fp16 file gives the same token ids "
        f"({'all equal' if file_check.ids_equal else 'NOT all equal'}) and probabilities / decoder states within "
        f"{file_check.max_abs_diff:.1e} of the float32 per-clip files ({file_check.max_relative_diff:.1e} of each "
        "tensor's largest magnitude: fp16 rounding).",
        "",
        "## Bytes per clip on disk",
        "",
        "| what | bytes per clip | vs the FLAC |",
        "|---|---|---|",
    ]
    flac = sizes["FLAC audio (16 kHz)"]
    lines += [f"| {what} | {size:,.0f} | {size / flac:.2f}x |" for what, size in sizes.items()]
    lines += [
        "",
        "Per 1,000 hours of speech at this rate: frames float32 "
        f"{sizes['frames, float32 per-clip files'] / clip_seconds * 3.6e6 / 2**40:.2f} TiB, bfloat16 "
        f"{sizes['frames, bfloat16 per-clip files'] / clip_seconds * 3.6e6 / 2**40:.2f} TiB, posteriors float32 "
        f"{sizes['posteriors, float32 per-clip files'] / clip_seconds * 3.6e6 / 2**30:.1f} GiB.",
        "",
        *render_machine(info, command),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=100, help="demo clips (hibari, spread over categories)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every variant")
    add_data_argument(parser)
    add_threads_argument(parser)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "feature_cache.md")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # internal: variant, scratch
    args = parser.parse_args()
    if args.child:
        variant, scratch_name = args.child
        scratch = Path(scratch_name)
        keys = json.loads((scratch / "keys.json").read_text())
        print(json.dumps(asdict(child(variant, scratch, keys))))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    apply_threads(args.threads)
    info = machine_info()
    command = command_line()
    from cmkd.data.audio import duration_seconds

    source = prepared_root(args.data)
    results = Results({variant: [] for variant in VARIANTS})
    with tempfile.TemporaryDirectory(prefix="cmkd-bench-features-") as scratch_name:
        scratch = Path(scratch_name)
        records = copy_subset(
            source, scratch / "data", "train.jsonl", args.clips, lambda voice: voice == "hibari"
        )
        keys = [record.speech[0].audio for record in records]
        (scratch / "keys.json").write_text(json.dumps(keys))
        clip_seconds = statistics.mean(duration_seconds(scratch / "data" / key) for key in keys)
        for round_index in range(args.rounds):
            for variant in VARIANTS:  # each compute variant (re)writes the caches its read variants then read
                measured = run_child(variant, scratch)
                results.rounds[variant].append(measured)
                print(f"round {round_index + 1}: {variant:20s} {measured.seconds:7.3f} s  load {load_average()}",
                      flush=True)  # fmt: skip
        n_clips = len(keys)
        sizes = {
            "FLAC audio (16 kHz)": sum((scratch / "data" / key).stat().st_size for key in keys) / n_clips,
            "frames, float32 per-clip files": _bytes_per_clip(scratch / FRAMES_ROOT, n_clips),
            "frames, bfloat16 per-clip files": _bytes_per_clip(scratch / FRAMES_BF16_ROOT, n_clips),
            "posteriors, float32 per-clip files": _bytes_per_clip(scratch / POSTERIOR_ROOT, n_clips),
            "posteriors, one fp16 file": _bytes_per_clip(scratch / POSTERIOR_FILE, n_clips),
        }
    write_report(args.out, render(results, sizes, n_clips, clip_seconds, args, info, command))


if __name__ == "__main__":
    main()
