"""The one atomic writer: a temporary file beside the target, renamed over it on success
(checkpoints, JSON, Markdown, CSV, figures, the decode cache).  The temporary file's name
carries the writer's pid, so :func:`snnadv.outputs.remove_orphans` recognises one left by
a killed writer."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_target(path: str | os.PathLike, suffix: str = ".tmp"):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    An error or Ctrl-C inside the block removes the temporary file and leaves any
    existing ``path`` untouched (used for checkpoints, JSON, Markdown, CSV, figures).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the writer's pid in the name: an orphan (the writer was killed) is recognised and removed
    # by the next run that claims this output (:func:`remove_orphans`)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_target(path) as tmp, open(tmp, "w", newline="") as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: dict) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)
