"""Loading and normalizing: formats, schemas, source safety, and every class of unreadable input."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from qa_factory import qa_rows, write_jsonl

from tasks.core.errors import UserError
from tasks.plumbing.dataio import load_dataset, normalize_question, resolve_source


def _load(path: Path, **kwargs: object) -> list[dict]:
    return load_dataset(path, **kwargs).rows  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- formats


def test_jsonl_question_answer_keeps_lines_and_fields(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    rows = qa_rows(2)
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n", encoding="utf-8")
    loaded = load_dataset(path)
    assert (loaded.format, loaded.schema) == ("jsonl", "question_answer")
    assert [r["line"] for r in loaded.rows] == [1, 3]  # blank lines are skipped, numbering is physical
    assert loaded.rows[1] == {"line": 3, **rows[1], "system": None, "history": []}


def test_csv_with_bom_quotes_and_embedded_newlines(tmp_path: Path) -> None:
    path = tmp_path / "qa.csv"
    text = (
        "question,answer,category\r\n"
        '"What is a, b?","It is ""quoted"", with a comma.",syntax\r\n'
        '"A question\nover two lines?","An answer\nalso\nmultiline.",multi\r\n'
        "Plain question?,Plain answer.,\r\n"
    )
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    loaded = load_dataset(path)
    assert (loaded.format, loaded.schema) == ("csv", "question_answer")
    assert [r["line"] for r in loaded.rows] == [2, 3, 7]  # the line where each record starts
    assert loaded.rows[0]["question"] == "What is a, b?"
    assert loaded.rows[0]["answer"] == 'It is "quoted", with a comma.'
    assert loaded.rows[1]["answer"] == "An answer\nalso\nmultiline."
    assert loaded.rows[2]["category"] == "general"  # empty category gets the default
    assert "\ufeff" not in "".join(loaded.rows[0])  # the BOM is not part of the first column name


def test_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist(qa_rows(3)), path)
    loaded = load_dataset(path)
    assert (loaded.format, loaded.schema) == ("parquet", "question_answer")
    assert [r["line"] for r in loaded.rows] == [1, 2, 3]
    assert loaded.rows[2]["question"] == qa_rows(3)[2]["question"]


# ------------------------------------------------------------------------------------------- schemas


def test_prompt_completion_schema(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Why?", "completion": "Because."}])
    loaded = load_dataset(path)
    assert loaded.schema == "prompt_completion"
    row = loaded.rows[0]
    assert (row["question"], row["answer"], row["category"]) == ("Why?", "Because.", "general")
    assert row["id"] == load_dataset(path).rows[0]["id"]  # a generated id is stable


def test_messages_schema_keeps_the_system_message_and_earlier_turns(tmp_path: Path) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    more = [*msgs, {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": msgs}, {"messages": msgs[1:]}, {"messages": more}])
    loaded = load_dataset(path)
    assert loaded.schema == "messages"
    first, second, third = loaded.rows
    assert (first["system"], first["question"], first["answer"], first["history"]) == (
        "Be brief.",
        "What is 2+2?",
        "4",
        [],
    )
    assert (second["system"], second["question"], second["answer"]) == (None, "What is 2+2?", "4")
    assert (third["question"], third["answer"], third["history"]) == ("And 3+3?", "6", msgs[1:])
    assert third["id"] != first["id"]  # the generated id covers the earlier turns


def test_llama2_text_schema(tmp_path: Path) -> None:
    rows = [
        {"text": "<s>[INST] What is DVC? [/INST] Data version control. </s>"},
        {"text": "[INST] Q? [/INST] A."},
    ]
    loaded = load_dataset(write_jsonl(tmp_path / "t.jsonl", rows))
    assert loaded.schema == "llama2_text"
    assert (loaded.rows[0]["question"], loaded.rows[0]["answer"]) == ("What is DVC?", "Data version control.")
    assert (loaded.rows[1]["question"], loaded.rows[1]["answer"]) == ("Q?", "A.")


def test_context_is_folded_into_the_question_and_ids_default_to_a_question_hash(tmp_path: Path) -> None:
    rows = [
        {"question": "Who?", "answer": "Ada.", "context": "Computing history."},
        {"question": "x", "answer": "y"},
    ]
    loaded = load_dataset(write_jsonl(tmp_path / "c.jsonl", rows))
    assert loaded.rows[0]["question"] == "Who?\n\nContext: Computing history."
    assert len(loaded.rows[1]["id"]) == 12 and loaded.rows[0]["id"] != loaded.rows[1]["id"]


def test_normalize_question() -> None:
    assert normalize_question("  What   IS\tＤＶＣ? ") == "what is dvc?"


# --------------------------------------------------------------------------------------- bad input


def test_malformed_json_names_file_and_every_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps(qa_rows(1)[0])
    path.write_text(f'{good}\n{{"question": "a",\n{good}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_dataset(path)
    assert str(err.value) == (
        f"{path}: lines 2, 4: malformed JSON (Expecting property name enclosed in double quotes at column 18) "
        "(check: json)"
    )


def test_non_utf8_bytes(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(qa_rows(1)[0]).encode() + b'\n{"question": "caf\xe9", "answer": "x"}\n')
    with pytest.raises(UserError) as err:
        load_dataset(path)
    assert str(err.value) == f"{path}: line 2: not valid UTF-8 (byte 0xe9 at byte offset 17) (check: utf8)"


def test_non_utf8_bytes_in_csv(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"question,answer\nok?,fine\ncaf\xe9?,x\n")
    with pytest.raises(
        UserError, match=r"latin1\.csv: line 3: not valid UTF-8 \(byte 0xe9 .*\(check: utf8\)$"
    ):
        load_dataset(path)


def test_missing_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "cols.jsonl", [{"q": "a", "a": "b"}])
    with pytest.raises(UserError) as err:
        load_dataset(path)
    assert str(err.value) == (
        f"{path}: missing columns: found ['a', 'q'], expected one of "
        "{question, answer} | {prompt, completion} | {messages} | {text} (check: columns)"
    )


def test_missing_column_on_one_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "cols.jsonl", [*qa_rows(2), {"question": "only a question"}])
    with pytest.raises(UserError) as err:
        load_dataset(path)
    assert str(err.value) == (
        f"{path}: line 3: missing column(s) ['answer'] for schema question_answer (check: columns)"
    )


def test_wrong_types(tmp_path: Path) -> None:
    rows = [*qa_rows(1), {"question": "How many?", "answer": 42}, {"question": ["a"], "answer": "b"}]
    path = write_jsonl(tmp_path / "types.jsonl", rows)
    with pytest.raises(UserError) as err:
        load_dataset(path)
    assert (
        str(err.value) == f"{path}: lines 2, 3: column 'answer' must be a string, got int 42 (check: types)"
    )


@pytest.mark.parametrize(
    ("name", "content"), [("e.jsonl", b""), ("w.jsonl", b"\n  \n"), ("h.csv", b"question,answer\n")]
)
def test_empty_file(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_dataset(path)
    assert str(err.value) == f"{path}: empty file: no rows to validate (check: empty)"


def test_multi_megabyte_row(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    huge = json.dumps({"question": "big?", "answer": "x" * 3_000_000})
    path.write_text(json.dumps(qa_rows(1)[0]) + "\n" + huge + "\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_dataset(path, max_row_bytes=65_536)
    size = len(huge) + 1  # with its newline
    assert (
        str(err.value)
        == f"{path}: line 2: row is {size} bytes, over data.max_row_bytes=65536 (check: max_row_bytes)"
    )


def test_multi_megabyte_csv_field(tmp_path: Path) -> None:
    path = tmp_path / "big.csv"
    path.write_text('question,answer\nok?,fine\nbig?,"' + "x" * 2_000_000 + '"\n', encoding="utf-8")
    with pytest.raises(
        UserError, match=r"big\.csv: line 3: .*over data\.max_row_bytes=65536 \(check: max_row_bytes\)$"
    ):
        load_dataset(path, max_row_bytes=65_536)


def test_corrupt_parquet(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(
        UserError, match=r"broken\.parquet: not a readable Parquet file .*\(check: parquet\)$"
    ):
        load_dataset(path)


def test_bad_llama2_text_and_bad_messages(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "just some prose"}])
    with pytest.raises(UserError) as err:
        load_dataset(path)
    assert (
        str(err.value)
        == f"{path}: line 1: text is not '<s>[INST] question [/INST] answer </s>' (check: schema)"
    )
    turns = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": turns}])
    with pytest.raises(
        UserError,
        match=r"line 1: messages must be \[system\], then user/assistant turns ending with an assistant turn, "
        r"got roles \['user', 'assistant', 'user'\] \(check: schema\)$",
    ):
        load_dataset(path)


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "qa.txt"
    path.write_text("x", encoding="utf-8")
    with pytest.raises(UserError, match=r"cannot tell the format from the extension '\.txt'"):
        load_dataset(path)


# -------------------------------------------------------------------------------------- source safety


def test_source_inside_allowed_root(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    path = write_jsonl(tmp_path / "data" / "qa.jsonl", [])
    assert resolve_source("data/qa.jsonl", ["data"], tmp_path) == path


def test_source_outside_allowed_roots(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "elsewhere.jsonl", [])
    with pytest.raises(UserError) as err:
        resolve_source("data/../elsewhere.jsonl", ["data"], tmp_path)
    assert str(err.value) == (
        f"data.source 'data/../elsewhere.jsonl' resolves to {tmp_path / 'elsewhere.jsonl'}, outside "
        f"data.allowed_roots ['{tmp_path / 'data'}']; move the file under one of them or add its folder to "
        "data.allowed_roots"
    )


def test_symlink_escaping_the_root_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    secret = write_jsonl(tmp_path / "secret.jsonl", [])
    os.symlink(secret, tmp_path / "data" / "link.jsonl")
    with pytest.raises(
        UserError, match=r"data\.source 'data/link\.jsonl' resolves to .*secret\.jsonl, outside"
    ):
        resolve_source("data/link.jsonl", ["data"], tmp_path)


@pytest.mark.parametrize("uri", ["s3://bucket/qa.jsonl", "https://example.com/qa.jsonl"])
def test_uris_are_refused_for_now(tmp_path: Path, uri: str) -> None:
    scheme = uri.split(":")[0]
    with pytest.raises(UserError) as err:
        resolve_source(uri, ["data"], tmp_path)
    assert str(err.value).startswith(f"data.source {uri!r}: {scheme}:// URIs are not supported yet")
    assert "s3://, gs://, azure:// and http(s):// sources are planned" in str(err.value)


def test_missing_source(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    with pytest.raises(UserError, match=r"data/nope\.jsonl: data\.source not found"):
        resolve_source("data/nope.jsonl", ["data"], tmp_path)
