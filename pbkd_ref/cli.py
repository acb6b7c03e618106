"""Command-line plumbing shared by every entry point of the project (`python -m pbkd_ref`,
`python -m theory.<name>`, `llm/train.py`, `llm/evaluate.py`, `python -m llm.experiments`,
`python -m llm.bridge`).

Bad input -- an unknown option, key or choice, a bad value, a missing or malformed file -- is
refused with one line on stderr that names what was wrong and what to do, and exit status 2,
with no traceback. Entry points read their input inside :func:`refusing_bad_input`, where a
`ValueError` or a missing/unreadable file is such a refusal; work done after it (training,
solving) is outside, so an unexpected internal error still shows its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

INPUT_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
"""What reading a command's input raises when the input is wrong (json.JSONDecodeError is a ValueError)."""


def refuse(message: str) -> None:
    """Print `error: message` as one line on stderr and exit with status 2."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
    raise SystemExit(2)


@contextlib.contextmanager
def refusing_bad_input() -> Iterator[None]:
    """Turn an input error raised inside the block into a one-line refusal (exit status 2)."""
    try:
        yield
    except INPUT_ERRORS as error:
        refuse(str(error) or type(error).__name__)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line refusal: `error: PROG: MESSAGE (see PROG --help)`, exit status 2."""

    def error(self, message: str):
        refuse(f"{self.prog}: {message} (see {self.prog} --help)")
