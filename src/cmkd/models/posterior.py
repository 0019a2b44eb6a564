"""Whisper's own per-token posteriors as the speech input: greedy decoding that keeps, for every decoded token, its
top-k distribution and the decoder's last hidden state (the input of `cmkd.models.posterior_connector`).

Why: the CPU probes (research/cpu-feasibility*.md) found that a projector on encoder frames learns the question's
type in 10-20 CPU minutes but not its words, while Whisper's frozen decoder already knows the words (the ASR
cascade agrees with the teacher 69% of the time). Its posteriors are a soft transcript: what it heard, how sure it
was, and the runner-up words, which a connector can carry into the LM from the first step.

Decoding facts, measured with tiny.en on 30-40 held-out demo clips of 2-3 s (1 CPU thread, a shared machine):
- Whisper stops (emits <|endoftext|>) only when the speech is followed by enough silence, as in its 30 s training
  windows. On real-length features it repeated the question until the token limit (WER 5.3). Padding with 3 s of
  silence still looped (WER 0.43 hibari); 5 s was enough for hibari (0.008) but not for espeak (0.53 vs 0.35);
  7 s matched a full 30 s window on both voices (0.008 / 0.35) at about a quarter of its encoder cost. So every
  clip is padded with digital silence to its own window (`window_samples`), and a batch masks, not shares, them.
  Even so, 18 of 460 hibari demo clips (2-3 s) looped in that window (a sentence repeated to the token limit);
  all 18 decoded cleanly in 15 s or 30 s. So a row is stopped as soon as its text ends in a repeated block, and
  any clip Whisper did not end itself is decoded once more in a full 30 s window (`posterior_features`).
- transformers' `WhisperDecoder.forward` passes no encoder mask to cross-attention, so a batch of clips with
  different windows would attend into each other's padding. `WhisperPosteriorDecoder` runs the decoder's own
  modules (embed_tokens, embed_positions, layers, layer_norm) in the same order with a cross-attention mask, one
  query position per call, on transformers' KV cache; the per-layer maths stay transformers' (no model code copied).
- CTranslate2's `generate(return_logits_vocab=True)` gives per-step log-probs at about the same speed on 30 s
  windows, but no decoder hidden states and no shorter windows; the torch loop gives both.

The posteriors come from greedy decoding with Whisper's own suppression rules (its generation config), so the
top-1 of every step IS the transcript token. Only steps whose greedy token is ordinary text are kept (no
<|endoftext|>, timestamps or other special tokens): one LM position per decoded word piece.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cmkd.errors import UserError
from cmkd.models.encoder import EMBEDDED_ENCODER_NAMES, WhisperSpeechEncoder
from cmkd.models.speech_lm import SAMPLE_RATE

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, WhisperForConditionalGeneration

CACHE_FORMAT = 1
LOOP_MIN_TOKENS = 4
"""Shortest repeated block that counts as a decoding loop (a repeated sentence); shorter repeats ("very very")
are ordinary speech."""
TRAILING_SILENCE_S = 7.0
"""Least silence after the speech in a clip's decoding window (the shortest that decoded as well as a 30 s window
for both demo voices; see the module docstring)."""


@dataclass
class PosteriorFeatures:
    """One clip's decoded steps: N text tokens, each with its top-k ids/probs and the decoder's hidden state.

    `topk_ids` [N, k] long (column 0 is the greedy token, i.e. the transcript), `topk_probs` [N, k] float32
    (Whisper's probabilities after its suppression rules, not renormalised), `decoder_hidden` [N, D] float32
    (final-norm decoder state, the vector Whisper's output layer reads)."""

    topk_ids: torch.Tensor
    topk_probs: torch.Tensor
    decoder_hidden: torch.Tensor

    def __post_init__(self) -> None:
        steps = self.topk_ids.shape[0]
        if self.topk_ids.shape != self.topk_probs.shape or self.decoder_hidden.shape[0] != steps:
            raise UserError(
                f"posterior features: topk_ids {tuple(self.topk_ids.shape)}, topk_probs "
                f"{tuple(self.topk_probs.shape)} and decoder_hidden {tuple(self.decoder_hidden.shape)} disagree"
            )

    @property
    def top_k(self) -> int:
        return int(self.topk_ids.shape[1])

    @property
    def token_ids(self) -> list[int]:
        """The greedy transcript as Whisper token ids."""
        return [int(token) for token in self.topk_ids[:, 0]]

    def packed(self) -> torch.Tensor:
        """[N, 2k + D] float32: ids | probs | hidden, the layout `Prompt.features` carries for this connector.

        One 2-D tensor keeps the `Prompt` contract (cached speech input is one [T, D] tensor per prompt). The ids
        survive the float32 round trip exactly (vocabularies are far below 2**24); never pack into fp16."""
        return torch.cat(
            [self.topk_ids.float(), self.topk_probs.float(), self.decoder_hidden.float()], dim=1
        )  # N, k + k + D

    @classmethod
    def from_packed(cls, packed: torch.Tensor, top_k: int) -> PosteriorFeatures:
        """Inverse of `packed`. Refuses half precision: fp16 rounds ids above 2048 to OTHER whole numbers, a
        silent change of words that no later check could see."""
        if packed.dim() != 2 or packed.shape[1] <= 2 * top_k:
            raise UserError(
                f"prompt.features: expected packed posteriors [N, 2*{top_k} + D], got {tuple(packed.shape)}"
            )
        if packed.dtype not in (torch.float32, torch.float64):
            raise UserError(f"prompt.features: packed posteriors must be float32, got {packed.dtype}")
        ids = packed[:, :top_k]  # N, k
        if not torch.equal(ids, ids.round()) or bool((ids < 0).any()):
            raise UserError("prompt.features: packed posterior ids are not whole non-negative numbers")
        return cls(ids.long(), packed[:, top_k : 2 * top_k].float(), packed[:, 2 * top_k :].float())


def audio_digest(audio_16k: np.ndarray) -> str:
    """A clip's identity by content: Whisper is frozen, so equal samples give equal posteriors."""
    return hashlib.sha1(np.ascontiguousarray(audio_16k).tobytes()).hexdigest()


def window_samples(num_samples: int, min_window_s: float, max_window_s: float = 30.0) -> int:
    """Samples in a clip's decoding window: max(min_window_s, length + TRAILING_SILENCE_S), capped at 30 s."""
    seconds = max(min_window_s, num_samples / SAMPLE_RATE + TRAILING_SILENCE_S)
    return max(num_samples, min(math.ceil(seconds * SAMPLE_RATE), round(max_window_s * SAMPLE_RATE)))


class WhisperPosteriorDecoder(nn.Module):
    """Frozen Whisper decoder + output layer: encoder frames in, per-clip `PosteriorFeatures` out (greedy, batched)."""

    def __init__(
        self,
        whisper: WhisperForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase,
        *,
        top_k: int,
        max_tokens: int,
        window_s: float,
    ) -> None:
        super().__init__()
        self.decoder: Any = whisper.get_decoder()
        self.proj_out: nn.Linear = whisper.get_output_embeddings()
        self.requires_grad_(False).eval()
        vocab_size = int(self.proj_out.weight.shape[0])
        if not 1 <= top_k <= vocab_size:
            raise UserError(f"student.projector.posterior_top_k: must lie in [1, {vocab_size}], got {top_k}")
        self.top_k = top_k
        self.window_s = window_s
        generation = whisper.generation_config
        self.prompt_ids = _decoder_prompt(generation, whisper.config)
        positions = int(self.decoder.embed_positions.weight.shape[0])
        self.max_tokens = min(max_tokens, positions - len(self.prompt_ids))
        self.eos_id = int(
            generation.eos_token_id if generation.eos_token_id is not None else whisper.config.eos_token_id
        )
        self.suppress_ids = list(getattr(generation, "suppress_tokens", None) or [])
        self.begin_suppress_ids = list(getattr(generation, "begin_suppress_tokens", None) or [])
        self.register_buffer("text_token_mask", text_token_mask(tokenizer, vocab_size), persistent=False)

    @property
    def hidden_size(self) -> int:
        return int(self.proj_out.weight.shape[1])

    def train(self, mode: bool = True) -> WhisperPosteriorDecoder:
        """Frozen: stays in eval mode whatever the caller asks."""
        super().train(False)
        return self

    def _step(
        self, tokens: torch.Tensor, position: int, frames: torch.Tensor, cross_mask: Any, cache: Any
    ) -> torch.Tensor:
        """One decoder position for the whole batch: tokens [B] -> final-norm hidden [B, D] (KV cache updated)."""
        hidden = self.decoder.embed_tokens(tokens[:, None])  # B -> B, 1, D
        hidden = hidden + self.decoder.embed_positions.weight[position]  # B, 1, D + D
        for layer in self.decoder.layers:
            # One query position that may see its whole past: self-attention needs no mask.
            hidden = layer(hidden, None, frames, encoder_attention_mask=cross_mask, past_key_values=cache)
        return self.decoder.layer_norm(hidden)[:, 0]  # B, 1, D -> B, D

    @torch.no_grad()
    def forward(
        self, frames: torch.Tensor, frame_mask: torch.Tensor, stop_on_repeat: bool = True
    ) -> tuple[list[PosteriorFeatures], list[bool]]:
        """Encoder frames [B, T, D] (zeros past each window) and frame mask [B, T] -> one `PosteriorFeatures` per
        row, and per row whether Whisper ended it itself (<|endoftext|>) rather than the token limit or, with
        `stop_on_repeat`, a loop (its text ending in the same block of >= LOOP_MIN_TOKENS tokens twice)."""
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache
        from transformers.masking_utils import create_bidirectional_mask

        batch, device = frames.shape[0], frames.device
        frames = frames.to(self.proj_out.weight.dtype)
        probe = frames.new_zeros(batch, 1, frames.shape[-1])  # B, 1, D: the query shape of every step
        # None when nothing is padded, else [B, 1, 1, T] in the attention implementation's format.
        cross_mask = create_bidirectional_mask(
            config=self.decoder.config,
            inputs_embeds=probe,
            attention_mask=frame_mask,
            encoder_hidden_states=frames,
        )
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        # The prompt goes in one token per call too, so prompt and answer share one code path.
        for position, token in enumerate(self.prompt_ids[:-1]):
            self._step(torch.full((batch,), token, device=device), position, frames, cross_mask, cache)
        tokens = torch.full((batch,), self.prompt_ids[-1], device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)  # B
        ended = torch.zeros(batch, dtype=torch.bool, device=device)  # B: finished by <|endoftext|>
        texts: list[list[int]] = [[] for _ in range(batch)]  # kept greedy tokens per row, for the loop check
        step_ids, step_probs, step_hidden, step_kept = [], [], [], []
        for step in range(self.max_tokens):
            hidden = self._step(tokens, len(self.prompt_ids) - 1 + step, frames, cross_mask, cache)  # B, D
            logits = F.linear(hidden, self.proj_out.weight).float()  # B, D -> B, V
            suppressed = self.suppress_ids + (self.begin_suppress_ids if step == 0 else [])
            if suppressed:
                logits[:, suppressed] = -math.inf
            top_probs, top_ids = logits.softmax(dim=-1).topk(self.top_k, dim=-1)  # B, k and B, k
            greedy = top_ids[:, 0]  # B
            step_ids.append(top_ids)
            step_probs.append(top_probs)
            step_hidden.append(hidden.float())
            kept = ~finished & self.text_token_mask[greedy]  # B: a text token of a live row
            step_kept.append(kept)
            ended |= ~finished & (greedy == self.eos_id)
            finished = finished | (greedy == self.eos_id)
            if stop_on_repeat:
                for row in kept.nonzero().flatten().tolist():
                    texts[row].append(int(greedy[row]))
                    finished[row] |= ends_in_a_loop(texts[row])
            if bool(finished.all()):
                break
            tokens = greedy.masked_fill(finished, self.eos_id)
        if not step_ids:
            return [_empty(self.top_k, self.hidden_size) for _ in range(batch)], [False] * batch
        ids, probs = torch.stack(step_ids, 1), torch.stack(step_probs, 1)  # B, S, k each
        hiddens, kept = torch.stack(step_hidden, 1), torch.stack(step_kept, 1)  # B, S, D and B, S
        rows = [(ids[row, kept[row]], probs[row, kept[row]], hiddens[row, kept[row]]) for row in range(batch)]
        features = [
            PosteriorFeatures(*(tensor.cpu() for tensor in row)) for row in rows
        ]  # N_b, k; N_b, k; N_b, D
        return features, ended.tolist()


def ends_in_a_loop(tokens: list[int]) -> bool:
    """Whether the sequence ends with the same block of >= LOOP_MIN_TOKENS tokens twice in a row."""
    return any(
        tokens[-width:] == tokens[-2 * width : -width]
        for width in range(LOOP_MIN_TOKENS, len(tokens) // 2 + 1)
    )


def _empty(top_k: int, hidden_size: int) -> PosteriorFeatures:
    return PosteriorFeatures(
        torch.zeros(0, top_k, dtype=torch.long), torch.zeros(0, top_k), torch.zeros(0, hidden_size)
    )


def _decoder_prompt(generation: Any, config: Any) -> list[int]:
    """<|startoftranscript|> [<|en|> <|transcribe|>] [<|notimestamps|>]: English transcription, no timestamps."""
    start = generation.decoder_start_token_id or config.decoder_start_token_id
    prompt = [int(start)]
    if getattr(generation, "is_multilingual", False):
        lang_ids, task_ids = getattr(generation, "lang_to_id", {}), getattr(generation, "task_to_id", {})
        if "<|en|>" not in lang_ids or "transcribe" not in task_ids:
            raise UserError(
                "student.encoder: a multilingual Whisper without <|en|>/transcribe ids in its config"
            )
        prompt += [int(lang_ids["<|en|>"]), int(task_ids["transcribe"])]
    no_timestamps = getattr(generation, "no_timestamps_token_id", None)
    return prompt + ([int(no_timestamps)] if no_timestamps is not None else [])


def text_token_mask(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> torch.Tensor:
    """[V] bool: True for ids that are ordinary text pieces (not special/added tokens such as timestamps, not past
    the tokenizer's end). Whisper's specials, <|0.00|> timestamps included, are all added tokens."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[: min(len(tokenizer), vocab_size)] = True
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    mask[[index for index in special if index < vocab_size]] = False
    return mask


def posterior_features(
    audios: Sequence[np.ndarray],
    encoder: WhisperSpeechEncoder,
    decoder: WhisperPosteriorDecoder,
    batch_size: int = 8,
) -> list[PosteriorFeatures]:
    """16 kHz clips -> `PosteriorFeatures` in input order: what the prepare stage caches and the student decodes.

    Clips are batched by length (similar transcript lengths waste fewer steps on finished rows); each clip is
    padded with silence to its own window, so its result does not depend on what it is batched with. A clip that
    Whisper does not end itself (it loops, or hits the token limit) is decoded again in a full 30 s window, as
    Whisper was trained; measured on the demo clips, 18 of 460 hibari clips looped in their 10 s window and none
    in 15 s or 30 s, so the short window plus this fallback keeps the common case cheap."""
    if batch_size < 1:
        raise UserError(f"batch_size: must be at least 1, got {batch_size}")
    results: list[PosteriorFeatures | None] = [None] * len(audios)
    order = sorted(range(len(audios)), key=lambda index: len(audios[index]))
    retry: list[int] = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        for row, features, ended in zip(
            rows, *_decode(audios, rows, encoder, decoder, decoder.window_s), strict=True
        ):
            results[row] = features
            if not ended:
                retry.append(row)
    for start in range(0, len(retry), batch_size):
        rows = retry[start : start + batch_size]
        full_window = encoder.max_frames * 2 * encoder.feature_extractor.hop_length / SAMPLE_RATE  # 30 s
        retried, _ = _decode(audios, rows, encoder, decoder, full_window, stop_on_repeat=False)
        for row, features in zip(rows, retried, strict=True):
            results[row] = features
    return [features for features in results if features is not None]


def _decode(
    audios: Sequence[np.ndarray],
    rows: list[int],
    encoder: WhisperSpeechEncoder,
    decoder: WhisperPosteriorDecoder,
    min_window_s: float,
    stop_on_repeat: bool = True,
) -> tuple[list[PosteriorFeatures], list[bool]]:
    """Decode `audios[rows]` as one batch, each clip followed by silence up to its own window."""
    lengths = [len(audios[index]) for index in rows]
    windows = [
        np.pad(audios[index], (0, window_samples(length, min_window_s) - length))
        for index, length in zip(rows, lengths, strict=True)
    ]
    with torch.no_grad():
        frames, frame_mask = encoder(windows)  # B, T, D and B, T
        return decoder(frames, frame_mask, stop_on_repeat=stop_on_repeat)


def load_whisper_with_tokenizer(
    source: str,
) -> tuple[WhisperForConditionalGeneration, PreTrainedTokenizerBase]:
    """The whole Whisper model (decoder included) and its tokenizer: 'whisper-tiny.en' or a local Whisper dir."""
    from transformers import AutoTokenizer, WhisperForConditionalGeneration

    if source.strip().lower() in EMBEDDED_ENCODER_NAMES:
        from cmkd import assets

        directory = assets.whisper_path()
    else:
        directory = Path(source).expanduser()
    if not (directory / "config.json").is_file():
        raise UserError(f"student.encoder: {directory} is not a Whisper checkpoint dir (no config.json)")
    try:  # safetensors only: a pickled pytorch_model.bin can run code when it is loaded
        model = WhisperForConditionalGeneration.from_pretrained(
            directory, dtype=torch.float32, use_safetensors=True
        ).eval()
    except (OSError, ValueError) as error:
        raise UserError(f"student.encoder: could not load {directory} ({error})") from None
    return model, AutoTokenizer.from_pretrained(directory)


# -- the prepare stage's cache ------------------------------------------------------------------------------------


def save_posterior_cache(path: Path, features: Mapping[str, PosteriorFeatures]) -> Path:
    """Write {clip id: features} to one safetensors file: ids int32, probs and hidden states fp16, row offsets.

    fp16 halves the file and is far below the noise that matters here (probs to ~1e-3 relative); ids stay
    integers on disk and are only packed into float32 in memory."""
    from safetensors.torch import save_file

    if not features:
        raise UserError("posterior cache: nothing to save")
    items = list(features.values())
    top_k = {item.top_k for item in items}
    if len(top_k) != 1:
        raise UserError(f"posterior cache: clips have different top-k {sorted(top_k)}")
    lengths = torch.tensor([0] + [item.topk_ids.shape[0] for item in items])
    tensors = {
        "topk_ids": torch.cat([item.topk_ids for item in items]).to(torch.int32).contiguous(),
        "topk_probs": torch.cat([item.topk_probs for item in items]).to(torch.float16).contiguous(),
        "decoder_hidden": torch.cat([item.decoder_hidden for item in items]).to(torch.float16).contiguous(),
        "offsets": lengths.cumsum(0).to(torch.int64),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    metadata = {"format": str(CACHE_FORMAT), "ids": json.dumps(list(features))}
    save_file(tensors, str(temporary), metadata=metadata)
    temporary.replace(path)
    return path


def load_posterior_cache(path: Path) -> dict[str, PosteriorFeatures]:
    """Read a file written by `save_posterior_cache` back to {clip id: features} (float32 in memory)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"posterior cache {path}: no such file")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != str(CACHE_FORMAT) or "ids" not in metadata:
        raise UserError(f"posterior cache {path}: not a cmkd posterior cache (format {CACHE_FORMAT})")
    tensors = load_file(str(path))
    offsets = tensors["offsets"].tolist()
    clip_ids = json.loads(metadata["ids"])
    return {
        clip_id: PosteriorFeatures(
            tensors["topk_ids"][start:end].long(),
            tensors["topk_probs"][start:end].float(),
            tensors["decoder_hidden"][start:end].float(),
        )
        for clip_id, start, end in zip(clip_ids, offsets[:-1], offsets[1:], strict=True)
    }
