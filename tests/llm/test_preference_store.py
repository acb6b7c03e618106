"""The append-only preference store (spec llm.md section 3): durability, duplicates, crash recovery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm import preference_store
from llm.preference_store import PreferenceRecord, PreferenceStore, TruncatedStoreWarning

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_round(round_: int, n: int, *, judge: str = "bt_oracle") -> list[PreferenceRecord]:
    """Deterministic records of one round (what a resumed run regenerates)."""
    return [
        PreferenceRecord(
            round=round_, index=i, prompt=f"prompt {round_}-{i} with a newline\nand unicode é",
            response_0=f"teacher answer {i}", response_1=f"student answer {i}", model_0="teacher",
            model_1="student", label=None if (i + round_) % 5 == 4 else (i * 7 + round_) % 2, judge=judge,
            judge_output=json.dumps({"p_1": 0.5, "i": i}), meta={"references": [f"ref {i}"]},
        )
        for i in range(n)
    ]


def test_round_trip_len_rounds_and_preferences(tmp_path):
    path = tmp_path / "prefs.jsonl"
    store = PreferenceStore(path)
    assert len(store) == 0 and store.rounds_completed() == 0 and not path.exists()
    assert store.append(make_round(0, 6)) == 6
    assert store.append(make_round(1, 4)) == 4
    reopened = PreferenceStore(path)
    assert reopened.records() == make_round(0, 6) + make_round(1, 4)
    assert len(reopened) == 10 and reopened.rounds_completed() == 2
    assert reopened.records(round=1) == make_round(1, 4)
    assert all(r.label in (0, 1) for r in reopened.preferences())
    assert len(reopened.preferences()) == sum(r.label is not None for r in make_round(0, 6) + make_round(1, 4))
    assert (1, 3) in reopened and (1, 4) not in reopened
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 10  # one record a line
    assert json.loads(lines[7])["batch"] == 1 and json.loads(lines[7])["batch_pos"] == 1


def test_append_only_never_rewrites_earlier_bytes(tmp_path):
    path = tmp_path / "prefs.jsonl"
    store = PreferenceStore(path)
    store.append(make_round(0, 3))
    first = path.read_bytes()
    inode = path.stat().st_ino
    store.append(make_round(1, 3))
    assert path.read_bytes().startswith(first) and len(path.read_bytes()) > len(first)
    assert path.stat().st_ino == inode  # the same file grown, not a rewritten copy


def test_every_append_is_flushed_and_fsynced(tmp_path, monkeypatch):
    path = tmp_path / "prefs.jsonl"
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        info = os.fstat(fd)
        synced.append((info.st_ino, info.st_size))
        real_fsync(fd)

    monkeypatch.setattr(preference_store.os, "fsync", spy)
    store = PreferenceStore(path)
    store.append(make_round(0, 4))
    size_after_first = path.stat().st_size
    store.append(make_round(1, 2))
    inode = path.stat().st_ino
    file_syncs = [(ino, size) for ino, size in synced if ino == inode]
    # One fsync per batch, taken after the whole batch was written.
    assert file_syncs == [(inode, size_after_first), (inode, path.stat().st_size)]
    # Creating the file also made its directory entry durable.
    assert any(ino == tmp_path.stat().st_ino for ino, _ in synced)


def test_duplicates_are_skipped_or_refused(tmp_path):
    path = tmp_path / "prefs.jsonl"
    store = PreferenceStore(path)
    store.append(make_round(0, 5))
    before = path.read_bytes()
    assert store.append(make_round(0, 5)) == 0  # identical re-append after a restart: a no-op
    assert path.read_bytes() == before and len(store) == 5
    assert store.append(make_round(0, 7)) == 2  # only the missing pairs are written
    assert len(PreferenceStore(path)) == 7
    before = path.read_bytes()
    changed = make_round(0, 1)[0]
    changed = PreferenceRecord(**{**changed.to_json(), "label": 1 - changed.label})
    with pytest.raises(ValueError, match=r"\(0, 0\) is already stored with different content"):
        store.append([changed] + make_round(2, 3))
    twice = make_round(3, 2)
    with pytest.raises(ValueError, match="appears twice in one append"):
        store.append(twice + twice[:1])
    assert path.read_bytes() == before and len(PreferenceStore(path)) == 7  # nothing written by a refused batch


def test_bad_records_are_refused(tmp_path):
    good = make_round(0, 1)[0].to_json()
    for field, value, match in [
        ("label", 2, "label must be 0"),
        ("label", True, "label must be 0"),
        ("round", -1, "round must be an integer"),
        ("prompt", None, "prompt must be a string"),
        ("meta", {"x": float("nan")}, "JSON-serialisable"),
    ]:
        with pytest.raises(ValueError, match=match):
            PreferenceRecord(**{**good, field: value})
    with pytest.raises(ValueError, match="PreferenceRecord objects"):
        PreferenceStore(tmp_path / "prefs.jsonl").append([good])


@settings(max_examples=20)
@given(data=st.data())
def test_truncated_batch_is_dropped_with_a_warning_never_silently(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("store") / "prefs.jsonl"
    store = PreferenceStore(path)
    store.append(make_round(0, 3))
    committed = path.stat().st_size
    store.append(make_round(1, 4))
    full = path.read_bytes()
    cut = data.draw(st.integers(min_value=committed, max_value=len(full)), label="cut")
    path.write_bytes(full[:cut])  # what a crash part-way through the second batch leaves
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reopened = PreferenceStore(path)
    dropped = cut - committed
    truncation = [w for w in caught if issubclass(w.category, TruncatedStoreWarning)]
    if cut == len(full):
        assert not truncation and reopened.records() == make_round(0, 3) + make_round(1, 4)
        return
    if dropped == 0:
        assert not truncation
    else:
        assert len(truncation) == 1 and f"dropped {dropped} bytes" in str(truncation[0].message)
        complete_lines = full[committed:cut].count(b"\n")
        assert reopened.dropped_records == complete_lines and reopened.dropped_bytes == dropped
    # The unfinished batch is gone as a whole, the file is back at the last complete batch ...
    assert reopened.records() == make_round(0, 3) and reopened.rounds_completed() == 1
    assert path.stat().st_size == committed
    # ... and the resumed run's re-append of the round lands on a clean line.
    assert reopened.append(make_round(1, 4)) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PreferenceStore(path).records() == make_round(0, 3) + make_round(1, 4)


def test_corruption_inside_the_file_is_an_error(tmp_path):
    path = tmp_path / "prefs.jsonl"
    store = PreferenceStore(path)
    store.append(make_round(0, 2))
    store.append(make_round(1, 2))
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0] + b"{not json}\n" + b"".join(lines[2:]))
    with pytest.raises(ValueError, match="line 2: not a preference record"):
        PreferenceStore(path)
    path.write_bytes(lines[0] + b"".join(lines[2:]))  # batch 0 lost its second line mid-file
    with pytest.raises(ValueError, match="line 2: batch 0 ends after 1 of its 2 records"):
        PreferenceStore(path)


def test_a_second_writer_is_detected(tmp_path):
    path = tmp_path / "prefs.jsonl"
    first, second = PreferenceStore(path), PreferenceStore(path)
    first.append(make_round(0, 2))
    with pytest.raises(ValueError, match="changed on disk since it was opened"):
        second.append(make_round(1, 2))


# --------------------------------------------------------------------------------------------
# Real crashes: a separate process killed with SIGKILL
# --------------------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    sys.path.insert(0, {tests!r})
    from test_preference_store import make_round
    from llm import preference_store
    from llm.preference_store import PreferenceStore

    store = PreferenceStore({path!r})
    start = store.rounds_completed()
    if {die_mid_write!r}:
        real = preference_store._write_all
        def half_then_die(fd, data):
            real(fd, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        preference_store._write_all = half_then_die
    for r in range(start, {rounds}):
        store.append(make_round(r, 5))   # label the round and append it
        print("labelled", r, flush=True)
        time.sleep(60)                    # "training" -- the parent kills us here
    """
)


