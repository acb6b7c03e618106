"""Every command-line entry refuses bad input in one line with exit status 2 (`pbkd_ref/cli.py`).

Each case runs the real entry in a fresh interpreter, from a scratch folder, and asserts: exit
status 2, exactly one line on stderr that starts with `error:` and names the problem, and no
traceback. An internal error (not bad input) must keep its traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pbkd_ref.cli import refusing_bad_input

REPO = Path(__file__).resolve().parents[2]

CASES = [
    ([str(REPO / "llm" / "train.py"), "objective=foo"], "config key 'objective' = 'foo' is not a valid choice"),
    ([str(REPO / "llm" / "train.py"), "--config", "nope.yaml"], "config file nope.yaml does not exist"),
    ([str(REPO / "llm" / "train.py"), "--bogus"], "unrecognized arguments: --bogus"),
    ([str(REPO / "llm" / "train.py"), "max_steps=abc"], "config key 'max_steps' expects a int"),
    ([str(REPO / "llm" / "train.py"), "data.source=files", "data.train_file=missing.jsonl",
      "data.valid_file=missing.jsonl", "data.test_file=missing.jsonl", "teacher=nowhere", "student_init=fresh"],
     "does not exist"),
    ([str(REPO / "llm" / "evaluate.py"), "--model", "nomodel", "--data", "bad.jsonl", "--out", "o"],
     "bad.jsonl, line 1: field 'instruction'"),
    ([str(REPO / "llm" / "evaluate.py"), "--model", "nomodel", "--data", "missing.jsonl", "--out", "o"],
     "data file missing.jsonl does not exist"),
    (["-m", "llm.experiments", "--methods", "foo"], "unknown method(s) ['foo']"),
    (["-m", "llm.experiments", "--methods", "sft", "kd.jsd_beta=2"], "kd.jsd_beta must lie in [0, 1]"),
    (["-m", "llm.bridge", "--bogus"], "unrecognized arguments: --bogus"),
    (["-m", "theory.coverage", "--seeds", "1"], "--seeds must be >= 2"),
    (["-m", "theory.figures", "--only", "nothing"], "invalid choice: 'nothing'"),
    (["-m", "pbkd_ref", "solve", "missing.npz"], "missing.npz' does not exist"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(Path(a).name for a in c[0][:3]) for c in CASES])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, args, message):
    (tmp_path / "bad.jsonl").write_text('{"instruction": 5}\n')
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_an_internal_error_keeps_its_traceback():
    with pytest.raises(RuntimeError, match="internal"):
        with refusing_bad_input():
            raise RuntimeError("internal")
    with pytest.raises(SystemExit) as stop:
        with refusing_bad_input():
            raise ValueError("bad\nvalue")
    assert stop.value.code == 2
