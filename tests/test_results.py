"""The results store: JSON lines that round-trip, appends that survive a crash, shards and
``.gz`` copies read as one file, and the committed results still load."""

import dataclasses
import gzip
import json
from pathlib import Path

import pytest

from attndrift.experiments import results
from tests.helpers import make_line

RESULTS = Path(__file__).parent.parent / "results"


def _lines() -> list[results.Line]:
    return [
        make_line(0, [("es", 1), ("ps", 0)]),
        make_line(1, [("es", 1), ("ps", 1)], editor="memit"),
        make_line(0, [("es", 0), ("ps", 1)], sadr_gamma=0.01),
    ]


def test_a_line_round_trips_through_json():
    for line in _lines():
        text = json.dumps(line.to_json(), separators=(",", ":"), allow_nan=False)
        back = results.Line.from_json(json.loads(text))
        assert back == line
        assert back.key == (line.record, line.setting.key)


def test_append_then_read(tmp_path):
    path = tmp_path / "r.jsonl"
    assert results.read(path) == []  # no file yet: no lines
    for line in _lines():
        results.append(path, line)
    assert results.read(path) == _lines()
    assert path.read_bytes().endswith(b"\n")
    assert len(path.read_text().splitlines()) == 3


def test_a_torn_last_line_is_ignored_then_cut(tmp_path):
    path = tmp_path / "r.jsonl"
    first, second, third = _lines()
    results.append(path, first)
    whole = json.dumps(second.to_json(), separators=(",", ":"))
    path.write_bytes(path.read_bytes() + whole[: len(whole) // 2].encode())  # a crash mid-write
    assert results.read(path) == [first]
    with results.locked(path):
        assert results.prepare_append(path) == [first]
    results.append(path, third)
    assert results.read(path) == [first, third]


def test_a_complete_last_line_without_its_newline_is_kept(tmp_path):
    path = tmp_path / "r.jsonl"
    first, second, _ = _lines()
    path.write_text(json.dumps(first.to_json()))  # no newline
    assert results.read(path) == [first]
    with results.locked(path):
        results.prepare_append(path)
    results.append(path, second)
    assert results.read(path) == [first, second]


def test_foreign_content_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a results file\n")
    with pytest.raises(ValueError, match="line 1 is not a results line"):
        results.check_appendable(path)
    assert path.read_text() == "not a results file\n"


def test_a_setting_key_that_does_not_match_its_fields_is_refused(tmp_path):
    obj = _lines()[0].to_json()
    obj["setting"] = "memit|" + obj["setting"]
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(obj) + "\n")
    with pytest.raises(ValueError, match="does not match its fields"):
        results.read(path)


def test_shards_and_gz_copies_load_as_one(tmp_path):
    out = tmp_path / "r.jsonl"
    a, b, c = _lines()
    results.append(out, a)
    results.append(results.shard_path(out, 1, 2), b)
    with gzip.open(out.with_name("r.jsonl.gz"), "wb") as f:  # a committed copy
        f.write((json.dumps(c.to_json()) + "\n").encode())
    assert set(results.files(out)) == {
        out,
        out.with_name("r.jsonl.gz"),
        results.shard_path(out, 1, 2),
    }
    assert sorted(x.key for x in results.load([out])) == sorted(x.key for x in (a, b, c))


def test_a_line_read_twice_counts_once_and_disagreeing_copies_are_refused(tmp_path):
    out = tmp_path / "r.jsonl"
    a = _lines()[0]
    results.append(out, a)
    results.append(results.shard_path(out, 0, 2), a)  # the same numbers
    assert results.load([out]) == [a]
    other = dataclasses.replace(a, steps_run=a.steps_run + 1)
    results.append(results.shard_path(out, 1, 2), other)
    with pytest.raises(ValueError, match="has other numbers"):
        results.load([out])


def test_no_results_is_an_error():
    with pytest.raises(FileNotFoundError, match="no results"):
        results.load([RESULTS / "no-such-file.jsonl"])


def _sweep_files() -> list[Path]:
    """The committed sweeps' files (the other JSON-lines files there, e.g. the mechanism
    study's, hold another kind of line)."""
    out = []
    for path in sorted(RESULTS.glob("*.jsonl*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            if "settings" in json.loads(f.readline()):
                out.append(path)
    return out


@pytest.mark.parametrize("path", _sweep_files(), ids=lambda p: p.name)
def test_the_committed_results_still_load(path):
    lines = results.read(path)
    assert lines
    for line in lines[:50]:  # each key is the key of its fields, and the line round-trips
        assert results.Line.from_json(line.to_json()) == line
