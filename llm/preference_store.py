"""The preference store: labelled pairs, append-only JSONL, safe to resume (spec llm.md section 3).

A :class:`PreferenceRecord` is one judged pair: the prompt, two responses, the models that
produced them, the label, the judge's name and raw output, and the online round.  Its id
``(round, index)`` is stable: ``index`` is the pair's position among the pairs generated in
that round, so regenerating a round after a restart gives every pair the id it had before.

Label convention (the one of :func:`llm.losses.bt_nll`): ``label = 1`` when ``response_1``
(``tau1``) is preferred, ``0`` when ``response_0`` (``tau0``) is; ``None`` for a tie that the
judge's config asked to record.  In PbKD ``response_0`` is the teacher's response and
``response_1`` the student's.  Only records with a label enter the BT likelihood
(:meth:`PreferenceStore.preferences`).

On disk: one JSON object a line, written with ``O_APPEND`` and never rewritten.  Each call to
:meth:`PreferenceStore.append` is one *batch*, written in one go and then flushed and
fsynced; every line carries its batch number, the batch size and its position in the batch.
A batch is therefore atomic across crashes:

- a crash after ``append`` returned loses nothing (the bytes were fsynced);
- a crash during ``append`` leaves part of a batch at the end of the file, possibly with a
  line cut in the middle.  Reopening drops that unfinished batch -- with a warning that
  says how many bytes and records were dropped, never silently -- and truncates the file back
  to the last complete batch, so the next append starts on a clean line.  The caller never
  got an acknowledgement for those records and writes them again.

Appending a record whose id is already stored is a no-op when the stored record is identical
(so a resumed run that re-appends a round cannot duplicate it) and a ValueError when it
differs (two different labels for one pair would bias the likelihood).  Hence after a crash
between labelling and training and a restart, no record is lost or duplicated.

One writer per file (rank 0 in a distributed run); a file changed by another writer since it
was opened is refused at the next append.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["PreferenceRecord", "PreferenceStore", "TruncatedStoreWarning", "LABELS"]

LABELS = (0, 1, None)
"""``1``: response_1 preferred; ``0``: response_0 preferred; ``None``: a recorded tie."""

_BATCH_KEYS = ("batch", "batch_size", "batch_pos")


class TruncatedStoreWarning(UserWarning):
    """Reopening a store dropped the unfinished batch a crash left at its end."""


def _check_int(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class PreferenceRecord:
    """One judged pair (spec llm.md section 3); ``record_id = (round, index)``.

    ``label`` follows :func:`llm.losses.bt_nll`: 1 if ``response_1`` is preferred, 0 if
    ``response_0`` is, ``None`` for a recorded tie.  ``judge_output`` is the judge's raw output
    (reply text, logits, sampled probabilities) kept for audit.  ``meta`` holds any further
    JSON-serialisable detail (e.g. references, per-order verdicts).
    """

    round: int
    index: int
    prompt: str
    response_0: str
    response_1: str
    model_0: str
    model_1: str
    label: int | None
    judge: str
    judge_output: str
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_int("round", self.round)
        _check_int("index", self.index)
        for name in ("prompt", "response_0", "response_1", "model_0", "model_1", "judge", "judge_output"):
            _check_str(name, getattr(self, name))
        if self.label is not None and (isinstance(self.label, bool) or self.label not in (0, 1)):
            raise ValueError(
                f"label must be 0 (response_0 preferred), 1 (response_1 preferred) or None (a tie), "
                f"got {self.label!r}"
            )
        if not isinstance(self.meta, dict):
            raise ValueError(f"meta must be a dict, got {type(self.meta).__name__}")
        try:
            json.dumps(self.meta, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"meta must be JSON-serialisable (finite numbers, str keys): {err}") from err

    @property
    def record_id(self) -> tuple[int, int]:
        """The stable id ``(round, index)``."""
        return (self.round, self.index)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> PreferenceRecord:
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in names if n not in obj and n != "meta")
        if missing:
            raise ValueError(f"missing field(s) {missing}")
        unknown = sorted(set(obj) - names)
        if unknown:
            raise ValueError(f"unknown field(s) {unknown}")
        return cls(**obj)


class PreferenceStore:
    """Append-only JSONL store of :class:`PreferenceRecord` (spec llm.md section 3).

    ``PreferenceStore(path)`` opens (or creates) the file and loads it; an unfinished batch left
    at its end by a crash is dropped with a :class:`TruncatedStoreWarning`.  ``append(records)``
    writes one atomic batch; ``records()`` / ``preferences()`` read what is stored;
    ``rounds_completed()`` says from which round an online run resumes.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_file():
            raise ValueError(f"preference store path {self.path} exists and is not a file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records: list[PreferenceRecord] = []
        self._by_id: dict[tuple[int, int], PreferenceRecord] = {}
        self._batches = 0
        self._size = 0
        self.dropped_bytes = 0
        """Bytes of an unfinished batch dropped when this store was opened (0 if none)."""
        self.dropped_records = 0
        """Complete lines of that unfinished batch dropped with it."""
        if self.path.exists():
            self._load()

    # -- reading ------------------------------------------------------------------------

    def _load(self) -> None:
        data = self.path.read_bytes()
        committed_end = 0  # byte offset just past the last complete batch
        pending: list[tuple[dict, PreferenceRecord]] = []
        offset = 0
        line_no = 0
        while offset < len(data):
            newline = data.find(b"\n", offset)
            if newline < 0:
                break  # a line cut by a crash: no terminator, part of the unfinished batch
            line_no += 1
            raw = data[offset:newline]
            try:
                obj = json.loads(raw.decode("utf-8"))
                if not isinstance(obj, dict):
                    raise ValueError("a line must hold a JSON object")
                header = {k: obj.pop(k) for k in _BATCH_KEYS}
                record = PreferenceRecord.from_json(obj)
                batch, size, pos = (header[k] for k in _BATCH_KEYS)
                _check_int("batch", batch)
                _check_int("batch_size", size, 1)
                _check_int("batch_pos", pos)
            except (ValueError, KeyError, UnicodeDecodeError) as err:
                raise ValueError(
                    f"{self.path}, line {line_no}: not a preference record ({err}); the store is "
                    "corrupt beyond a crash-truncated end. Restore it from a backup or move it aside."
                ) from err
            if not pending:
                if batch != self._batches or pos != 0:
                    raise ValueError(
                        f"{self.path}, line {line_no}: expected the start of batch {self._batches}, found "
                        f"batch {batch} position {pos}; the store was edited or two writers shared it."
                    )
            elif (batch, size) != (pending[0][0]["batch"], pending[0][0]["batch_size"]) or pos != len(pending):
                raise ValueError(
                    f"{self.path}, line {line_no}: batch {pending[0][0]['batch']} ends after {len(pending)} "
                    f"of its {pending[0][0]['batch_size']} records in the middle of the file; the store "
                    "is corrupt beyond a crash-truncated end."
                )
            pending.append((header, record))
            offset = newline + 1
            if len(pending) == size:
                for _, rec in pending:
                    self._admit(rec, where=f"{self.path}, batch {batch}")
                self._batches += 1
                pending = []
                committed_end = offset
        if committed_end < len(data):
            self.dropped_bytes = len(data) - committed_end
            self.dropped_records = len(pending)
            cut_line = "" if data.endswith(b"\n") else ", plus a cut line"
            warnings.warn(
                f"preference store {self.path}: dropped {self.dropped_bytes} bytes at its end -- an "
                f"unfinished batch left by a crash during append ({self.dropped_records} complete "
                f"line(s) of batch {self._batches}"
                f"{cut_line}); those records were never "
                "acknowledged and must be appended again.",
                TruncatedStoreWarning,
                stacklevel=3,
            )
            with open(self.path, "r+b") as handle:
                handle.truncate(committed_end)
                handle.flush()
                os.fsync(handle.fileno())
        self._size = committed_end

    def _admit(self, record: PreferenceRecord, where: str) -> None:
        if record.record_id in self._by_id:
            raise ValueError(f"{where}: record id {record.record_id} is stored twice; the store is corrupt")
        self._by_id[record.record_id] = record
        self._records.append(record)

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[PreferenceRecord]:
        return iter(list(self._records))

    def __contains__(self, record_id: tuple[int, int]) -> bool:
        return tuple(record_id) in self._by_id

    def records(self, round: int | None = None) -> list[PreferenceRecord]:
        """Every stored record in write order (ties included), or those of one ``round``."""
        if round is None:
            return list(self._records)
        return [r for r in self._records if r.round == round]

    def preferences(self, round: int | None = None) -> list[PreferenceRecord]:
        """The records that carry a label (0 or 1): the preference data ``D`` of the BT likelihood."""
        return [r for r in self.records(round) if r.label is not None]

    def rounds_completed(self) -> int:
        """Rounds ``0 .. n-1`` are labelled and stored; returns ``n`` (0 for an empty store).

        ``n`` is one more than the largest stored round.  An online run appends each round in
        one batch after labelling, so a round is either fully stored or absent, and a restarted
        run resumes at round ``n`` (the training of round ``n-1`` reruns from the store when the
        checkpoint is older than the labels).
        """
        return 1 + max((r.round for r in self._records), default=-1)

    # -- writing ------------------------------------------------------------------------

    def append(self, records: Iterable[PreferenceRecord]) -> int:
        """Append ``records`` as one atomic batch (flushed and fsynced); return how many were new.

        A record whose id is already stored with identical content is skipped (idempotent
        re-append after a restart); one with different content, or an id repeated inside
        ``records``, is a ValueError and nothing is written.
        """
        records = list(records)
        for r in records:
            if not isinstance(r, PreferenceRecord):
                raise ValueError(f"append takes PreferenceRecord objects, got {type(r).__name__}")
        new: list[PreferenceRecord] = []
        seen: set[tuple[int, int]] = set()
        for r in records:
            if r.record_id in seen:
                raise ValueError(f"record id {r.record_id} appears twice in one append; ids (round, index) must be unique")
            seen.add(r.record_id)
            stored = self._by_id.get(r.record_id)
            if stored is None:
                new.append(r)
            elif stored != r:
                raise ValueError(
                    f"record id {r.record_id} is already stored with different content (label "
                    f"{stored.label!r} by {stored.judge!r} vs {r.label!r} by {r.judge!r}); the store is "
                    "append-only. A resumed run must regenerate the round exactly or label only the "
                    "pairs that are missing (check `id in store`)."
                )
        if not new:
            return 0
        lines = []
        for pos, r in enumerate(new):
            obj = r.to_json()
            obj.update(batch=self._batches, batch_size=len(new), batch_pos=pos)
            lines.append(json.dumps(obj, ensure_ascii=False, sort_keys=True, allow_nan=False) + "\n")
        data = "".join(lines).encode("utf-8")
        created = not self.path.exists()
        current = 0 if created else self.path.stat().st_size
        if current != self._size:
            raise ValueError(
                f"preference store {self.path} changed on disk since it was opened ({current} bytes, "
                f"expected {self._size}); only one writer may use a store. Reopen it."
            )
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.path.parent)
        self._size += len(data)
        self._batches += 1
        for r in new:
            self._admit(r, where=str(self.path))
        return len(new)


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    """Make a newly created file's directory entry durable too."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
