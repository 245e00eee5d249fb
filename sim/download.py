"""``kvtrie traces get``: a third-party trace from where its authors publish it, checked
against the sha256 kvtrie records, kept in the user's cache.

Each file is streamed to a temporary file beside its place, hashed as it arrives, and renamed
into place only when its digest matches, so a failed or interrupted download leaves nothing
that a replay could mistake for the trace.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from kvtrie.traces import ThirdParty, cache_dir

__all__ = ["DownloadError", "ChecksumMismatch", "download", "manual_steps"]

CHUNK = 1 << 20
TIMEOUT_S = 30


class DownloadError(Exception):
    """The source could not be reached or read; nothing was kept."""


class ChecksumMismatch(Exception):
    """What arrived is not the file kvtrie recorded; nothing was kept."""


def base_url(trace: ThirdParty) -> str:
    """The source, or ``$KVTRIE_TRACE_MIRROR/<name>/`` when a user keeps a mirror."""
    mirror = os.environ.get("KVTRIE_TRACE_MIRROR")
    return f"{mirror.rstrip('/')}/{trace.folder}/" if mirror else trace.base_url


def manual_steps(trace: ThirdParty) -> str:
    folder = cache_dir() / trace.folder
    lines = [f"to get it by hand, put these files in {folder}:"]
    for file, sha in trace.files:
        lines.append(f"  {base_url(trace)}{file}  (sha256 {sha})")
    lines.append("or pass the path of a copy you have to kvtrie replay / sweep / gate")
    return "\n".join(lines)


def _fetch(url: str, target: Path, sha256: str, progress: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(handle, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
                    size = int(response.headers.get("Content-Length") or 0) or None
                    with tqdm(total=size, unit="B", unit_scale=True, desc=target.name,
                              disable=not progress, leave=False) as bar:
                        while chunk := response.read(CHUNK):
                            digest.update(chunk)
                            out.write(chunk)
                            bar.update(len(chunk))
            except (urllib.error.URLError, OSError, ValueError) as exc:
                reason = getattr(exc, "reason", exc)
                raise DownloadError(f"could not download {url}: {reason}") from None
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != sha256:
            raise ChecksumMismatch(
                f"{url}: sha256 {digest.hexdigest()} is not the recorded {sha256}; "
                "the source changed or the download was damaged, and nothing was kept"
            )
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def download(trace: ThirdParty, force: bool = False, progress: bool = True) -> Path:
    """Every file of ``trace`` in the cache, checked; returns the folder. Files already there
    with the right digest are kept unless ``force``."""
    folder = cache_dir() / trace.folder
    files = tqdm(trace.files, desc=trace.name, unit="file", disable=not progress or len(trace.files) < 2)
    for file, sha in files:
        target = folder / file
        if not force and target.is_file() and _sha256(target) == sha:
            continue
        _fetch(base_url(trace) + file, target, sha, progress)
    return folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
