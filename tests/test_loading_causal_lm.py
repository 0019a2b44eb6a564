"""Fast tests of `load_causal_lm` / `chat_prompt_ids` on a tiny random Llama with a word-level tokenizer built
in code (no files from anywhere, no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from cmkd.errors import UserError
from cmkd.models.loading import chat_prompt_ids, load_causal_lm

WORDS = [
    "<unk>",
    "<eos>",
    "<|im_start|>",
    "<|im_end|>",
    "system",
    "user",
    "assistant",
    "be",
    "brief",
    "hello",
]
CHATML = (
    "{% for message in messages %}<|im_start|> {{ message['role'] }} {{ message['content'] }} <|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def save_tiny_chat_model(directory: Path, *, chat_template: str | None = CHATML) -> Path:
    word_ids = {word: index for index, word in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(word_ids, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        eos_token_id=word_ids["<eos>"],
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_checkpoint_dir_loads_ready_for_batched_generation(tmp_path: Path) -> None:
    model, tokenizer = load_causal_lm(save_tiny_chat_model(tmp_path / "tiny"), dtype=torch.bfloat16)

    assert not model.training
    assert model.dtype == torch.bfloat16
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token == "<eos>", "a missing pad token falls back to eos"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


def test_chat_prompt_ids_end_with_the_generation_prompt(tmp_path: Path) -> None:
    _, tokenizer = load_causal_lm(str(save_tiny_chat_model(tmp_path / "tiny")))
    word = {token: index for index, token in enumerate(WORDS)}

    with_system = chat_prompt_ids(tokenizer, "hello", system="be brief")
    without_system = chat_prompt_ids(tokenizer, "hello", system=None)

    assert without_system == [
        word[t] for t in ["<|im_start|>", "user", "hello", "<|im_end|>", "<|im_start|>", "assistant"]
    ]
    assert with_system == [
        *[word[t] for t in ["<|im_start|>", "system", "be", "brief", "<|im_end|>"]],
        *without_system,
    ]


def test_tokenizer_without_chat_template_is_rejected_by_name(tmp_path: Path) -> None:
    directory = save_tiny_chat_model(tmp_path / "base-model", chat_template=None)
    with pytest.raises(UserError, match=r"base-model: the tokenizer has no chat template"):
        load_causal_lm(directory)


def test_bad_local_paths_are_user_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UserError, match="empty: directory has no config.json"):
        load_causal_lm(tmp_path / "empty")
    with pytest.raises(UserError, match=r"weights\.bin: not a \.gguf file"):
        load_causal_lm(tmp_path / "weights.bin")
    with pytest.raises(UserError, match="no such file or directory"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(UserError, match="no such file or directory"):
        load_causal_lm("./checkpoints/run-1/model")


def test_hub_id_is_refused_when_the_hub_is_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        UserError, match=r"HuggingFaceTB/SmolLM2-135M-Instruct: not a local model .*HF_HUB_OFFLINE"
    ):
        load_causal_lm("HuggingFaceTB/SmolLM2-135M-Instruct")
