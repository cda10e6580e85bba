"""kitcore.write_text_atomic: readers never see a partial file; a failed write keeps the old."""

import json
import threading

import pytest

from kitcore import write_text_atomic


def test_a_concurrent_reader_sees_the_old_file_or_the_new_one_never_a_partial_one(tmp_path):
    path = tmp_path / "plan.json"
    docs = [json.dumps({"n": n, "pad": "x" * 200_000}) for n in range(2)]
    write_text_atomic(path, docs[0])
    seen, done = [], threading.Event()

    def read() -> None:
        while not done.is_set():
            seen.append(json.loads(path.read_text())["n"])  # raises on an empty or cut file

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(200):
            write_text_atomic(path, docs[i % 2])
    finally:
        done.set()
        reader.join()
    assert set(seen) <= {0, 1} and seen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]  # no temporary left


def test_a_write_that_fails_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "plan.json"
    write_text_atomic(path, "old")
    with pytest.raises(TypeError):
        write_text_atomic(path, b"not text")  # type: ignore[arg-type]
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]
