"""The top-k teacher logit cache: compact, exact about what it stores, and refuses a mismatched run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cmkd.data.logit_cache import CacheMeta, LogitCacheReader, LogitCacheWriter, check_meta
from cmkd.errors import UserError
from cmkd.losses import dense_divergence, sparse_forward_kl, teacher_topk


def meta(**changes: object) -> CacheMeta:
    base = {"teacher": "tiny", "tokenizer_hash": "abc", "vocab_size": 1000, "k": 8, "temperature": 2.0}
    base.update(changes)
    return CacheMeta(**base)  # type: ignore[arg-type]


def rows(n: int, vocab: int = 1000, k: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    ids, logprobs = teacher_topk(logits, k, 2.0)
    return ids, logprobs


def test_round_trip_and_size(tmp_path: Path) -> None:
    writer = LogitCacheWriter(tmp_path, meta())
    first, second = rows(3, seed=1), rows(5, seed=2)
    writer.write(["a", "b"], [first, second])
    reader = LogitCacheReader(tmp_path, meta())
    ids, logprobs = reader.get("b")
    assert torch.equal(ids, second[0].to(torch.int64))
    assert torch.allclose(logprobs, second[1], atol=2e-3)  # fp16 storage
    assert len(reader) == 2 and "a" in reader and "zzz" not in reader
    assert meta().bytes_per_token() == 8 * 4  # uint16 ids + fp16 log-probs
    assert meta(vocab_size=151936).bytes_per_token() == 8 * 6  # int32 ids beyond 65,536


def test_large_vocab_ids_survive(tmp_path: Path) -> None:
    big = meta(vocab_size=151936)
    ids = torch.tensor([[151935] * 8, [70000] * 8], dtype=torch.int32)
    LogitCacheWriter(tmp_path, big).write(["x"], [(ids, torch.zeros(2, 8))])
    assert LogitCacheReader(tmp_path, big).get("x")[0].max().item() == 151935


def test_sparse_kl_from_cache_matches_dense(tmp_path: Path) -> None:
    """What the cache keeps is enough for the KD term: at k = V the sparse KL equals the dense one."""
    vocab = 64
    teacher_logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(3)) * 2
    student_logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(4))
    cache_meta = meta(vocab_size=vocab, k=vocab)
    LogitCacheWriter(tmp_path, cache_meta).write(["q"], [teacher_topk(teacher_logits, vocab, 2.0)])
    ids, logprobs = LogitCacheReader(tmp_path, cache_meta).get("q")
    sparse = sparse_forward_kl(student_logits, ids, logprobs, 2.0)
    dense = dense_divergence(student_logits, teacher_logits, 2.0)
    assert sparse.item() == pytest.approx(dense.item(), rel=5e-3)  # fp16 log-probs on disk


def test_mismatched_cache_is_refused(tmp_path: Path) -> None:
    LogitCacheWriter(tmp_path, meta())
    for field, value in [("k", 16), ("temperature", 1.0), ("tokenizer_hash", "zzz"), ("teacher", "other")]:
        with pytest.raises(UserError, match=f"{field} is"):
            LogitCacheReader(tmp_path, meta(**{field: value}))
        with pytest.raises(UserError, match="made with"):
            LogitCacheWriter(tmp_path, meta(**{field: value}))
    with pytest.raises(UserError, match="no meta.json"):
        LogitCacheReader(tmp_path / "absent")
    with pytest.raises(UserError, match="k is 8"):
        check_meta(meta(), meta(k=4), tmp_path)


def test_half_written_shard_is_ignored_and_rewrite_wins(tmp_path: Path) -> None:
    writer = LogitCacheWriter(tmp_path, meta())
    writer.write(["a"], [rows(2, seed=1)])
    # A killed writer can leave a tensor file whose json index never landed: readers must not see it.
    (tmp_path / "shard-orphan.safetensors").write_bytes(b"partial")
    (tmp_path / ".shard-x.safetensors.tmp").write_bytes(b"partial")
    reader = LogitCacheReader(tmp_path, meta())
    assert reader.item_ids() == ["a"]
    # A resumed run writing the same item again resolves to one entry.
    writer.write(["a", "b"], [rows(2, seed=1), rows(1, seed=5)])
    reader = LogitCacheReader(tmp_path, meta())
    assert sorted(reader.item_ids()) == ["a", "b"]
    assert json.loads((tmp_path / "meta.json").read_text())["k"] == 8


def test_write_rejects_wrong_shapes(tmp_path: Path) -> None:
    writer = LogitCacheWriter(tmp_path, meta())
    with pytest.raises(ValueError, match=r"expected \[n, 8\]"):
        writer.write(["a"], [(torch.zeros(2, 4, dtype=torch.int32), torch.zeros(2, 4))])
