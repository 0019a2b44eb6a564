"""The frozen speech-encoder feature cache: encoder frames per clip, computed once by `cmkd prepare`.

Why: with a frozen encoder, training and evaluation would run the same Whisper encoder over the same clips every
epoch. The cache stores each clip's frames [T_enc, D] once. They are made by `encode_clip`, the SAME code path
the student uses online (`WhisperSpeechEncoder` at the clip's real length, no 30 s padding, one clip at a time),
so a cached clip and an online clip give identical tensors in float32 (tested), and the cache is a pure speed-up.

Layout, under the data root:

    features/meta.json                                   encoder name, weights hash, D, dtype (checked on open)
    features/<audio path>.safetensors                    one file per clip, tensor keyed by the audio path

One file per clip, named after the clip's audio path: a file is written atomically (temp + rename) when its clip
is done, so a killed run leaves whole files only, parallel shards never touch the same file, and a clip whose
audio changes simply overwrites its own file. `FeatureCache.get(audio_rel_path)` is the reader train and eval use.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save

from cmkd.data.jsonl_io import atomic_write_bytes, atomic_write_text
from cmkd.data.records import check_relative_audio_path
from cmkd.errors import UserError
from cmkd.models.encoder import WhisperSpeechEncoder
from cmkd.models.posterior import WhisperPosteriorDecoder
from cmkd.stage_configs import DType, FeatureKind, FeatureSettings

FEATURES_DIR = "features"
_TORCH_DTYPES = {DType.FLOAT32: torch.float32, DType.BFLOAT16: torch.bfloat16, DType.FLOAT16: torch.float16}


@dataclass(frozen=True)
class FeatureMeta:
    """What the cache was made with; a reader refuses a cache from other weights or other decode settings.

    kind "frames": encoder frames [T_enc, D]. kind "posterior": Whisper's decoded posteriors packed as
    [N_tokens, 2k + D_dec] (`PosteriorFeatures.packed`), with `decode` naming the decode settings."""

    encoder: str
    weights_hash: str
    dim: int
    dtype: str
    frames_per_second: float = 50.0
    kind: str = FeatureKind.FRAMES.value
    decode: str = ""

    def first_difference(self, other: FeatureMeta, fields: tuple[str, ...]) -> str | None:
        """The first of `fields` in which the two metas differ, or None."""
        return next((name for name in fields if getattr(self, name) != getattr(other, name)), None)


MADE_BY = ("kind", "decode", "weights_hash", "dim", "dtype")
"""What makes two caches the same cache: a writer that differs in any of these rebuilds it."""
READ_BY = ("kind", "decode", "weights_hash", "dim")
"""What a reader must match (not dtype: frames of any stored precision are read as float32)."""


def _weights_hash(*modules: torch.nn.Module) -> str:
    """A fingerprint of weights (names, shapes, dtypes and bytes): modules that give the same hash give the same
    features, whatever path or name they were loaded under."""
    digest = hashlib.sha256()
    for position, module in enumerate(modules):
        for name, tensor in sorted(module.state_dict().items()):
            values = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{position}:{name}\t{tuple(tensor.shape)}\t{values.dtype}\n".encode())
            digest.update(values.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def encoder_weights_hash(encoder: WhisperSpeechEncoder) -> str:
    return _weights_hash(encoder.whisper)


def decode_tag(top_k: int, max_tokens: int, window_s: float) -> str:
    """The posterior decode settings a cache was made with, as one comparable string."""
    return f"top_k={top_k},max_tokens={max_tokens},window_s={window_s:g}"


def feature_meta(
    encoder: WhisperSpeechEncoder, settings: FeatureSettings, decoder: WhisperPosteriorDecoder | None = None
) -> FeatureMeta:
    """The meta of a cache made by `encoder` (+ `decoder` for kind=posterior) under `settings`."""
    if settings.kind is FeatureKind.FRAMES:
        return FeatureMeta(
            encoder=settings.encoder,
            weights_hash=encoder_weights_hash(encoder),
            dim=encoder.hidden_size,
            dtype=settings.dtype.value,
        )
    if decoder is None:
        raise UserError("features.kind=posterior: the cache needs the Whisper decoder, none was given")
    return posterior_meta(encoder, decoder, settings.encoder)


def posterior_meta(encoder: WhisperSpeechEncoder, decoder: WhisperPosteriorDecoder, name: str) -> FeatureMeta:
    return FeatureMeta(
        encoder=name,
        weights_hash=_weights_hash(encoder.whisper, decoder),
        dim=2 * decoder.top_k + decoder.hidden_size,
        dtype=DType.FLOAT32.value,
        kind=FeatureKind.POSTERIOR.value,
        decode=decode_tag(decoder.top_k, decoder.max_tokens, decoder.window_s),
    )


@torch.inference_mode()
def encode_clip(encoder: WhisperSpeechEncoder, audio_16k: np.ndarray) -> torch.Tensor:
    """One 16 kHz mono clip -> encoder frames [T_enc, D] float32: the code path both the cache and online use."""
    frames, frame_mask = encoder([audio_16k])  # 1, T_enc, D and 1, T_enc
    length = int(frame_mask[0].sum())
    return frames[0, :length].float().cpu().contiguous()  # T_enc, D


def feature_relpath(audio_rel_path: str) -> str:
    """Where a clip's features live, relative to the data root: `features/<audio path>.safetensors`."""
    check_relative_audio_path(audio_rel_path, audio_rel_path)
    return f"{FEATURES_DIR}/{audio_rel_path}.safetensors"