def _child(path: Path, *, rounds: int, die_mid_write: bool = False) -> subprocess.Popen:
    code = _CHILD.format(tests=str(Path(__file__).parent), path=str(path), rounds=rounds, die_mid_write=die_mid_write)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=REPO_ROOT)


def _resumed_run(path: Path, rounds: int) -> PreferenceStore:
    """What a restarted online run does: skip labelled rounds, re-append the last one (idempotent), go on."""
    store = PreferenceStore(path)
    start = store.rounds_completed()
    if start:
        assert store.append(make_round(start - 1, 5)) == 0  # its labels were kept: nothing to re-label
    for r in range(start, rounds):
        store.append(make_round(r, 5))
    return store


def test_crash_between_labelling_and_training_loses_and_duplicates_nothing(tmp_path):
    path = tmp_path / "prefs.jsonl"
    child = _child(path, rounds=3)
    try:
        assert child.stdout.readline().strip() == "labelled 0"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
    assert child.returncode == -signal.SIGKILL
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean crash after fsync leaves nothing to drop
        after_crash = PreferenceStore(path)
    assert after_crash.records() == make_round(0, 5) and after_crash.rounds_completed() == 1
    # Restart: a second process continues from round 1 and is killed after labelling it.
    child = _child(path, rounds=3)
    try:
        assert child.stdout.readline().strip() == "labelled 1"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
    store = _resumed_run(path, rounds=3)
    expected = make_round(0, 5) + make_round(1, 5) + make_round(2, 5)
    assert PreferenceStore(path).records() == expected == store.records()
    ids = [r.record_id for r in store.records()]
    assert len(ids) == len(set(ids)) == 15


def test_crash_in_the_middle_of_a_write_drops_only_the_unacknowledged_batch(tmp_path):
    path = tmp_path / "prefs.jsonl"
    PreferenceStore(path).append(make_round(0, 5))
    committed = path.stat().st_size
    child = _child(path, rounds=2, die_mid_write=True)
    out, _ = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL and "labelled" not in out  # died inside append
    assert path.stat().st_size > committed  # half a batch reached the disk
    with pytest.warns(TruncatedStoreWarning, match=rf"dropped {path.stat().st_size - committed} bytes"):
        store = _resumed_run(path, rounds=2)
    assert store.records() == make_round(0, 5) + make_round(1, 5)
    assert PreferenceStore(path).records() == store.records()
