"""Shared fixtures: tiny random models built in code, seeded, offline.

No test may touch a model hub, so HF_HUB_OFFLINE is set before transformers is imported anywhere. Everything
here is small enough to build per test in milliseconds, which keeps tests independent (a student that freezes or
wraps an LM cannot leak into the next test). torch runs one thread: the CI box has two cores shared by jobs.

Outbound network is blocked for every test (`_block_network`): cmkd must run offline unless a user configures an
endpoint, so a test that reaches past loopback fails instead of quietly depending on the internet.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np
import pytest
import torch

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast, WhisperForConditionalGeneration

    from cmkd.models.composable import ComposableSpeechLM

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------------
# No network: loopback and Unix sockets only
# ---------------------------------------------------------------------------------------------------------------


class NetworkBlockedError(ConnectionRefusedError):
    """Raised for a connection past loopback; an OSError, so code that handles 'offline' sees an offline machine."""


BLOCKED_CONNECTIONS: list[str] = []
"""Every refused attempt of this session, so a test can prove the guard fired even where an OSError was caught."""


def _loopback_host(host: Any) -> bool:
    """True for loopback addresses and names (accelerate/torchrun and the judge tests use localhost)."""
    text = host.decode() if isinstance(host, bytes) else str(host or "")
    if text in ("", "localhost", "localhost.localdomain") or text.endswith(".localhost"):
        return True
    return _ip_literal(text) and ipaddress.ip_address(text.split("%", 1)[0]).is_loopback


def _ip_literal(host: Any) -> bool:
    text = host.decode() if isinstance(host, bytes) else str(host)
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _check_address(family: Any, address: Any) -> None:
    if family == getattr(socket, "AF_UNIX", object()) or not isinstance(address, tuple):
        return  # Unix sockets (a path), and anything that is not an (host, port) address
    if not _loopback_host(address[0]):
        BLOCKED_CONNECTIONS.append(f"{address[0]}:{address[1] if len(address) > 1 else ''}")
        raise NetworkBlockedError(f"tests run offline: connection to {address!r} blocked (loopback only)")


@pytest.fixture(autouse=True)
def _block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse connections and name lookups past loopback for every test (socket.connect, connect_ex,
    create_connection and getaddrinfo), so the suite proves cmkd needs no network at run time."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_create_connection, real_getaddrinfo = socket.create_connection, socket.getaddrinfo

    def connect(self: socket.socket, address: Any) -> None:
        _check_address(self.family, address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        _check_address(self.family, address)
        return real_connect_ex(self, address)

    def create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
        _check_address(socket.AF_INET, address)
        return real_create_connection(address, *args, **kwargs)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        # An IP literal needs no lookup (connect() checks where it goes); a name past loopback is refused.
        if not (_ip_literal(host) or _loopback_host(host)):
            BLOCKED_CONNECTIONS.append(f"lookup {host}")
            raise socket.gaierror(socket.EAI_NONAME, f"tests run offline: lookup of {host!r} blocked")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML, as SmolLM2 and Qwen use it (minus their default system prompt)."""

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

_SUBJECTS = [
    "the capital of france",
    "a cat",
    "the sun",
    "my friend",
    "water",
    "the answer",
    "two plus two",
    "paris",
]
_VERBS = ["is", "was", "looks like", "becomes", "sounds like", "equals"]
_OBJECTS = ["four", "hot", "a city", "very big", "blue and green", "the opposite of cold", "yes", "no"]


def _corpus() -> list[str]:
    """A few hundred words of question/answer-like text, so BPE learns merges that real prompts use."""
    lines = [f"{s} {v} {o}." for s in _SUBJECTS for v in _VERBS for o in _OBJECTS[:3]]
    lines += [f"What is {s}? Answer the question in a few words." for s in _SUBJECTS]
    return lines


@pytest.fixture(scope="session")
def _trained_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


@pytest.fixture
def tiny_tokenizer(_trained_tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer (~420 tokens) with ChatML special tokens and chat template."""
    return copy.deepcopy(_trained_tokenizer)


@pytest.fixture
def tiny_lm(tiny_tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """LlamaForCausalLM, 2 layers, hidden 64, tied embeddings (like SmolLM2), vocab = tokenizer size, eval mode.

    initializer_range 0.2 (not 0.02) makes the random model's next-token distribution peaked, so greedy decoding
    is not decided by float noise."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.2,
        pad_token_id=tiny_tokenizer.pad_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_whisper() -> WhisperForConditionalGeneration:
    """WhisperForConditionalGeneration with a 2-layer, d_model 64, 80-mel encoder (30 s of positions, as released)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=96,
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=128,
        max_source_positions=1500,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    return WhisperForConditionalGeneration(config).eval()


@pytest.fixture
def make_student(
    tiny_lm: LlamaForCausalLM,
    tiny_tokenizer: PreTrainedTokenizerFast,
    tiny_whisper: WhisperForConditionalGeneration,
) -> Callable[..., ComposableSpeechLM]:
    """Build a composable student on the tiny parts: `make_student(lm_mode="lora", stack=2, kind="conv")`."""
    from cmkd.models.build import build_student
    from cmkd.stage_configs import (
        Activation,
        LMMode,
        LoraSettings,
        ProjectorKind,
        ProjectorSettings,
        StudentSettings,
    )

    def make(
        lm_mode: str = "frozen",
        stack: int = 4,
        kind: str = "stack_mlp",
        activation: str = "swiglu",
        init_from: str = "",
        encoder_trainable: bool = False,
    ) -> ComposableSpeechLM:
        torch.manual_seed(1)
        settings = StudentSettings(
            lm_mode=LMMode(lm_mode),
            projector=ProjectorSettings(
                kind=ProjectorKind(kind), stack=stack, hidden=64, activation=Activation(activation)
            ),
            lora=LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
            init_from=init_from,
            encoder_trainable=encoder_trainable,
        )
        return build_student(settings, lm=tiny_lm, tokenizer=tiny_tokenizer, encoder=tiny_whisper)

    return make


@pytest.fixture
def tiny_student(make_student: Callable[..., ComposableSpeechLM]) -> ComposableSpeechLM:
    """Composable student: tiny Whisper encoder, stack-4 SwiGLU projector, frozen tiny Llama."""
    return make_student()


@pytest.fixture
def make_audio() -> Callable[..., np.ndarray]:
    """`make_audio(seconds, seed=0)`: deterministic 16 kHz mono float32 (two tones plus noise)."""

    def make(seconds: float, seed: int = 0) -> np.ndarray:
        rng = np.random.default_rng(seed)
        time = np.arange(round(seconds * 16_000)) / 16_000
        low, high = rng.uniform(150, 400), rng.uniform(800, 2400)
        wave = 0.3 * np.sin(2 * np.pi * low * time) + 0.1 * np.sin(2 * np.pi * high * time)
        return (wave + 0.02 * rng.standard_normal(time.shape)).astype(np.float32)

    return make
