"""Teacher responses ŷ and their top-k logits, in one batched generation pass.

Why one pass: greedy generation already computes p_T(· | Q_t, ŷ<i) at every response position, which is exactly
what the KD term needs (the teacher always reads the text query). Taking the top-k there, instead of running the
teacher a second time over Q_t + ŷ, halves the teacher's cost. `output_logits=True` returns the raw logits,
before any sampling processor, so the cached distribution is the teacher's own even when ŷ is sampled.

Rows per item: one per response token plus one for the end of the turn (the student learns to stop there). We
ask `generate` for one token more than `max_new_tokens`; a response that runs past the limit is cut to
`max_new_tokens` tokens, flagged `truncated`, and its last row is the teacher's distribution after the cut.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cmkd.errors import UserError
from cmkd.losses import TopKTeacher, teacher_topk
from cmkd.models.loading import chat_prompt_ids
from cmkd.models.speech_lm import ChatFormat, pad_sequences


@dataclass(frozen=True)
class TeacherRequest:
    item_id: str
    prompt: str
    system: str | None


@dataclass(frozen=True)
class TeacherTarget:
    item_id: str
    response: str  # decoded ŷ, special tokens removed
    response_ids: list[int]  # ŷ token ids, without the end-of-turn token
    truncated: bool  # ŷ was cut at max_new_tokens
    topk: TopKTeacher | None  # [len(response_ids) + 1, k] rows, or None when no cache is asked for


def end_of_turn_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends an assistant turn: the chat template's end of turn and eos (`ChatFormat.stop_ids`), plus
    whatever the model's generation config adds."""
    ids = set(ChatFormat(tokenizer).stop_ids)
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    return sorted(ids)


@torch.inference_mode()
def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[TeacherRequest],
    *,
    max_new_tokens: int,
    top_k: int = 0,
    temperature: float = 1.0,
    do_sample: bool = False,
    sample_temperature: float = 1.0,
) -> list[TeacherTarget]:
    """Generate ŷ for a batch of text questions (left-padded), with top-k log-probs at τ when `top_k > 0`."""
    stops = end_of_turn_ids(model, tokenizer)
    pad_id = ChatFormat(tokenizer).pad_id
    prompts = [chat_prompt_ids(tokenizer, r.prompt, r.system) for r in requests]
    input_ids, attention_mask = pad_sequences(prompts, pad_id, left_pad=True)  # B, P each
    output = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        max_new_tokens=max_new_tokens + 1,
        do_sample=do_sample,
        temperature=sample_temperature if do_sample else None,
        top_p=None,
        top_k=None,
        eos_token_id=stops,
        pad_token_id=pad_id,
        return_dict_in_generate=True,
        output_logits=top_k > 0,
    )
    generated = output.sequences[:, input_ids.shape[1] :].cpu()  # B, S (S ≤ max_new_tokens + 1)
    step_logits = torch.stack(output.logits, dim=1) if top_k > 0 else None  # B, S, V
    stop_set = set(stops)
    targets = []
    for row, request in enumerate(requests):
        tokens = generated[row].tolist()
        end = next((i for i, token in enumerate(tokens) if token in stop_set), None)
        truncated = end is None or end > max_new_tokens
        n_response = max_new_tokens if truncated else int(end)  # type: ignore[arg-type]
        response_ids = tokens[:n_response]
        topk = None
        if step_logits is not None:
            rows = step_logits[
                row, : n_response + 1
            ].float()  # n+1, V: one row per response token + end of turn
            ids, logprobs = teacher_topk(rows, top_k, temperature)
            topk = TopKTeacher(ids.cpu(), logprobs.cpu())
        text = tokenizer.decode(response_ids, skip_special_tokens=True).strip()
        targets.append(TeacherTarget(request.item_id, text, response_ids, truncated, topk))
    return targets


def generate_targets(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[TeacherRequest],
    *,
    batch_size: int,
    max_new_tokens: int,
    top_k: int = 0,
    temperature: float = 1.0,
    do_sample: bool = False,
    sample_temperature: float = 1.0,
    seed: int = 0,
) -> Iterator[list[TeacherTarget]]:
    """Batches of targets, in request order. Requests are grouped by length so padding stays small.

    Sampling is seeded per batch from (seed, first item id), so a resumed run samples what it would have.
    """
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if top_k > 0 and head is not None and top_k > head.weight.shape[0]:
        raise UserError(
            f"teacher.logits_top_k: {top_k} is more than the teacher's vocabulary ({head.weight.shape[0]} tokens)"
        )
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt))
    for start in range(0, len(order), batch_size):
        batch = [requests[i] for i in order[start : start + batch_size]]
        if do_sample:
            torch.manual_seed(zlib.crc32(f"{seed}:{batch[0].item_id}".encode()))
        yield generate_batch(
            model,
            tokenizer,
            batch,
            max_new_tokens=max_new_tokens,
            top_k=top_k,
            temperature=temperature,
            do_sample=do_sample,
            sample_temperature=sample_temperature,
        )
