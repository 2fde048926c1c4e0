"""Files replaced whole: a reader, another process, a crash or a Ctrl-C mid-write never leaves half of one."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def written_aside(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path` for the block to write; moved over `path` when the block ends
    (one rename: atomic on a file system), removed when it raises, so `path` is the old file or the new
    one, whole. suffix: an ending the writer insists on (numpy's .npz)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}{suffix}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
