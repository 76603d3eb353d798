"""Atomic JSON/text writes to a file that several processes share (the eval cache, the precision
verdicts, two test workers): every write lands whole, none fails, no temporary is left behind."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from tasks.core.artifacts import read_json, write_json_atomic, write_text_atomic

WRITERS, WRITES = 6, 150


def test_concurrent_writers_of_one_file_never_fail_and_leave_one_whole_payload(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "shared.json"
    payloads = [{"writer": w, "rows": list(range(w * 500, w * 500 + 500))} for w in range(WRITERS)]
    errors: list[BaseException] = []
    start = threading.Barrier(WRITERS)

    def write(payload: dict) -> None:
        start.wait()
        try:
            for _ in range(WRITES):
                write_json_atomic(target, payload)
        except BaseException as exc:  # recorded: a thread's exception would otherwise be lost
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert read_json(target) in payloads
    assert [p.name for p in target.parent.iterdir()] == ["shared.json"]  # no temporary left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "verdicts.json"
    write_json_atomic(target, {"kept": True})
    with pytest.raises(UnicodeEncodeError):  # fails inside the write: a lone surrogate has no UTF-8
        write_text_atomic(target, "half written \ud800")
    assert json.loads(target.read_text()) == {"kept": True}
    assert [p.name for p in tmp_path.iterdir()] == ["verdicts.json"]
