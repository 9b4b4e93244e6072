"""Writing files so that nothing is lost or written where it should not be: the one place
limner creates temp files and folders, replaces files, claims new names and locks folders.

- Temp files and folders are created exclusively (O_EXCL / mkdir) with unpredictable names
  `.<name>.tmp<pid>.<random>` in the destination folder, so a symlink planted there is never
  written through and two writers never share one; a rename puts them in place.
- `write_atomic(..., replace=False)` claims a new name (a hard link, which fails if the name
  exists): concurrent writers into one folder never overwrite each other.
- `FolderLock` holds an flock on a folder (released by the kernel when the process dies, so a
  killed holder never blocks the next one); `.limner.lock` inside names the holder's pid.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from .errors import LimnerError, notice

LOCK_NAME = ".limner.lock"
RECORDS = "prompts.jsonl"  # `limner sample`'s record: one JSON line per run
_TEMP = re.compile(r"^\..+\.tmp(\d+)(\.[^.]*)?$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_prefix(name: str) -> str:
    """The start of a temp name for `name` written by this process."""
    return f".{name}.tmp{os.getpid()}."


def temp_dir(folder: Path) -> Path:
    """A new, empty temp folder beside `folder` (created exclusively, never a planted one)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=temp_prefix(folder.name)))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None], replace: bool = True) -> Path:
    """Write `path` through an exclusive temp file beside it: `write(f)` fills the file, then a
    rename replaces `path` (replace=True; a symlink at `path` is replaced, not followed) or a
    hard link claims it (replace=False: FileExistsError when the name is taken). A reader or a
    kill never sees half a file; on failure the temp file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name))
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            tmp.unlink()
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None:  # a write through the descriptor: name the file meant
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def cache_dir() -> Path:
    """limner's cache folder: LIMNER_CACHE_DIR, else ~/.cache/limner (not created here)."""
    return Path(os.environ.get("LIMNER_CACHE_DIR") or Path.home() / ".cache" / "limner")


def joined_parts(parts: list[Path], name: str, sha256: str, what: str, install: str) -> Path:
    """`parts` (files of weights packages that ship one file in pieces) put together once into the
    cache folder as `<sha256[:16]>-<name>` (other parts, other file), through a temp file, checked
    against `sha256` (a digest listed beside them or pinned in limner); a file there of their total
    size is taken as joined before. A missing part is named with `install` (the pip command); a
    wrong digest leaves nothing behind."""
    import hashlib

    for part in parts:
        if not part.is_file():
            raise LimnerError(f"the chunk {part} is missing: {install}")
    if not (len(sha256) == 64 and all(c in "0123456789abcdef" for c in sha256)):
        raise LimnerError(f"{what}: {sha256!r} is not a SHA-256 (64 hex digits)")
    target = cache_dir() / f"{sha256[:16]}-{name}"
    if target.is_file() and target.stat().st_size == sum(part.stat().st_size for part in parts):
        return target  # put together and checked before

    def join(out: IO[bytes]) -> None:
        digest = hashlib.sha256()
        for part in parts:
            with open(part, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
        if digest.hexdigest() != sha256:
            raise LimnerError(f"the chunks of {what} put together have SHA-256 {digest.hexdigest()}, "
                              f"not {sha256}: reinstall the wheels ({install})")

    return write_atomic(target, join)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """A text file (UTF-8) written through write_atomic."""
    data = text.encode("utf-8")
    return write_atomic(path, lambda f: f.write(data))


def path_inside(folder: str | Path, option: str) -> Path | None:
    """A relative path from a stranger's file (a checkpoint's config, a captioner.json) resolved
    inside `folder`, or None when it is absolute or leads out of it."""
    inside = (Path(folder) / option).resolve()
    return None if Path(option).is_absolute() or not inside.is_relative_to(Path(folder).resolve()) else inside


def check_own_folder(folder: str | Path, entries: set[str], what: str) -> None:
    """Refuse to write into `folder` unless it is new, empty, or holds only `entries` (the names
    that limner's `what` writes there): a folder of the user's is never written into."""
    folder = Path(folder)
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise LimnerError(f"{folder} is not a folder; name a new folder for the {what}")
    if not folder.is_dir():
        return
    foreign = sorted(e.name for e in folder.iterdir() if e.name not in entries and not _TEMP.match(e.name))
    if foreign:
        shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        raise LimnerError(f"{folder} holds files that are not a limner {what}'s ({shown}); the {what} writes only "
                          f"into a new, empty or earlier {what} folder. Name another.")


def check_own_file(path: str | Path, ours: Callable[[bytes], bool], what: str) -> None:
    """Refuse to replace `path` unless it is absent or `ours(its bytes)` says limner wrote it."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise LimnerError(f"not writing {path}: it is not a plain file")
    if path.is_file() and not ours(path.read_bytes()):
        raise LimnerError(f"not writing {path}: it holds something other than a limner {what}; give a new file name")


def append_record(path: str | Path, record: dict) -> None:
    """Add one JSON line to a records file limner keeps (the caller holds the folder's lock).
    The file is rewritten whole through write_atomic, so a kill leaves the old or the new one;
    a file there that is not limner's JSON lines is refused, never overwritten."""
    path = Path(path)
    old = b""
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise LimnerError(f"not writing {path}: it is not a plain file; move it away")
    if path.is_file():
        old = path.read_bytes()
        try:
            if not all(isinstance(json.loads(line), dict) for line in old.decode("utf-8").splitlines()):
                raise ValueError("a line is not a JSON object")
        except ValueError:
            raise LimnerError(f"not writing {path}: it holds something other than limner's records (JSON lines); "
                              "move it away or give another --out") from None
        if old and not old.endswith(b"\n"):
            old += b"\n"
    line = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")
    write_atomic(path, lambda f: f.write(old + line))


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temp files and folders of writers that died mid-write (kill -9, power loss):
    `.<name>.tmp<pid>...` whose pid is no longer running. Returns what was removed."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp*"):
        match = _TEMP.match(tmp.name)
        if not match or tmp.is_symlink():
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and not _running(pid):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class FolderLock:
    """An exclusive lock on a folder for as long as the holder lives (or until release()): an
    flock on the folder itself, which the kernel drops when the process dies, so a killed holder
    never blocks the next one. With `note`, the holder's pid is written to `.limner.lock` inside
    for the refusal to name; `what` says what holds it ("training"). `wait` queues instead."""

    def __init__(self, folder: str | Path, what: str, wait: bool = False, note: bool = True):
        import fcntl

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fd: int | None = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if wait:  # queue behind the holder, and say so: a wait is never silent
                notice(f"waiting for {self._holder()} to finish writing {self.folder}")
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            else:
                holder = self._holder()
                self.release()
                raise LimnerError(f"{self.folder} is in use by {holder}. Two processes writing one folder would "
                                  "overwrite each other's files; wait for it to finish, stop it, or use another "
                                  "folder.") from None
        if note:
            try:
                write_text_atomic(self.folder / LOCK_NAME, f"limner {what} (pid {os.getpid()})\n")
            except OSError:
                self.release()
                raise

    def _holder(self) -> str:
        """Who holds the lock, as its note says."""
        try:
            return (self.folder / LOCK_NAME).read_text(encoding="utf-8", errors="replace").strip() or \
                "another limner process"
        except OSError:
            return "another limner process"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
