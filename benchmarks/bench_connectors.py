"""Speech connectors on the demo set: does the frozen-LM student carry the question's CONTENT, not only its type?

Claim checked (issue 10): the posterior connector (Whisper tiny.en's per-token posteriors bridged into SmolLM2's
embedding space, `ProjectorKind.POSTERIOR`) reaches agreement with the teacher >= 0.3 in the training voice and
slot recall >= 0.5, at initialisation or within 10 minutes of CPU training, where the stack-8 MLP projector got
0.00-0.04 agreement after 10-20 minutes (research/cpu-feasibility*.md). Compared on the 102 held-out demo questions,
spoken by hibari (the training voice) and espeak-ng en-us+m3 (an unseen voice):

  (a) stack-8 MLP projector, untrained      (b) posterior connector at initialisation (no training)
  (c) posterior connector after a short S→T run on the TRAIN questions (CE on ŷ + 0.5·τ²·KL, τ = 2, frozen LM)
  (d) ASR cascade: Whisper's greedy transcript (the same decode the connector reads) -> SmolLM2 in text mode

Teacher: SmolLM2-135M-Instruct on the question text, system prompt "Answer the question in a few words.", greedy,
24 new tokens. Nothing is tuned on the held-out questions: settings are the project defaults, fixed in advance.
Audio is synthesised here (cached as .npy under --scratch) and Whisper posteriors are cached the way the prepare
stage would (`save_posterior_cache`), so a rerun skips both.

    python benchmarks/bench_connectors.py                       # about 25-35 min on 2 shared cores
    python benchmarks/bench_connectors.py --train-minutes 3     # shorter training run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import resource
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from cmkd.data.asr_check import corpus_wer
from cmkd.data.audio import resample
from cmkd.data.demo_questions import DemoQuestion, load_demo_questions, slot_words
from cmkd.data.tts import make_backend
from cmkd.eval.text_match import agrees, gold_match, slot_recall
from cmkd.losses import TopKTeacher, kd_loss, teacher_topk
from cmkd.models.build import build_student
from cmkd.models.composable import ComposableSpeechLM
from cmkd.models.loading import load_causal_lm
from cmkd.models.posterior import (
    LOOP_MIN_TOKENS,
    TRAILING_SILENCE_S,
    PosteriorFeatures,
    load_posterior_cache,
    load_whisper_with_tokenizer,
    posterior_features,
    save_posterior_cache,
)
from cmkd.models.posterior_connector import PosteriorConnector
from cmkd.models.speech_lm import Prompt
from cmkd.models.teacher import TextTeacher
from cmkd.stage_configs import ProjectorKind, ProjectorSettings, StudentSettings, TrainSettings

SYSTEM = "Answer the question in a few words."
MAX_NEW_TOKENS = 24
VOICES = {"hibari": ("hibari", ""), "espeak": ("espeak", "en-us+m3")}  # label -> (backend, voice)
RESULTS = Path(__file__).parent / "results" / "connectors.md"


def loadavg() -> str:
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def speak(questions: Sequence[DemoQuestion], label: str, scratch: Path) -> list[np.ndarray]:
    """16 kHz clips of the questions in one voice, synthesised once and cached as .npy."""
    backend_name, voice = VOICES[label]
    backend, clips = None, []
    for question in questions:
        digest = hashlib.sha256(f"{label}\0{question.question}".encode()).hexdigest()[:16]
        path = scratch / "audio" / f"{label}-{digest}.npy"
        if not path.is_file():
            backend = backend or make_backend(backend_name)
            samples, rate = backend.synthesize(question.question, voice)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, resample(samples if samples.ndim == 1 else samples.mean(axis=1), rate))
        clips.append(np.load(path))
    return clips


@dataclass
class Scores:
    answers: list[str]
    agree: float
    gold: float
    slot_recall: float
    kl: float | None = None
    nll: float | None = None
    extra: dict[str, str] = field(default_factory=dict)


def text_scores(answers: list[str], questions: Sequence[DemoQuestion], teacher_answers: list[str]) -> Scores:
    """Agreement with the teacher, lenient gold, and slot recall over the question's slot words that the teacher's
    own answer contains (research/cpu-feasibility-2.md's 'content'; items without such words are left out)."""
    recalls = []
    for answer, question, reference in zip(answers, questions, teacher_answers, strict=True):
        slots = [word for word in slot_words(question) if slot_recall(reference, [word]) == 1.0]
        recall = slot_recall(answer, slots) if slots else None
        if recall is not None:
            recalls.append(recall)
    return Scores(
        answers,
        float(np.mean([agrees(a, t) for a, t in zip(answers, teacher_answers, strict=True)])),
        float(np.mean([gold_match(a, q.answer, q.aliases) for a, q in zip(answers, questions, strict=True)])),
        float(np.mean(recalls)) if recalls else float("nan"),
    )


def teacher_forced(
    student: ComposableSpeechLM,
    prompts: list[Prompt],
    responses: list[list[int]],
    teacher_rows: list[torch.Tensor],
) -> tuple[float, float]:
    """KL(teacher ‖ student) at τ = 1 and the student's NLL, per teacher response token (end-of-turn included)."""
    kl_sum = nll_sum = count = 0.0
    for start in range(0, len(prompts), 16):
        batch = slice(start, start + 16)
        with torch.no_grad():
            output = student(prompts[batch], responses[batch])
            student_logp = output.logits[output.prediction_mask].float().log_softmax(-1)  # N, V
            teacher_logp = torch.cat(teacher_rows[batch]).float().log_softmax(-1)  # N, V
            targets = output.targets[output.prediction_mask]  # N
        kl_sum += float((teacher_logp.exp() * (teacher_logp - student_logp)).sum())
        nll_sum += float(-student_logp.gather(1, targets[:, None]).sum())
        count += targets.numel()
    return kl_sum / count, nll_sum / count


def evaluate(
    student: ComposableSpeechLM,
    prompts: list[Prompt],
    questions: Sequence[DemoQuestion],
    teacher: dict[str, list],
) -> Scores:
    answers: list[str] = []
    for start in range(0, len(prompts), 16):
        answers += student.generate(prompts[start : start + 16], MAX_NEW_TOKENS)
    scores = text_scores(answers, questions, teacher["answers"])
    scores.kl, scores.nll = teacher_forced(student, prompts, teacher["ids"], teacher["rows"])
    return scores


def run_teacher(teacher: TextTeacher, questions: Sequence[DemoQuestion], cache: Path) -> dict[str, list]:
    """ŷ (ids and text) and the teacher's response-row logits (fp16, one [len(ŷ)+1, V] tensor per question).

    The greedy answers (the slow part) are cached as JSON by question text; the logits are recomputed."""
    known = json.loads(cache.read_text(encoding="utf-8")) if cache.is_file() else {}
    prompts = [Prompt(system=SYSTEM, text=question.question) for question in questions]
    ids: list[list[int]] = []
    rows: list[torch.Tensor] = []
    for start in range(0, len(prompts), 16):
        batch = [question.question for question in questions[start : start + 16]]
        if all(text in known for text in batch):
            ids += [known[text] for text in batch]
        else:
            ids += teacher.generate_ids(prompts[start : start + 16], MAX_NEW_TOKENS)
            known |= dict(zip(batch, ids[start:], strict=True))
        output = teacher(prompts[start : start + 16], ids[start:])
        rows += [output.logits[row][output.prediction_mask[row]].half() for row in range(len(output.logits))]
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(known), encoding="utf-8")
    answers = [text.strip() for text in teacher.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    return {"ids": ids, "answers": answers, "rows": rows}


def train_residual(
    student: ComposableSpeechLM,
    features: list[PosteriorFeatures],
    teacher: dict[str, list],
    minutes: float,
    settings: TrainSettings,
) -> dict[str, object]:
    """S→T on the train questions: CE on ŷ + λ·τ²·KL to the teacher's top-64 at τ = 2, frozen LM, residual only.

    A minimal loop (the real one is cmkd.train): AdamW at the project's default lr, 10 warmup steps, then cosine
    decay to 0.1x over the TIME budget (as in the research probes), batches of 8 in a seeded shuffle."""
    temperature, kd_weight, top_k = 2.0, 0.5, 64
    targets = [teacher_topk(rows.float(), top_k, temperature) for rows in teacher["rows"]]
    params = [param for _, param in student.trainable_parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    order, rng = list(range(len(features))), random.Random(0)
    log: list[tuple[float, float, float]] = []  # (elapsed s, CE/token, KD/token)
    steps = positions = examples = 0
    student.train()
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < minutes * 60:
        if steps % math.ceil(len(order) / 8) == 0:
            rng.shuffle(order)
        batch = [order[(steps * 8 + offset) % len(order)] for offset in range(8)]
        warm = min(1.0, (steps + 1) / settings.warmup_steps)
        decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / (minutes * 60))))
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * warm * decay
        prompts = [Prompt(system=SYSTEM, features=features[index].packed()) for index in batch]
        output = student(prompts, [teacher["ids"][index] for index in batch])
        teacher_rows = TopKTeacher(
            torch.cat([targets[index].ids for index in batch]),
            torch.cat([targets[index].logprobs for index in batch]),
        )
        parts = kd_loss(
            output.logits[output.prediction_mask], output.targets[output.prediction_mask], teacher_rows,
            temperature=temperature, kd_weight=kd_weight,
        )  # fmt: skip
        optimizer.zero_grad(set_to_none=True)
        (parts.total / parts.n_tokens).backward()
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        steps, examples = steps + 1, examples + len(batch)
        positions += int(output.logits.shape[0] * output.logits.shape[1])
        n = float(parts.n_tokens)
        log.append((time.perf_counter() - start, parts.ce.item() / n, parts.kd.item() / n))
    student.eval()
    wall = time.perf_counter() - start
    return {"steps": steps, "wall_s": wall, "examples": examples, "tok_s": positions / wall, "log": log}


