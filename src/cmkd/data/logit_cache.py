"""The teacher logit cache: top-k log-probs per response token, so training can run without the teacher.

Full-vocabulary fp16 logits cost 2·V bytes per token (98 KB at SmolLM2's 49,152). We keep, per response token,
the k most likely token ids and their log-probabilities at the training temperature τ (normalised over the FULL
vocabulary, so the tail mass 1 − Σ exp(logprob) is implicit and exact). Ids are uint16 when the vocabulary fits
(2 bytes) and int32 otherwise; log-probs are fp16. At k = 64 and V ≤ 65,536 that is 64·(2+2) = 256 bytes/token.

Layout of a cache directory:
    meta.json                     k, τ, teacher id, tokenizer hash, vocab size, id dtype (checked on open)
    shard-<first_item>.safetensors  one per written batch: `ids` [N, k], `logprobs` [N, k], `offsets` [n+1]
    shard-<first_item>.json         the item ids of that shard, in order (rows offsets[i]:offsets[i+1])

Shards are written atomically (temp file + rename, json after tensors), so a killed writer leaves either a whole
shard or none; a reader ignores tensor files without their json. The same item written twice (a resumed run)
resolves to one entry, the later shard winning; rows are identical by construction (greedy decoding).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cmkd.errors import UserError


@dataclass(frozen=True)
class CacheMeta:
    """What a cache was made with; training refuses a cache whose meta differs from its own settings."""

    teacher: str
    tokenizer_hash: str
    vocab_size: int
    k: int
    temperature: float

    @property
    def id_dtype(self) -> torch.dtype:
        return torch.uint16 if self.vocab_size <= 65536 else torch.int32

    def bytes_per_token(self) -> int:
        id_bytes = 2 if self.id_dtype == torch.uint16 else 4
        return self.k * (id_bytes + 2)


def tokenizer_hash(tokenizer: object) -> str:
    """A fingerprint of what decides token ids: the vocabulary, the special tokens and the chat template."""
    vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
    digest = hashlib.sha256()
    for token, index in sorted(vocab.items(), key=lambda item: item[1]):
        digest.update(f"{index}\t{token}\n".encode())
    digest.update(str(getattr(tokenizer, "chat_template", "") or "").encode())
    digest.update(json.dumps(getattr(tokenizer, "all_special_tokens", []), sort_keys=True).encode())
    return digest.hexdigest()[:16]


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class LogitCacheWriter:
    """Appends shards to a cache directory; refuses a directory made with different settings."""

    def __init__(self, directory: Path, meta: CacheMeta) -> None:
        self.directory = Path(directory)
        self.meta = meta
        self.directory.mkdir(parents=True, exist_ok=True)
        meta_path = self.directory / "meta.json"
        if meta_path.exists():
            existing = read_meta(self.directory)
            if existing != meta:
                raise UserError(
                    f"logit cache '{self.directory}': made with {asdict(existing)}, this run needs {asdict(meta)}; "
                    "use another directory or delete it"
                )
        else:
            _atomic_write_bytes(meta_path, json.dumps(asdict(meta), indent=2).encode())

    def write(self, item_ids: list[str], rows: list[tuple[torch.Tensor, torch.Tensor]]) -> Path:
        """Write one shard: `rows[i] = (ids [n_i, k], logprobs [n_i, k])` for `item_ids[i]`."""
        if len(item_ids) != len(rows) or not item_ids:
            raise ValueError("write() needs one (ids, logprobs) pair per item id, and at least one item")
        k = self.meta.k
        lengths = [ids.shape[0] for ids, _ in rows]
        for item_id, (ids, logprobs) in zip(item_ids, rows, strict=True):
            if ids.shape != logprobs.shape or ids.ndim != 2 or ids.shape[1] != k:
                raise ValueError(
                    f"item {item_id}: expected [n, {k}] ids and logprobs, got {tuple(ids.shape)}"
                )
        offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)  # n_items+1
        tensors = {
            "ids": torch.cat([ids for ids, _ in rows]).to(self.meta.id_dtype).contiguous(),  # N, k
            "logprobs": torch.cat([lp for _, lp in rows]).to(torch.float16).contiguous(),  # N, k
            "offsets": offsets,
        }
        stem = f"shard-{_safe_stem(item_ids[0])}"
        tensor_path = self.directory / f"{stem}.safetensors"
        tmp = tensor_path.with_name(f".{tensor_path.name}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, tensor_path)
        _atomic_write_bytes(self.directory / f"{stem}.json", json.dumps(item_ids).encode())
        return tensor_path


def _safe_stem(item_id: str) -> str:
    """A file-name-safe, collision-resistant stem for a shard named after its first item."""
    readable = "".join(c if c.isalnum() or c in "-_" else "_" for c in item_id)[:40]
    return f"{readable}-{hashlib.sha1(item_id.encode()).hexdigest()[:8]}"


def read_meta(directory: Path) -> CacheMeta:
    meta_path = Path(directory) / "meta.json"
    if not meta_path.is_file():
        raise UserError(
            f"logit cache '{directory}': no meta.json; run `cmkd prepare` with teacher.logits_top_k > 0"
        )
    try:
        return CacheMeta(**json.loads(meta_path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise UserError(f"logit cache '{directory}': meta.json is unreadable ({err})") from None


class LogitCacheReader:
    """Random access to cached rows by item id, after checking the cache matches the run."""

    def __init__(self, directory: Path, expected: CacheMeta | None = None) -> None:
        self.directory = Path(directory)
        self.meta = read_meta(self.directory)
        if expected is not None:
            check_meta(self.meta, expected, self.directory)
        self._index: dict[str, tuple[Path, int]] = {}
        for index_path in sorted(self.directory.glob("shard-*.json"), key=lambda p: p.stat().st_mtime_ns):
            tensor_path = index_path.with_suffix(".safetensors")
            if not tensor_path.is_file():
                continue
            for position, item_id in enumerate(json.loads(index_path.read_text())):
                self._index[item_id] = (tensor_path, position)
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._index

    def __len__(self) -> int:
        return len(self._index)

    def item_ids(self) -> list[str]:
        return list(self._index)

    def get(self, item_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [n, k] int64, logprobs [n, k] float32) of one item."""
        if item_id not in self._index:
            raise UserError(
                f"item {item_id}: not in the logit cache '{self.directory}'; re-run `cmkd prepare`"
            )
        path, position = self._index[item_id]
        if path not in self._loaded:
            self._loaded[path] = load_file(str(path))
        shard = self._loaded[path]
        start, end = shard["offsets"][position].item(), shard["offsets"][position + 1].item()
        return shard["ids"][start:end].to(torch.int64), shard["logprobs"][start:end].to(torch.float32)


def check_meta(found: CacheMeta, expected: CacheMeta, directory: Path) -> None:
    """Refuse to train against a cache made by another teacher, tokenizer, k or temperature."""
    for field in ("teacher", "tokenizer_hash", "vocab_size", "k", "temperature"):
        have, want = getattr(found, field), getattr(expected, field)
        if have != want:
            raise UserError(
                f"logit cache '{directory}': {field} is {have!r} but this run needs {want!r}; "
                "re-run `cmkd prepare` with matching settings or use train.teacher_source=online"
            )
