"""Where kvtrie writes: every output path is checked before any work starts, and written so
that nothing that is not kvtrie's own is ever clobbered.

The rules, for every writer (reports, Markdown, JUnit, generated traces, sweeps, fuzz, bench):

- an output that names an input of the same run is refused;
- ``-`` is standard output; a character device or a FIFO (``/dev/null``, ``/dev/stdout``, a
  pipe) is written through, never replaced;
- a symbolic link is followed, and its target replaced atomically (the link stays);
- a regular file is replaced atomically: readers see the old file or the whole new one;
- the directory must exist and be writable, and the path must not be a directory.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

__all__ = ["check_output", "check_output_dir", "write_output", "write_atomic"]


def _special(path: Path) -> bool:
    """A character device or a FIFO: written through, never replaced."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output(option: str, path: Path | str, inputs: Iterable[Path | str] = ()) -> None:
    """Raise ``ValueError`` (naming ``option``) if ``path`` can't be written as an output."""
    if str(path) == "-":
        return
    path = Path(path)
    for source in inputs:
        if _same(path, Path(source)):
            raise ValueError(f"{option} {path}: that is an input of this run; choose another path")
    if _special(path):
        return
    target = path.resolve() if path.is_symlink() else path
    if target.is_dir():
        raise ValueError(f"{option} {path}: is a directory; give a file path")
    folder = target.parent
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: the directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: the directory {folder} is not writable")
    if target.exists() and not os.access(target, os.W_OK):
        raise ValueError(f"{option} {path}: the file is not writable")


def check_output_dir(
    option: str, path: Path | str, names: Iterable[str] = (), inputs: Iterable[Path | str] = ()
) -> None:
    """Raise ``ValueError`` if ``path`` can't be used as an output directory (it may be
    absent, then its parent must be writable) for files of these ``names``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path}: exists and is not a directory")
    folder = path if path.is_dir() else path.parent
    if not folder.is_dir():
        raise ValueError(f"{option} {path}: the directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: the directory {folder} is not writable")
    inputs = list(inputs)
    if path.is_dir():
        for name in names:
            check_output(option, path / name, inputs)


def write_output(path: Path | str, text: str) -> None:
    """Write ``text`` to an output path by the rules above."""
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path = Path(path)
    if _special(path):
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
        return
    write_atomic(path.resolve() if path.is_symlink() else path, text)


def write_atomic(path: Path | str, text: str) -> None:
    """Replace the regular file ``path`` so readers see the old file or the whole new one,
    never half; the new file is flushed to disk before the rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
