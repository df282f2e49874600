"""Output safety: no run destroys, mixes up or silently replaces a result.

Every command that writes a result claims its output paths first (:meth:`Outputs.claim`),
before any work, and holds them until it returns.  A claim:

* **refuses an output that is one of the command's inputs**: the same path, or the
  same file reached through a symlink, ``..`` or a hard link (checkpoints, the
  config file, the data folders); every output counts, the JSON written beside a
  ``.pt`` too;
* **checks the output can be written**: an existing file where a folder is needed (or
  the reverse), something that is not a regular file (``/dev/null``), a parent that is
  a file, a read-only or unwritable folder: one line, before any work;
* **applies the overwrite rule**: an existing result is never replaced unless the run
  continues it (``--resume``) or ``--overwrite`` is given; otherwise
  ``X exists (an ann checkpoint of <date>); use --resume to continue it or --overwrite
  to replace it``.  With ``--overwrite`` the old file stays in place until the new run
  has a complete replacement (a training run: its first completed epoch, see
  :func:`replacing`; other commands: their finished output), then it is replaced
  atomically;
* **takes an exclusive lock** per output (``.NAME.lock`` beside it while the run
  lasts, a ``filelock`` flock, which the operating system drops when its process
  dies).  The lock file records the owner's pid, host, start time and command line; a
  second writer stops at once with one line naming the first.  A lock file left by an
  owner that was killed (nobody holds its lock) is reported as stale and taken over;
* **removes orphan temporary files** of that output (``.NAME.<pid>-XXXX.tmp``, left by
  SIGTERM or kill -9 during an atomic write), those whose writer is no longer alive.
  They are never read as results.

Every file is written atomically, through one writer (:func:`atomic_target`, and
:func:`atomic_write_text` / :func:`write_json` on it): a temporary file in the same
folder, then ``os.replace``, so an interrupted run never leaves half a file.
"""

from __future__ import annotations

import functools
import json
import glob
import os
import re
import socket
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

from .atomic import atomic_target, atomic_write_text, write_json  # noqa: F401  (the writer of every output)
from .errors import SnnadvError


class OutputError(SnnadvError):
    """An output cannot (or must not) be written: it is an input, exists, is busy or unwritable."""


# --------------------------------------------------------------------------- paths
def checkpoint_paths(out, default_name: str) -> tuple[Path, Path]:
    """A stage's checkpoint and its JSON: ``--out`` ending in ``.pt``, else a folder
    holding ``<default_name>.pt`` (default ``runs/``)."""
    path = Path(out or f"runs/{default_name}.pt")
    if path.suffix != ".pt":
        path = path / f"{default_name}.pt"
    return path, path.with_suffix(".json")


def _same(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _inside(a: Path, folder: Path) -> bool:
    return Path(os.path.realpath(a)).is_relative_to(os.path.realpath(folder))


def data_inputs(data_dir) -> list[Path]:
    """The folders of a dataset no output may be written into."""
    if not data_dir:
        return []
    root = Path(data_dir)
    return [root / n for n in ("train", "test", "cifar-10-batches-py", "cifar-100-python") if (root / n).is_dir()]


def check_not_inputs(outputs: list[Path], inputs: dict) -> None:
    """``inputs``: ``{option: path or [paths]}``; a folder input holds no output."""
    for out in outputs:
        for option, paths in inputs.items():
            for p in paths if isinstance(paths, (list, tuple)) else [paths]:
                if p is None:
                    continue
                p = Path(p)
                if p.is_dir() and _inside(out, p):
                    raise OutputError(f"output '{out}' is inside the input folder '{p}' ({option}): "
                                      f"choose another --out; nothing was written")
                if not p.is_dir() and _same(out, p):
                    how = "" if str(out) == str(p) else f" (the same file as {option} '{p}')"
                    raise OutputError(f"output '{out}' is the input {option}{how}: it would be replaced; "
                                      f"choose another --out; nothing was written")


def check_writable(path: Path, folder: bool = False) -> None:
    """``path`` (a file, or a folder with ``folder``) can be created or replaced."""
    if path.exists() or path.is_symlink():
        if folder and not path.is_dir():
            raise OutputError(f"output folder '{path}' exists and is not a folder")
        if not folder and path.is_dir():
            raise OutputError(f"output '{path}' is a folder, expected a file name")
        if not folder and not path.is_file():
            raise OutputError(f"output '{path}' is not a regular file (e.g. a device): choose a file name")
    parent = path if folder else path.parent
    while not parent.exists():
        if parent.is_symlink():
            raise OutputError(f"output folder '{parent}' is a broken link")
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"cannot write '{path}': '{parent}' is a file, not a folder")
    if not os.stat(parent).st_mode & 0o222 or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write '{path}': folder '{parent}' is read-only")
    try:
        fd, probe = tempfile.mkstemp(prefix=".snnadv-probe-", dir=parent)
    except OSError as e:
        raise OutputError(f"cannot write '{path}': {e.strerror.lower()} in '{parent}'") from None
    os.close(fd)
    os.unlink(probe)