def write_clip_features(root: Path, audio_rel_path: str, frames: torch.Tensor, dtype: DType) -> Path:
    """Store one clip's frames [T_enc, D] atomically, keyed by its audio path."""
    target = Path(root) / feature_relpath(audio_rel_path)
    data = save({audio_rel_path: frames.to(_TORCH_DTYPES[dtype]).contiguous()})
    atomic_write_bytes(target, data)
    return target


def read_feature_meta(root: Path) -> FeatureMeta | None:
    meta_path = Path(root) / FEATURES_DIR / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        return FeatureMeta(**json.loads(meta_path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as err:
        raise UserError(
            f"{meta_path}: unreadable feature-cache meta ({err}); delete {meta_path.parent}"
        ) from None


def write_feature_meta(root: Path, meta: FeatureMeta) -> None:
    atomic_write_text(Path(root) / FEATURES_DIR / "meta.json", json.dumps(asdict(meta), indent=2) + "\n")


class FeatureCache:
    """Cached encoder frames by audio path (relative to the data root, as in the manifest's `speech.audio`).

    `expected`: the meta of the run reading the cache (e.g. `feature_meta(student_encoder, settings)`); any
    difference in encoder weights, width or dtype is refused, because mixing features from two encoders would
    train the projector on inputs it never sees at inference.
    """

    def __init__(self, root: str | Path, expected: FeatureMeta | None = None) -> None:
        self.root = Path(root)
        meta = read_feature_meta(self.root)
        if meta is None:
            raise UserError(
                f"{self.root / FEATURES_DIR}: no feature cache (meta.json missing); run `cmkd prepare` with "
                "features enabled, or compute features online"
            )
        self.meta = meta
        name = meta.first_difference(expected, MADE_BY) if expected is not None else None
        if name is not None:
            have, want = getattr(meta, name), getattr(expected, name)
            raise UserError(
                f"feature cache '{self.root / FEATURES_DIR}': {name} is {have!r} but this run needs "
                f"{want!r} (made by encoder {meta.encoder!r}); re-run `cmkd prepare` with this encoder"
            )

    def path(self, audio_rel_path: str) -> Path:
        return self.root / feature_relpath(audio_rel_path)

    def __contains__(self, audio_rel_path: str) -> bool:
        return self.path(audio_rel_path).is_file()

    def get(self, audio_rel_path: str) -> torch.Tensor:
        """Frames [T_enc, D] (kind=posterior: packed posteriors [N, 2k + D]) of one clip, as float32."""
        path = self.path(audio_rel_path)
        if not path.is_file():
            raise UserError(f"{audio_rel_path}: not in the feature cache ({path}); re-run `cmkd prepare`")
        tensors = load_file(str(path))
        if audio_rel_path not in tensors:
            raise UserError(f"{path}: holds {sorted(tensors)}, not {audio_rel_path!r}; re-run `cmkd prepare`")
        frames = tensors[audio_rel_path]
        if frames.ndim != 2 or frames.shape[1] != self.meta.dim:
            raise UserError(f"{path}: frames of shape {tuple(frames.shape)}, expected [T, {self.meta.dim}]")
        return frames.float()
