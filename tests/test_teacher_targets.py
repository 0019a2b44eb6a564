"""Teacher targets: batched generation equals one-by-one, and the cached top-k rows equal a teacher-forced pass."""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from cmkd.data.teacher_targets import TeacherRequest, generate_batch, generate_targets
from cmkd.losses import teacher_topk
from cmkd.models.loading import chat_prompt_ids

REQUESTS = [
    TeacherRequest("q1", "What is the capital of france?", "Answer the question in a few words."),
    TeacherRequest("q2", "What is two plus two?", None),
    TeacherRequest("q3", "What sounds like a cat? Answer the question in a few words.", "Be brief."),
]


def test_batched_equals_one_by_one(
    tiny_lm: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    batched = generate_batch(tiny_lm, tiny_tokenizer, REQUESTS, max_new_tokens=6)
    for request, target in zip(REQUESTS, batched, strict=True):
        (alone,) = generate_batch(tiny_lm, tiny_tokenizer, [request], max_new_tokens=6)
        assert target.response_ids == alone.response_ids
        assert target.item_id == request.item_id


def test_topk_rows_equal_teacher_forced_pass(
    tiny_lm: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    """Taking the top-k during generation is exact: same rows as running the teacher on Q_t + ŷ afterwards."""
    targets = generate_batch(tiny_lm, tiny_tokenizer, REQUESTS, max_new_tokens=5, top_k=7, temperature=2.0)
    for request, target in zip(REQUESTS, targets, strict=True):
        assert target.topk is not None
        n_rows = len(target.response_ids) + 1
        assert target.topk.ids.shape == (n_rows, 7)
        prompt = chat_prompt_ids(tiny_tokenizer, request.prompt, request.system)
        sequence = torch.tensor([prompt + target.response_ids])  # 1, P + n
        with torch.no_grad():
            logits = tiny_lm(sequence).logits[0]  # P + n, V
        rows = logits[
            len(prompt) - 1 : len(prompt) - 1 + n_rows
        ]  # n + 1, V: the positions that predict ŷ and eot
        expected = teacher_topk(rows, 7, 2.0)
        assert torch.equal(target.topk.ids.long(), expected.ids.long())
        assert torch.allclose(target.topk.logprobs, expected.logprobs, atol=1e-4)


def test_stop_and_truncation(tiny_lm: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast) -> None:
    (free,) = generate_batch(tiny_lm, tiny_tokenizer, REQUESTS[:1], max_new_tokens=4)
    assert free.truncated and len(free.response_ids) == 4
    # Make the model's third generated token an end-of-turn id: the response must stop right before it.
    stop_token = free.response_ids[2]
    tiny_lm.generation_config.eos_token_id = stop_token
    (stopped,) = generate_batch(tiny_lm, tiny_tokenizer, REQUESTS[:1], max_new_tokens=4, top_k=3)
    first_stop = free.response_ids.index(stop_token)
    assert not stopped.truncated
    assert stopped.response_ids == free.response_ids[:first_stop]
    assert stopped.topk is not None and stopped.topk.ids.shape[0] == first_stop + 1


def test_generate_targets_covers_every_request_once(
    tiny_lm: LlamaForCausalLM, tiny_tokenizer: PreTrainedTokenizerFast
) -> None:
    batches = list(generate_targets(tiny_lm, tiny_tokenizer, REQUESTS, batch_size=2, max_new_tokens=3))
    assert [len(b) for b in batches] == [2, 1]
    assert sorted(t.item_id for b in batches for t in b) == ["q1", "q2", "q3"]