def describe(path: Path) -> str:
    """What an existing output is, for a message: ``an ann checkpoint of 2026-11-30 11:02``."""
    when = datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    if path.suffix == ".pt" and path.is_file():
        from .checkpoint import load_checkpoint

        try:
            return f"an {load_checkpoint(path)['stage']} checkpoint of {when}"
        except (SnnadvError, KeyError, TypeError):
            return f"a file of {when} that is not a readable checkpoint"
    return f"a result of {when}"


def check_replace(path: Path, cfg: dict, resumable: bool = False) -> None:
    """The overwrite rule: an existing ``path`` needs ``--resume`` (if ``resumable``) or ``--overwrite``."""
    if cfg.get("resume") and cfg.get("overwrite"):
        raise OutputError("--resume continues the run at --out and --overwrite replaces it: choose one")
    if not path.exists() or cfg.get("overwrite") or (resumable and cfg.get("resume")):
        return
    hint = "use --resume to continue it or --overwrite to replace it" if resumable else "use --overwrite to replace it"
    raise OutputError(f"{path} exists ({describe(path)}); {hint}")


# --------------------------------------------------------------------------- locks
def lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def _owner_text(owner: dict) -> str:
    since = datetime.fromtimestamp(owner.get("started", 0)).strftime("%H:%M:%S")
    return f"pid {owner.get('pid')} on host {owner.get('host')} since {since} ({owner.get('command', '?')})"


def _read_owner(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def _command() -> str:
    argv = list(sys.argv) or ["python"]
    return " ".join([Path(argv[0]).name, *argv[1:]])[:200]


def _make_parents(folder: Path) -> list[Path]:
    """``mkdir -p folder``; returns the folders it created, deepest first."""
    created = []
    while not folder.exists():
        created.append(folder)
        folder = folder.parent
    for f in reversed(created):
        f.mkdir(exist_ok=True)
    return created


def lock(path: Path, stack: ExitStack, note=print) -> None:
    """Lock ``path`` exclusively until ``stack`` closes; a busy lock is a one-line error.

    A run that wrote nothing (an error before its first output) leaves nothing: the lock
    file and the folders made for it are removed again.
    """
    import filelock

    lp = lock_path(path)
    created = ([] if lp.exists() else [lp]) + _make_parents(lp.parent)
    before = _read_owner(lp)
    fl = filelock.FileLock(str(lp), timeout=0)
    try:
        fl.acquire()
    except filelock.Timeout:
        owner = before or _read_owner(lp)
        who = _owner_text(owner) if owner else "another process"
        raise OutputError(f"{path} is being written by {who}; wait for it or choose another --out") from None
    stack.callback(fl.release)
    if before:
        note(f"note: {path} had a stale lock of {_owner_text(before)}, which no longer holds it; taken over")
    with open(lp, "r+") as f:
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                            "command": _command()}))
    stack.callback(_free, path, lp, created)  # runs before the release


def _free(path: Path, lp: Path, created: list[Path]) -> None:
    """Before releasing: remove the lock file (filelock re-checks that the file it locked is
    still linked, so a waiter never holds a removed one); a run that wrote nothing also
    removes the folders it created, if still empty."""
    lp.unlink(missing_ok=True)
    if not path.exists():
        for d in created[1:]:
            try:
                d.rmdir()
            except OSError:
                break  # not empty: something else was written there


