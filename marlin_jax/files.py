"""Atomic file writes: a reader never sees a partial file under the target's name."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary name beside ``path`` to write to (``open(tmp, "xb")``, ``np.save``, ...),
    renamed to ``path`` when the block ends without an exception and removed otherwise. Hidden and
    ending like ``path``: ``.part-<random><ext>`` (a killed run's leftovers match ``.part-*``).
    Unlike ``tempfile.mkstemp`` (mode 0600, kept by the rename) the file gets ``open``'s mode."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".part-{secrets.token_hex(8)}{os.path.splitext(path)[1]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
