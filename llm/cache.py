"""The ignored `cache/` folder's one locking rule, shared by every one-time build in it.

The SmolLM2 conversion, the GPT-2 tokenizer folder and the testbed files are each built once; tests
and runs may start together, so a build holds an exclusive file lock beside its target. Standard
library only, so `llm/testbed.py` stays free of torch.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def cache_lock(target: Path) -> Iterator[None]:
    """Serialise the one-time build of `target` across processes (lock file `.<name>.lock` beside it)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