# --------------------------------------------------------------------------- orphans
def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphans(path: Path, recursive: bool = False) -> list[Path]:
    """Delete temporary files of ``path`` (a file's ``.NAME.*.tmp``; in a folder every
    ``.*.tmp``) whose writer is not alive.  Call it while holding ``path``'s lock."""
    if path.is_dir():
        pattern = re.compile(r"^\..+\.(?:(\d+)-)?[A-Za-z0-9_]{8}\.(?:tmp|png)$")
        candidates = path.rglob(".*") if recursive else path.glob(".*")
    else:
        pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:(\d+)-)?[A-Za-z0-9_]{{8}}\.(?:tmp|png)$")
        candidates = path.parent.glob(f".{glob.escape(path.name)}.*")
    removed = []
    for p in candidates:
        m = pattern.match(p.name)
        if m and p.is_file() and not (m.group(1) and _alive(int(m.group(1)))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# --------------------------------------------------------------------------- claims
class Outputs:
    """The outputs a run has claimed; their locks are held until :meth:`close`."""

    def __init__(self, note=None):
        self.stack = ExitStack()
        self.note = note or (lambda msg: print(msg, file=sys.stderr))

    def claim(self, paths, cfg: dict, *, inputs: dict | None = None, resumable: bool = False,
              folder: bool = False, replace: list | None = None) -> None:
        """Check ``paths`` (the first is the one locked; ``folder``: it is a folder), then lock them.

        ``inputs``: ``{option: path}`` the outputs must differ from (the config and the
        data folders are added); ``replace``: the existing results the overwrite rule
        protects (default the first path).  Under ``torchrun`` only rank 0 claims (and
        writes); an error there is raised on every process.
        """
        from . import parallel

        w = parallel.world()
        if w.distributed:  # one claim, by the process that writes (rank 0); its error on every process
            error = None
            if w.main:
                try:
                    self._claim(paths, cfg, inputs, resumable, folder, replace)
                except SnnadvError as e:
                    error = e
            error = parallel.broadcast_object(error)
            if error is not None:
                raise error
            return
        self._claim(paths, cfg, inputs, resumable, folder, replace)

    def _claim(self, paths, cfg: dict, inputs, resumable: bool, folder: bool, replace) -> None:
        paths = [Path(p) for p in paths]
        inputs = {**(inputs or {}), "--config": cfg.get("config"), "--data-dir": data_inputs(cfg.get("data_dir"))}
        check_not_inputs(paths, inputs)
        for i, p in enumerate(paths):
            check_writable(p, folder and i == 0)
        for p in replace if replace is not None else paths[:1]:
            check_replace(Path(p), cfg, resumable)
        lock(paths[0], self.stack, self.note)
        for p in replace if replace is not None else paths[:1]:
            check_replace(Path(p), cfg, resumable)  # again under the lock: a writer may have just finished
        for p in paths:
            remove_orphans(p)

    def close(self) -> None:
        self.stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def guarded(fn):
    """Call ``fn(..., outputs=Outputs())`` and release every claimed output when it returns."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if kwargs.get("outputs") is not None:
            return fn(*args, **kwargs)
        with Outputs() as outputs:
            return fn(*args, **{**kwargs, "outputs": outputs})
    return run


def replacing(stale: list):
    """Decorate a training run's ``save``: after its first call (the first completed epoch
    has replaced any old checkpoint) remove ``stale``, the JSON that described the old one."""
    def wrap(save):
        left = list(stale)

        @functools.wraps(save)
        def run(*args, **kwargs):
            out = save(*args, **kwargs)
            while left:
                Path(left.pop()).unlink(missing_ok=True)
            return out
        return run
    return wrap


# --------------------------------------------------------------------------- resumable pieces
def tensor_hash(x) -> str:
    """sha256 of a tensor's values, shape and dtype (what a piece of work was computed on)."""
    import hashlib

    import torch

    t = x.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}|".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class Pieces:
    """Finished pieces of a long stage in a folder, each file named ``NAME-KEY``: KEY is
    :func:`snnadv.config.settings_key` of everything that makes the piece (``common``,
    plus the piece's own ``what``), so a piece made under other settings, models or
    images is never read back; files are written atomically and only read, never
    deleted (a stage that re-runs with other settings just adds new ones)."""

    def __init__(self, folder: Path, common: dict):
        self.folder, self.common = Path(folder), dict(common)

    def path(self, name: str, what: dict, suffix: str) -> Path:
        from .config import settings_key

        return self.folder / f"{name}-{settings_key({**self.common, **what})}{suffix}"

    def load_tensor(self, name: str, what: dict):
        import torch

        p = self.path(name, what, ".pt")
        if not p.is_file():
            return None
        try:
            return torch.load(p, map_location=self.common.get("device", "cpu"), weights_only=True)
        except Exception:  # noqa: BLE001 (an unreadable piece is made again)
            return None

    def save_tensor(self, name: str, what: dict, x) -> None:
        import torch

        with atomic_target(self.path(name, what, ".pt")) as tmp:
            torch.save(x.detach().to("cpu"), tmp)

    def load_json(self, name: str, what: dict):
        p = self.path(name, what, ".json")
        try:
            return json.loads(p.read_text()) if p.is_file() else None
        except (OSError, ValueError):
            return None

    def save_json(self, name: str, what: dict, data: dict) -> None:
        write_json(self.path(name, what, ".json"), data)
