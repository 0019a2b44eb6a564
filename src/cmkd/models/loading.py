"""Load the causal LMs cmkd uses as teacher and student backbone from whatever a user points at.

One entry point, `load_causal_lm`, accepts the embedded default ("smollm2"), a transformers checkpoint dir, a
.gguf file, or (only when the hub is allowed) a hub id, and always returns the pair in the state the rest of
cmkd assumes: eval mode, a chat template (prompts are always built with it, so teacher and student see the
exact same text), left padding (batched generation appends new tokens on the right, so prompts must end
flush) and a pad token.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cmkd.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EMBEDDED_MODEL_NAMES = frozenset({"smollm2", "embedded"})
# "name" or "org/name", as the Hugging Face Hub spells repo ids; anything else that does not exist on disk is a
# mistyped local path, and saying so beats a confusing hub lookup.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_TRUTHY = frozenset({"1", "true", "yes", "on"})


def _hub_offline() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() in _TRUTHY
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _probe_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """A short real prompt (1, T) for equality checks: real text exercises real embeddings, unlike zeros."""
    ids = tokenizer("The capital of France is Paris. 2 + 2 = 4.", add_special_tokens=False)["input_ids"]
    return torch.tensor([ids])


def load_gguf_as_plain_model(
    gguf_file: Path, *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a .gguf file (dequantised by transformers) into a plain, trainable, saveable transformers model.

    transformers keeps a GGUF-loaded model marked as quantised: it refuses `save_pretrained` and PEFT/training
    code treats it as a quantised model, although its weights are ordinary fp32 tensors by then. So we build a
    fresh model from the same config minus `quantization_config`, copy the dequantised tensors in, and check
    the two give bit-identical logits before the GGUF-flagged one is dropped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32, local_files_only=True
    ).eval()
    # No local_files_only here: the tokenizer would record it in its saved tokenizer_config.json.
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    logger.info("loaded and dequantised %s in %.1f s", gguf_file.name, time.perf_counter() - start)

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    plain_model.load_state_dict(gguf_model.state_dict(), strict=True)
    plain_model.generation_config = copy.deepcopy(gguf_model.generation_config)

    probe = _probe_ids(tokenizer)
    with torch.inference_mode():
        gguf_logits = gguf_model(probe).logits  # 1, T, V
        plain_logits = plain_model(probe).logits  # 1, T, V
    if not torch.equal(gguf_logits, plain_logits):
        max_diff = (gguf_logits - plain_logits).abs().max().item()
        raise RuntimeError(
            f"internal: {gguf_file.name}: plain copy differs from the GGUF model (max |Δ| {max_diff})"
        )
    del gguf_model
    return plain_model.to(dtype), tokenizer


def _load_tokenizer(location: str | Path, name: str, trust_remote_code: bool) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UserError(f"{name}: could not load a tokenizer ({error})") from error


def _load_model(
    location: str | Path, name: str, dtype: torch.dtype, trust_remote_code: bool
) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    try:  # safetensors only: a pickled pytorch_model.bin can run code when it is loaded
        return AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except (OSError, ValueError) as error:
        raise UserError(f"{name}: could not load a causal LM ({error})") from error


def _require_chat_template(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{name}: the tokenizer has no chat template; cmkd builds every teacher and student prompt with it, "
            "so use a chat/instruct model (or add a chat_template to its tokenizer_config.json)"
        )


def _prepare_for_generation(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"{name}: the tokenizer has neither a pad token nor an eos token to pad with")
        # Padding positions are masked out everywhere, so reusing eos changes nothing but the id.
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()


def load_causal_lm(
    source: str | Path, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a chat causal LM and its tokenizer, ready for generation and frozen-teacher use.

    `source`: "smollm2"/"embedded" (the cached embedded default, fetched once if missing), a directory with
    config.json (a transformers checkpoint), a .gguf file (dequantised), or a hub id, the last only when
    HF_HUB_OFFLINE is not set. `trust_remote_code` is passed on only for checkpoint dirs and hub ids, and only
    when the user asked for it explicitly, because it runs code shipped with the model."""
    name = str(source)
    if trust_remote_code:
        logger.warning(
            "%s: run.trust_remote_code is on: transformers may run Python code shipped with this model", name
        )
    if isinstance(source, str) and source.strip().lower() in EMBEDDED_MODEL_NAMES:
        from cmkd import assets

        directory = assets.smollm2_path()
        tokenizer = _load_tokenizer(directory, name, trust_remote_code=False)
        _require_chat_template(tokenizer, name)
        model = _load_model(directory, name, dtype, trust_remote_code=False)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise UserError(
                    f"{name}: directory has no config.json; expected a transformers checkpoint "
                    "(save_pretrained layout) or a .gguf file"
                )
            tokenizer = _load_tokenizer(path, name, trust_remote_code)
            _require_chat_template(tokenizer, name)
            model = _load_model(path, name, dtype, trust_remote_code)
        elif path.is_file():
            if path.suffix.lower() != ".gguf":
                raise UserError(f"{name}: not a .gguf file; for a transformers checkpoint pass its directory")
            model, tokenizer = load_gguf_as_plain_model(path, dtype=dtype)
            _require_chat_template(tokenizer, name)
        elif isinstance(source, Path) or not _HUB_ID.match(name):
            raise UserError(f"{name}: no such file or directory")
        elif _hub_offline():
            raise UserError(
                f"{name}: not a local model (no directory with config.json or .gguf file at this path) and "
                "HF_HUB_OFFLINE is set, so it cannot come from the Hugging Face Hub; pass a local path or 'smollm2'"
            )
        else:
            tokenizer = _load_tokenizer(name, name, trust_remote_code)
            _require_chat_template(tokenizer, name)
            model = _load_model(name, name, dtype, trust_remote_code)
    _prepare_for_generation(model, tokenizer, name)
    return model, tokenizer


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, user_text: str, system: str | None) -> list[int]:
    """Token ids of a one-turn chat, ending with the assistant header so generation starts the answer.

    `system=None` leaves the template's default (SmolLM2's inserts its own system prompt); pass a string to
    override it. The text is rendered first and then encoded without extra special tokens, which is what
    apply_chat_template does internally; doing it in two steps keeps the return type the same across
    transformers versions."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    messages.append({"role": "user", "content": user_text})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(rendered, str):
        raise RuntimeError(f"internal: apply_chat_template(tokenize=False) returned {type(rendered)}")
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