def loss_windows(log: list[tuple[float, float, float]], minutes: float) -> list[str]:
    rows = []
    for minute in range(math.ceil(minutes)):
        window = [(ce, kd) for t, ce, kd in log if minute * 60 <= t < (minute + 1) * 60]
        if window:
            ce, kd = np.mean(window, axis=0)
            rows.append(f"| {minute}-{minute + 1} | {len(window)} | {ce:.3f} | {kd:.3f} |")
    return rows


def machine_info() -> list[str]:
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"

    return [
        f"- nproc: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, cpu: {platform.processor() or 'unknown'}",
        f"- python {platform.python_version()}, torch {torch.__version__}, transformers {version('transformers')}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-minutes", type=float, default=5.0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 on a shared 2-core box (2 stall when one is busy)",
    )
    parser.add_argument(
        "--train-lr",
        type=float,
        default=1e-4,
        help="peak lr of the residual. Not the projector default 2e-3: Adam's first step moves a zero-init "
        "output layer by about lr x ||activations||_1 (~300 here), i.e. 0.6 per dim at 2e-3 against an LM "
        "embedding RMS of 0.136, which would swamp the bridged input; 1e-4 moves it by ~0.2 RMS",
    )
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/cmkd-bench-connectors"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--limit", type=int, default=0, help="first N questions per split (0: all; smoke tests)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_connectors.py " + shlex.join(sys.argv[1:])
    began, load_start, clock = datetime.now(UTC), loadavg(), time.perf_counter()
    stage_s: dict[str, float] = {}

    def stage(name: str, since: float) -> float:
        stage_s[name] = time.perf_counter() - since
        print(
            f"[{time.perf_counter() - clock:7.1f}s] {name}: {stage_s[name]:.1f}s (load {loadavg()})",
            flush=True,
        )
        return time.perf_counter()

    train_qs, heldout_qs = load_demo_questions("train"), load_demo_questions("heldout")
    if args.limit:
        train_qs, heldout_qs = train_qs[: args.limit], heldout_qs[: args.limit]
    t = time.perf_counter()
    clips = {"train": speak(train_qs, "hibari", args.scratch)}
    clips |= {label: speak(heldout_qs, label, args.scratch) for label in VOICES}
    t = stage("TTS (cached after the first run)", t)

    lm, lm_tokenizer = load_causal_lm("smollm2")
    teacher = TextTeacher(lm, lm_tokenizer)  # frozen; the frozen-LM students share these weights
    answers_cache = args.scratch / f"teacher-answers-{MAX_NEW_TOKENS}.json"
    teacher_train = run_teacher(teacher, train_qs, answers_cache)
    teacher_heldout = run_teacher(teacher, heldout_qs, answers_cache)
    t = stage("teacher answers (cached after the first run) + logits", t)

    whisper, speech_tokenizer = load_whisper_with_tokenizer("whisper-tiny.en")
    torch.manual_seed(0)
    mlp = build_student(
        StudentSettings(projector=ProjectorSettings(kind=ProjectorKind.STACK_MLP, stack=8)),
        lm=lm, tokenizer=lm_tokenizer, encoder=whisper,
    )  # fmt: skip
    posterior_settings = ProjectorSettings(kind=ProjectorKind.POSTERIOR)
    posterior = build_student(
        StudentSettings(projector=posterior_settings), lm=lm, tokenizer=lm_tokenizer, encoder=whisper,
        speech_tokenizer=speech_tokenizer,
    )  # fmt: skip
    connector = posterior.projector
    assert isinstance(connector, PosteriorConnector)
    t = stage("build students (incl. vocabulary bridge)", t)

    posteriors: dict[str, list[PosteriorFeatures]] = {}
    decode_cost: dict[str, tuple[float, float]] = {}
    for label, label_clips in clips.items():
        decoding = (posterior_settings, TRAILING_SILENCE_S, LOOP_MIN_TOKENS, len(label_clips))
        tag = hashlib.sha256(repr(decoding).encode()).hexdigest()[:12]
        cache = args.scratch / f"posteriors-{label}-{tag}.safetensors"
        if cache.is_file():
            loaded = load_posterior_cache(cache)
            posteriors[label] = [loaded[str(index)] for index in range(len(label_clips))]
            continue
        wall, cpu = time.perf_counter(), time.process_time()
        posteriors[label] = posterior_features(
            label_clips, posterior.encoder, connector.decoder, batch_size=8
        )
        decode_cost[label] = (
            (time.perf_counter() - wall) / len(label_clips),
            (time.process_time() - cpu) / len(label_clips),
        )
        save_posterior_cache(cache, {str(index): item for index, item in enumerate(posteriors[label])})
    t = stage("Whisper posteriors (cached after the first run)", t)

    transcripts = {
        label: [speech_tokenizer.decode(item.token_ids).strip() for item in items]
        for label, items in posteriors.items()
    }
    wers = {label: corpus_wer([q.question for q in heldout_qs], transcripts[label]) for label in VOICES}
    single_piece = [
        len(lm_tokenizer(speech_tokenizer.decode([token]), add_special_tokens=False)["input_ids"]) == 1
        for item in posteriors["hibari"] for token in item.token_ids
    ]  # fmt: skip

    results: dict[tuple[str, str], Scores] = {}
    for label in VOICES:
        audio_prompts = [Prompt(system=SYSTEM, audio=clip) for clip in clips[label]]
        posterior_prompts = [Prompt(system=SYSTEM, features=item.packed()) for item in posteriors[label]]
        results[("a", label)] = evaluate(mlp, audio_prompts, heldout_qs, teacher_heldout)
        results[("b", label)] = evaluate(posterior, posterior_prompts, heldout_qs, teacher_heldout)
        cascade = [Prompt(system=SYSTEM, text=text or ".") for text in transcripts[label]]
        results[("d", label)] = text_scores(
            teacher.generate(cascade, MAX_NEW_TOKENS), heldout_qs, teacher_heldout["answers"]
        )
    text_check = text_scores(
        teacher.generate([Prompt(system=SYSTEM, text=q.question) for q in heldout_qs], MAX_NEW_TOKENS),
        heldout_qs, teacher_heldout["answers"],
    )  # fmt: skip
    t = stage("evaluate (a), (b), (d)", t)

    torch.manual_seed(0)
    train_settings = TrainSettings(lr=args.train_lr)
    training = train_residual(
        posterior, posteriors["train"], teacher_train, args.train_minutes, train_settings
    )
    t = stage(f"train posterior residual ({args.train_minutes} min budget)", t)
    for label in VOICES:
        posterior_prompts = [Prompt(system=SYSTEM, features=item.packed()) for item in posteriors[label]]
        results[("c", label)] = evaluate(posterior, posterior_prompts, heldout_qs, teacher_heldout)
    stage("evaluate (c)", t)

    names = {
        "a": "(a) stack-8 MLP projector, untrained",
        "b": "(b) posterior connector, at init",
        "c": f"(c) posterior connector, after {training['steps']} steps / {float(training['wall_s']) / 60:.1f} min S→T",
        "d": "(d) ASR cascade (Whisper transcript → SmolLM2 text)",
    }
    lines = [
        "# Speech connectors on the demo set: does question content reach the frozen LM?",
        "",
        f"Generated {began:%Y-%m-%d %H:%M} UTC by `{command}` (total {time.perf_counter() - clock:.0f} s).",
        "",
        f"{len(heldout_qs)} held-out demo questions; teacher = SmolLM2-135M-Instruct on the text, system prompt "
        f'"{SYSTEM}", greedy, {MAX_NEW_TOKENS} new tokens; students = frozen SmolLM2 + a connector. **agree**: '
        "normalised exact match with the teacher's answer; **gold**: lenient gold match; **slots**: recall of the "
        "question's slot words that the teacher's answer contains (research/cpu-feasibility-2.md); **KL/tok**, "
        "**NLL**: KL(teacher‖student) at τ=1 and the student's NLL, per teacher response token, teacher-forced. "
        "Target (issue 10): agree ≥ 0.3 and slots ≥ 0.5 in the training voice (hibari).",
        "",
        "| connector | voice | agree | gold | slots | KL/tok | NLL |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in "abcd":
        for label in VOICES:
            s = results[(key, label)]
            kl = "–" if s.kl is None else f"{s.kl:.3f}"
            nll = "–" if s.nll is None else f"{s.nll:.3f}"
            lines.append(
                f"| {names[key]} | {label} | {s.agree:.2f} | {s.gold:.2f} | {s.slot_recall:.2f} | {kl} | {nll} |"
            )
    lines.append(
        f"| teacher, text (sanity) | – | {text_check.agree:.2f} | {text_check.gold:.2f} | {text_check.slot_recall:.2f} | – | – |"
    )
    lines += [
        "",
        "## The posterior connector",
        "",
        f"- Whisper greedy transcript WER on the held-out questions: hibari {wers['hibari']:.3f}, espeak {wers['espeak']:.3f}"
        f" (decoded with {posterior_settings.posterior_window_s:.0f} s+ silence-padded windows, top-{connector.top_k}).",
        f"- Vocabulary bridge: {int(connector.bridge_known.sum())} of {connector.bridge.shape[0]} Whisper tokens map to "
        f"SmolLM2 pieces ({connector.bridge.numel() * 4 / 2**20:.0f} MiB fp32, rebuilt at build time); "
        f"{np.mean(single_piece):.0%} of the tokens Whisper decoded for the hibari held-out clips are ONE SmolLM2 piece.",
        f"- Trainable parameters: posterior residual {sum(p.numel() for _, p in posterior.trainable_parameters()):,}; "
        f"stack-8 MLP {sum(p.numel() for _, p in mlp.trainable_parameters()):,}.",
        f"- LM positions per question for the audio: posterior {np.mean([len(i.token_ids) for i in posteriors['hibari']]):.1f} "
        f"(one per Whisper token); stack-8 {np.mean([math.ceil(len(c) / 320 / 8) for c in clips['hibari']]):.1f}.",
        "- Posterior extraction, s/clip (wall, CPU) in batches of 8: "
        + (
            ", ".join(f"{k} {w:.2f}, {c:.2f}" for k, (w, c) in decode_cost.items())
            or "read from the cache this run"
        ),
        "",
        f"## Training run (c): {training['steps']} steps, {training['examples']} examples "
        f"({int(training['examples']) / len(train_qs):.1f} epochs of {len(train_qs)} train questions), "
        f"{float(training['tok_s']):.0f} LM tokens/s",
        "",
        f"AdamW peak lr {train_settings.lr} (see --train-lr for why not the projector default), warmup {train_settings.warmup_steps}, cosine over the time "
        f"budget to 0.1x, batch 8, grad clip {train_settings.max_grad_norm}; CE on ŷ + 0.5·τ²·KL to the teacher's "
        "top-64 at τ=2; posteriors read from the cache (no Whisper decoding in the loop).",
        "",
        "| minute | steps | CE/token | KD/token (τ², sparse top-64) |",
        "|---|---|---|---|",
        *loss_windows(training["log"], args.train_minutes),  # type: ignore[arg-type]
        "",
        "## Examples (hibari, first 6 held-out questions)",
        "",
        "| question | teacher | (a) MLP | (b) posterior init | (c) posterior trained | (d) cascade |",
        "|---|---|---|---|---|---|",
    ]
    for index in range(min(6, len(heldout_qs))):
        cells = [heldout_qs[index].question, teacher_heldout["answers"][index]]
        cells += [results[(key, "hibari")].answers[index] for key in "abcd"]
        lines.append("| " + " | ".join(cell.replace("|", "/").replace("\n", " ") for cell in cells) + " |")
    lines += ["", "## Machine and cost", "", *machine_info()]
    lines += [f"- {name}: {seconds:.1f} s" for name, seconds in stage_s.items()]
    lines += [
        f"- peak RSS of the process: {peak_rss_gib():.1f} GiB",
        f"- load average (1/5/15 min) at start: {load_start}; at end: {loadavg()}",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (args.scratch / "answers.json").write_text(
        json.dumps({f"{k}-{v}": s.answers for (k, v), s in results.items()}, indent=1), encoding="utf-8"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
