"""Files that are never lost: atomic writes, outputs checked before any work (never a checkpoint
or a dataset, an existing file only with --overwrite), and the lock by which a run owns its folder."""
import contextlib
import errno
import os
import zipfile
from pathlib import Path

from system import errors


@contextlib.contextmanager
def atomic_write(path: Path):
    """Yields a temporary path beside `path` to write; when the block succeeds it replaces `path`
    in one rename, when it fails it is removed. Readers never see a half-written file. A write the
    machine refuses (a full disk, a file-size limit) becomes one UserError that names the file
    and says that its previous version, if any, is as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        if not is_write_error(e):  # a network error while downloading, a bug: not the disk's
            raise
        kept = f"the previous {path.name} is as it was" if path.exists() else f"no {path.name} was written"
        raise refused(path, e, kept) from None
    finally:
        tmp.unlink(missing_ok=True)


def refused(path: Path, e: Exception, kept: str) -> errors.UserError:
    """The one line for a write the machine refused (is_write_error): the file, why, what is still
    whole (`kept`) and what to do."""
    reason = e.strerror.lower() if isinstance(e, OSError) and e.strerror else "the write failed"
    return errors.UserError(f"could not write {path} ({reason}; a full disk or a file-size limit?); {kept}. "
                            "Free some space and run the command again (a training run: with --resume)")


def is_write_error(e: Exception) -> bool:
    """A write the machine refused: a full disk, a quota or a file-size limit (OSError), or as
    torch.save reports one, a RuntimeError of its zip writer ("file write failed", "unexpected pos
    ...", "basic_ios::clear: iostream error")."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    return any(s in str(e) for s in ("write failed", "unexpected pos", "PytorchStreamWriter", "iostream error"))


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def check_folder(folder: Path, flag: str, fix: str | None = None) -> None:
    """Refuse, before any work, a folder that cannot be made or written: a file stands at its
    place or above it, or the nearest existing folder above it is read-only. `fix` says what to
    do (default: choose another `flag`)."""
    folder, fix = Path(folder), fix or f"choose another {flag}"
    if folder.exists() and not folder.is_dir():
        raise errors.UserError(f"{flag} {folder} is a file, not a folder; {fix}")
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise errors.UserError(f"{flag} {folder}: {existing} is a file, not a folder; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise errors.UserError(f"{flag} {folder}: cannot write into {existing} (read-only); {fix}")


def is_precious(path: Path) -> bool:
    """A checkpoint or a dataset, which no output may replace: a zip archive (torch.save and
    np.savez both write one) holding a pickled state or MedMNIST arrays, unless it is a
    synthetic set that sample.py wrote (and marked)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    checkpoint = any(n.endswith("data.pkl") for n in names)
    dataset = any(n.endswith("_images.npy") for n in names) and SYNTHETIC_MARK + ".npy" not in names
    return checkpoint or dataset


SYNTHETIC_MARK = "synthetic_source"  # the npz key that marks sample.py's exports


def check_output(path: str | os.PathLike, flag: str, suffixes: tuple[str, ...], overwrite: bool,
                 inputs: tuple = ()) -> Path:
    """Refuse, before any work, an output file that cannot or should not be written: a name
    without one of `suffixes`, a folder, a place under a file or in a read-only folder, one of
    the command's `inputs`, a checkpoint or a dataset; an existing file only with `overwrite`
    (the caller then says that it replaced it). Missing folders are made when writing."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise errors.UserError(f"{flag} {path}: name a {' or '.join(suffixes)} file")
    if path.is_dir():
        raise errors.UserError(f"{flag} {path} is a folder; name a file in it, such as {path / ('out' + suffixes[0])}")
    check_folder(path.parent, flag)
    if path.exists():
        if any(Path(i).exists() and path.samefile(i) for i in inputs):
            raise errors.UserError(f"{flag} {path} is an input of this command; choose another name")
        if is_precious(path):
            raise errors.UserError(f"{flag} {path} is a checkpoint or a dataset, which an output never "
                                   "replaces; choose another name")
        if not overwrite:
            raise errors.UserError(f"{flag} {path} already exists; pass --overwrite to replace it, or choose "
                                   "another name")
    return path


def write_output_text(path: str | os.PathLike, text: str) -> str:
    """Write an output file atomically, making its folder; returns replaced_note(path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    note = replaced_note(path)
    atomic_write_text(path, text)
    return note


def replaced_note(path: Path) -> str:
    """' (replaced the earlier one)' when `path` exists: said when an output replaces a file."""
    return " (replaced the earlier one)" if Path(path).exists() else ""


_locks = {}  # folder -> open descriptor holding its lock, for the life of the process


def lock_folder(folder: Path) -> None:
    """Hold an exclusive lock on a run folder until this process ends, so that no second run
    writes into it meanwhile. The operating system drops the lock when the process ends, however
    it ends, so a crashed run leaves nothing stuck. On POSIX the folder itself is locked (flock)
    and nothing is written into it; on Windows a `.lock` file in it is."""
    key = Path(folder).resolve()
    if key in _locks:
        return
    try:
        import fcntl
        fd = os.open(key, os.O_RDONLY)
        lock = lambda: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:
        import msvcrt
        fd = os.open(key / ".lock", os.O_RDWR | os.O_CREAT)
        lock = lambda: msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    try:
        lock()
    except OSError:
        os.close(fd)
        raise errors.UserError(f"another run is writing to {folder}; wait for it to end, or choose another "
                               "--out") from None
    _locks[key] = fd


def release_folders() -> None:
    for fd in _locks.values():
        os.close(fd)
    _locks.clear()
