"""Paired records, manifests, crash-safe JSONL and the question sources (prepare stage 1)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from cmkd.data.jsonl_io import (
    ParseError,
    Reject,
    RejectsLog,
    append_jsonl,
    atomic_write_text,
    read_jsonl,
)
from cmkd.data.records import (
    PairedRecord,
    SpeechClip,
    read_manifest,
    resolve_audio_path,
    write_manifest,
)
from cmkd.data.sources import FlacAudioWriter, decode_audio, read_source, safe_file_stem
from cmkd.data.speakable import speakable_records
from cmkd.errors import UserError
from cmkd.stage_configs import SourceSettings


def _records() -> list[PairedRecord]:
    clip = SpeechClip("audio/hibari/q1.flac", 16000, "hibari", "", "what is the capital of france", 0.0)
    return [
        PairedRecord(
            id="q1",
            prompt="What is the capital of France?",
            system="Answer briefly.",
            speech=[clip, SpeechClip("audio/espeak/q1.flac", 16000, "espeak", "en-us+m3")],
            target="Paris",
            teacher_response="The capital of France is Paris.",
            task="short_answer",
            category="capitals",
            meta={"split": "train", "slots": {"country": "France"}, "aliases": []},
        ),
        PairedRecord(id="q2", prompt="Which is red?", choices=["sky", "blood"], answer="B", meta={}),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Records and manifests
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["manifest.jsonl", "manifest.parquet"])
def test_manifest_round_trip(tmp_path: Path, name: str) -> None:
    records = _records()
    write_manifest(tmp_path / name, records)
    assert read_manifest(tmp_path / name) == records
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp files left behind"


def test_json_layout_is_nested() -> None:
    data = _records()[0].to_json()
    assert data["text"] == {"prompt": "What is the capital of France?", "system": "Answer briefly."}
    assert data["teacher"] == {"response": "The capital of France is Paris."}
    assert data["speech"][0]["audio"] == "audio/hibari/q1.flac"
    assert PairedRecord.from_json(data) == _records()[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"text": {"prompt": 7}}, "q1/text.prompt: must be a string, got int"),
        ({"text": {"prompt": "   "}}, "q1/text.prompt: is empty"),
        ({"speech": [{"audio": "/etc/passwd", "sr": 16000, "source": "x"}]}, "q1/speech.audio"),
        ({"speech": [{"audio": "../../etc/passwd", "sr": 16000, "source": "x"}]}, "contains '..'"),
        ({"speech": [{"audio": "a.flac", "sr": "16k", "source": "x"}]}, "q1/speech.sr"),
        ({"speech": [{"audio": "a.flac", "sr": 16000, "source": "x", "wer": float("nan")}]}, "q1/speech.wer"),
        ({"promt": "typo"}, "q1/record: unknown key(s) promt"),
        ({"choices": ["a", 2]}, "q1/choices"),
        ({"teacher": "yes"}, "q1/teacher: must be an object"),
        ({"id": ""}, "?/id"),
    ],
)
def test_from_json_names_record_and_field(change: dict[str, object], message: str) -> None:
    data = {"id": "q1", "text": {"prompt": "Hi?"}, **change}
    with pytest.raises(UserError, match=None) as err:
        PairedRecord.from_json(data)
    assert message in str(err.value)


def test_resolve_audio_path_stays_inside_root(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "audio").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    (root / "audio" / "link").symlink_to(outside, target_is_directory=True)
    assert resolve_audio_path(root, "audio/q1.flac") == (root / "audio" / "q1.flac").resolve()
    for bad in ("../../etc/passwd", "/etc/passwd", "audio/link/x.flac", "C:/x.flac", "audio\\x.flac", ""):
        with pytest.raises(UserError):
            resolve_audio_path(root, bad)


def test_read_manifest_bad_rows_raise_or_become_rejects(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    good = _records()[0].to_json()
    lines = [
        json.dumps(good),
        "{not json",
        json.dumps({"id": "q9", "text": {"prompt": ""}}),
        json.dumps(good),
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match="m.jsonl:2"):
        read_manifest(path)
    rejects = RejectsLog()
    assert [r.id for r in read_manifest(path, rejects)] == ["q1"]
    assert [(r.item_id, r.field, r.reason) for r in rejects.rejects] == [
        ("m.jsonl:2", "line", "malformed JSON"),
        ("q9", "text.prompt", "invalid text.prompt"),
        ("q1", "id", "invalid id"),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Crash-safe JSONL
# ---------------------------------------------------------------------------------------------------------------


def test_truncated_last_line_is_reported_and_isolated(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    assert append_jsonl(path, [{"i": 0}, {"i": 1}]) == 2
    with path.open("ab") as handle:  # a writer killed mid-line
        handle.write(b'{"i": 2, "tex')
    items = list(read_jsonl(path))
    assert items[:2] == [(1, {"i": 0}), (2, {"i": 1})]
    assert isinstance(items[2][1], ParseError) and items[2][1].reason == "truncated last line"
    append_jsonl(path, [{"i": 3}])  # resuming must not glue the new row onto the partial one
    items = list(read_jsonl(path))
    assert [value for _, value in items if isinstance(value, dict)] == [{"i": 0}, {"i": 1}, {"i": 3}]
    assert sum(isinstance(value, ParseError) for _, value in items) == 1


def test_read_jsonl_reports_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"a": 1}\n\n[1, 2]\n{"a": NaN}\n\xff\xfe\n{"a": 2}\n')
    reasons = {n: v.reason if isinstance(v, ParseError) else v for n, v in read_jsonl(path)}
    assert reasons == {1: {"a": 1}, 3: "not a JSON object", 4: "malformed JSON", 5: "not UTF-8", 6: {"a": 2}}


def test_atomic_write_and_rejects_log(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two" and [p.name for p in target.parent.iterdir()] == ["file.txt"]
    with RejectsLog(tmp_path / "rejects.jsonl") as log:
        log.add("a", "text", "empty text")
        log.add("b", "text", "empty text", "'  '")
        log.add("c", "audio", "corrupt audio")
    assert log.counts() == {"empty text": 2, "corrupt audio": 1}
    assert log.summary() == "3 rejected: empty text 2, corrupt audio 1"
    rows = [value for _, value in read_jsonl(tmp_path / "rejects.jsonl")]
    assert rows[1] == {"item_id": "b", "field": "text", "reason": "empty text", "detail": "'  '"}


# ---------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------


def test_generic_jsonl_bad_lines_become_rejects(tmp_path: Path) -> None:
    path = tmp_path / "questions.jsonl"
    rows = [
        b'{"id": "a", "question": "What is two plus two?", "answer": "four"}',
        b'{"id": "b", "question": "Broken", ',
        b'{"id": "c", "answer": "x"}',
        b'{"id": "d", "question": 42, "answer": "x"}',
        b'{"id": "e", "question": "   ", "answer": "x"}',
        json.dumps({"id": "f", "question": "x" * 100_000, "answer": "x"}).encode(),
        b'{"id": "g", "question": "caf\xe9?", "answer": "x"}',
        b'{"id": "a", "question": "Again?", "answer": "x"}',
        b'{"question": "No id?", "answer": "x"}',
        b'{"id": 7, "question": "Numeric id is fine?", "answer": "yes"}',
    ]
    path.write_bytes(b"\n".join(rows) + b"\n")
    rejects = RejectsLog(tmp_path / "rejects.jsonl")
    records = read_source(SourceSettings(kind="jsonl", path=str(path)), tmp_path, rejects)
    assert [(r.id, r.prompt, r.target) for r in records] == [
        ("a", "What is two plus two?", "four"),
        ("7", "Numeric id is fine?", "yes"),
    ]
    got = {(r.item_id, r.field, r.reason) for r in rejects.rejects}
    assert got == {
        ("questions.jsonl:2", "line", "malformed JSON"),
        ("c", "question", "missing field"),
        ("d", "question", "wrong type"),
        ("e", "question", "empty text"),
        ("f", "question", "text too long"),
        ("questions.jsonl:7", "line", "not UTF-8"),
        ("a", "id", "duplicate id"),
        ("questions.jsonl:9", "id", "missing field"),
    }
    rejects.close()
    assert len(list(read_jsonl(tmp_path / "rejects.jsonl"))) == 8


def test_generic_parquet_with_custom_fields_and_limit(tmp_path: Path) -> None:
    path = tmp_path / "q.parquet"
    table = pa.table(
        {
            "uid": ["x1", "x2", "x3"],
            "q": ["One?", None, "Three?"],
            "a": ["1", "2", "3"],
            "sys": ["", "s", "Be brief."],
        }
    )
    pq.write_table(table, path)
    settings = SourceSettings(
        kind="parquet", path=str(path), id_field="uid", prompt_field="q", target_field="a", system_field="sys"
    )
    rejects = RejectsLog()
    records = read_source(settings, tmp_path, rejects)
    assert [(r.id, r.system) for r in records] == [("x1", None), ("x3", "Be brief.")]
    assert [(r.item_id, r.reason) for r in rejects.rejects] == [("x2", "missing field")]
    settings.limit = 1
    assert len(read_source(settings, tmp_path, RejectsLog())) == 1
    settings.prompt_field = "nope"
    with pytest.raises(UserError, match="column"):
        read_source(settings, tmp_path, RejectsLog())


def test_openorca_schema(tmp_path: Path) -> None:
    path = tmp_path / "orca.parquet"
    table = pa.table(
        {
            "id": ["niv.1", "flan.2"],
            "system_prompt": ["", "You are an AI assistant."],
            "question": ["Translate hello to French.", "What is the boiling point of water?"],
            "response": ["Bonjour.", "One hundred degrees Celsius."],
        }
    )
    pq.write_table(table, path)
    records = read_source(SourceSettings(kind="openorca", path=str(path)), tmp_path, RejectsLog())
    assert [(r.id, r.system, r.target) for r in records] == [
        ("niv.1", None, "Bonjour."),
        ("flan.2", "You are an AI assistant.", "One hundred degrees Celsius."),
    ]
    assert records[0].meta["source"] == "openorca"


def _wav_bytes(seconds: float, sr: int, channels: int) -> bytes:
    time = np.arange(int(seconds * sr)) / sr
    wave = 0.3 * np.sin(2 * np.pi * 220 * time)
    buffer = io.BytesIO()
    sf.write(buffer, np.stack([wave] * channels, axis=1), sr, format="WAV")
    return buffer.getvalue()


def test_voicebench_layout_decodes_good_audio_and_rejects_corrupt(tmp_path: Path) -> None:
    folder = tmp_path / "voicebench" / "sd-qa"
    folder.mkdir(parents=True)
    audio_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "audio": pa.array(
                [
                    {"bytes": _wav_bytes(0.5, 24000, 2), "path": "good.wav"},
                    {"bytes": b"RIFF\x00\x00garbage", "path": "bad.wav"},
                    {"bytes": _wav_bytes(0.2, 16000, 1), "path": "empty.wav"},
                ],
                type=audio_type,
            ),
            "prompt": ["Who wrote Hamlet?", "What is the time?", " "],
            "reference": ["Shakespeare", "noon", "x"],
        }
    )
    pq.write_table(table, folder / "usa-00000-of-00001.parquet")
    data_root = tmp_path / "data"
    rejects = RejectsLog()
    records = read_source(
        SourceSettings(kind="voicebench", path=str(tmp_path / "voicebench")), data_root, rejects
    )
    assert [(r.item_id, r.field, r.reason) for r in rejects.rejects] == [
        ("voicebench/sd-qa/usa/000001", "audio", "corrupt audio"),
        ("voicebench/sd-qa/usa/000002", "prompt", "empty text"),
    ]
    (record,) = records
    assert (record.id, record.prompt, record.target, record.task) == (
        "voicebench/sd-qa/usa/000000",
        "Who wrote Hamlet?",
        "Shakespeare",
        "ref_qa",
    )
    clip = record.speech[0]
    assert (clip.sr, clip.source, clip.voice) == (16000, "human", "usa")
    samples, sr = sf.read(resolve_audio_path(data_root, clip.audio))
    assert sr == 16000 and samples.ndim == 1 and abs(len(samples) - 8000) <= 16
    assert record.meta["reference"] == "Shakespeare" and record.meta["subset"] == "sd-qa"


def test_audio_helpers(tmp_path: Path) -> None:
    samples = decode_audio(_wav_bytes(1.0, 8000, 1))
    assert samples.dtype == np.float32 and len(samples) == 16000
    relative = FlacAudioWriter(tmp_path, "audio/x")("voicebench/a b/1", samples, 16000)
    assert relative.startswith("audio/x/") and relative.endswith(".flac") and (tmp_path / relative).is_file()
    assert safe_file_stem("a/b") != safe_file_stem("a_b")


def test_demo_source_and_source_errors(tmp_path: Path) -> None:
    records = read_source(SourceSettings(kind="demo"), tmp_path, RejectsLog())
    assert len(records) >= 400 and records[0].meta["source"] == "demo"
    assert len(read_source(SourceSettings(kind="demo", limit=5), tmp_path, RejectsLog())) == 5
    with pytest.raises(UserError, match="source.kind"):
        read_source(SourceSettings(kind="csv"), tmp_path, RejectsLog())
    with pytest.raises(UserError, match="source.path"):
        read_source(
            SourceSettings(kind="jsonl", path=str(tmp_path / "missing.jsonl")), tmp_path, RejectsLog()
        )
    (tmp_path / "all_bad.jsonl").write_text("nope\n")
    with pytest.raises(UserError, match="no usable items"):
        read_source(
            SourceSettings(kind="jsonl", path=str(tmp_path / "all_bad.jsonl")), tmp_path, RejectsLog()
        )


def test_speakable_records_rewrites_prompt_and_rejects(tmp_path: Path) -> None:
    spoken = PairedRecord(id="v", prompt="Is 2 > 1?", speech=[SpeechClip("a.flac", 16000, "human")])
    records = [
        PairedRecord(id="n", prompt="What is 12 + 5?"),
        PairedRecord(id="u", prompt="See https://x.io"),
        spoken,
    ]
    rejects = RejectsLog()
    kept = speakable_records(records, rejects)
    assert [r.prompt for r in kept] == ["What is twelve plus five?", "Is 2 > 1?"]
    assert kept[0].meta["original_prompt"] == "What is 12 + 5?" and kept[0].meta["speakable_changes"]
    assert rejects.rejects == [Reject("u", "text.prompt", "url", "found 'https://x.io'")]
