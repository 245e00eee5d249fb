"""A disk tier in a directory: one safetensors file per snapshot, a manifest, a lock.

Layout of a store directory::

    kvtrie-store.json   the manifest: format version, model fingerprint, the trie shape of the
                        stored nodes (edges, LRU order, restore points) and each file's checksum
    snapshots/          one file per stored snapshot, <id>-<layer>.safetensors, never rewritten
    lock                held (flock) by the process using the store; says its PID

Every write is atomic (a temporary file, fsync, rename), the manifest's too, and files are
written by a background thread, off the request path: a snapshot still queued is read from the
bytes waiting to be written. A file is trusted only if its SHA-256 matches what was computed
when it was encoded, checked again on every read: a truncated, damaged or missing file is a
miss, never a wrong state. On open, a store adopts what its manifest lists and verifies, and
deletes every other file of its own (orphans of a crash, half-written temporaries, damaged
files); files it did not write are left alone.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import queue
import re
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .protocols import Snapshot
from .tiers import SavedNode, StoredSnapshot, saved_trie

if TYPE_CHECKING:
    from .prefix_cache import PrefixCache

__all__ = ["FORMAT_VERSION", "DirectoryStore", "SnapshotCodec", "StoreError"]

log = logging.getLogger(__name__)

FORMAT_NAME = "kvtrie-store"
FORMAT_VERSION = 1
MANIFEST = "kvtrie-store.json"
FILE_NAME = re.compile(r"^(\d{12})-(\d+)\.safetensors(\.tmp)?$")


class StoreError(ValueError):
    """A store directory that can't be used: in use, another model's, a newer format, not a
    directory, not writable. The message names the directory and what to do."""


class SnapshotCodec(Protocol):
    """How a backend's snapshots become tensors and back (one codec per model)."""

    # what the stored states are states of: two stores with different fingerprints never
    # share a file (another model, another profile, another dtype)
    fingerprint: str

    def encode(
        self, layer: int, snapshot: Snapshot
    ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """Tensors and string metadata that :meth:`decode` rebuilds ``snapshot`` from."""
        ...

    def decode(self, layer: int, tensors: dict[str, np.ndarray], meta: dict[str, str]) -> Snapshot:
        """A fresh snapshot of layer ``layer`` from what :meth:`encode` gave."""
        ...


def _encode_file(tensors: dict[str, np.ndarray], meta: dict[str, str]) -> bytes:
    from safetensors.numpy import save

    # safetensors writes an array's memory as it lies: a strided view (MLX's values of a
    # sliding window are one) would come back scrambled, so every tensor is made contiguous
    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=meta)


def _decode_file(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata of a safetensors file's bytes."""
    from safetensors.numpy import load

    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    return load(data), header.get("__metadata__", {})


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    """``data`` at ``path`` or nothing there: a temporary file, fsync, rename, fsync the
    folder (so the rename itself survives a power cut)."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)  # a full disk: leave no half-written file behind
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


class StoredFile(StoredSnapshot):
    """One snapshot in a :class:`DirectoryStore`: a file, or bytes queued to become one."""

    def __init__(
        self,
        store: DirectoryStore,
        name: str,
        layer: int,
        start: int,
        end: int,
        nbytes: int,
        sha256: str,
        pending: bytes | None,
    ) -> None:
        super().__init__(start, end, nbytes)
        self.store = store
        self.name = name
        self.layer = layer
        self.sha256 = sha256
        self.pending = pending  # the bytes while they wait for the writer
        self.written = pending is None
        self.failed = False  # its write failed (a full disk): reading it is a miss
        self.closed = False

    @property
    def path(self) -> Path:
        return self.store.snapshot_dir / self.name

    def _read(self) -> Snapshot | None:
        """The snapshot decoded from verified bytes, or None."""
        assert not self.closed, "reading a closed stored snapshot"
        if self.failed:
            log.warning("disk tier: %s was never written (its write failed)", self.path)
            return None
        with self.store.lock:
            data = self.pending
        if data is None:
            try:
                data = self.path.read_bytes()
            except OSError as exc:
                log.warning("disk tier: can't read %s: %s", self.path, exc)
                return None
        if _digest(data) != self.sha256:
            log.warning("disk tier: %s fails its checksum (truncated or damaged)", self.path)
            return None
        tensors, meta = _decode_file(data)
        return self.store.codec.decode(self.layer, tensors, meta)

    @contextmanager
    def opened(self) -> Iterator[Snapshot | None]:
        snapshot = self._read()
        try:
            yield snapshot
        finally:
            if snapshot is not None:
                snapshot.close()

    def take(self) -> Snapshot | None:
        snapshot = self._read()
        self.close()
        return snapshot

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.store.forget(self)

    def truncate(self) -> None:
        """Cut the file (or the queued bytes) to half its length, as a crash or another
        process might (fault injection: the checksum must catch it)."""
        with self.store.lock:
            if self.pending is not None:
                self.pending = self.pending[: len(self.pending) // 2]
                return
        data = self.path.read_bytes()
        self.path.write_bytes(data[: len(data) // 2])

    def corrupt(self) -> None:
        """Flip a byte of the data, on disk or queued, as a failing disk would (fault
        injection: the checksum must catch it)."""
        with self.store.lock:
            if self.pending is not None:
                self.pending = bytes([self.pending[0] ^ 1]) + self.pending[1:]
                return
        data = bytearray(self.path.read_bytes())
        data[len(data) // 2] ^= 1
        self.path.write_bytes(bytes(data))


@dataclass
class AdoptReport:
    """What opening a store found: kept, and deleted by kind."""

    adopted_files: int = 0
    adopted_nodes: int = 0
    deleted: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def dropped(self, why: str) -> None:
        self.deleted[why] = self.deleted.get(why, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "adopted_files": self.adopted_files,
            "adopted_nodes": self.adopted_nodes,
            "deleted": dict(sorted(self.deleted.items())),
            "warnings": list(self.warnings),
        }


class DirectoryStore:
    """The disk tier in a directory (see the module's docstring for its layout and rules)."""

    name = "directory"

    def __init__(
        self,
        path: Path | str,
        codec: SnapshotCodec,
        background: bool = True,
        save_every: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Open (or create) the store at ``path`` for ``codec``'s model, adopting what it
        verifies; ``background`` writes files from a thread; the manifest is written after a
        request once ``save_every`` seconds have passed since the last, and on close."""
        self.path = Path(path)
        self.codec = codec
        self.save_every = save_every
        self.clock = clock
        self._saved_at = clock()
        self.snapshot_dir = self.path / "snapshots"
        self.lock = threading.Lock()  # guards the files' pending bytes and the writer's queue
        self.failing_writes = 0
        self.written_bytes = 0
        self.write_errors = 0  # writes that failed (a full disk); the snapshots are lost
        self.background = background
        self._failure: BaseException | None = None
        self.reopen()

    def reopen(self) -> None:
        """Open the directory: lock it, adopt what verifies, start the writer (at construction,
        and again after :meth:`close`, as a new process would)."""
        self._files: dict[str, StoredFile] = {}
        self._next_id = 0
        self._lock_handle = self._open_directory()
        self.report = AdoptReport()
        self._saved: list[SavedNode] = self._adopt()
        self._queue: queue.Queue[StoredFile | None] | None = None
        self._writer: threading.Thread | None = None
        if self.background:
            self._queue = queue.Queue()
            self._writer = threading.Thread(
                target=self._write_loop, name="kvtrie-store", daemon=True
            )
            self._writer.start()

    # ---- opening ---------------------------------------------------------------------------

    def _open_directory(self) -> Any:
        path = self.path
        if path.exists() and not path.is_dir():
            raise StoreError(f"{path}: is a file, not a store directory; give a directory")
        if path.is_dir():
            own = {MANIFEST, "snapshots", "lock"}
            foreign = sorted(p.name for p in path.iterdir() if p.name not in own)
            if foreign and not (path / MANIFEST).exists() and not (path / "lock").exists():
                raise StoreError(
                    f"{path}: not a kvtrie store and not empty (holds {foreign[0]!r}"
                    f"{' and more' if len(foreign) > 1 else ''}); give an empty or new directory"
                )
        try:
            self.snapshot_dir.mkdir(parents=True, exist_ok=True)
            handle = open(path / "lock", "a+")
        except OSError as exc:
            raise StoreError(f"{path}: can't use it as a store: {exc.strerror or exc}") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise StoreError(
                f"{path}: in use by another process (PID {holder}); stop it or give another "
                "directory"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        if not os.access(self.snapshot_dir, os.W_OK):
            handle.close()
            raise StoreError(f"{path}: not writable; give a directory this user can write")
        return handle

    def _read_manifest(self) -> dict[str, Any] | None:
        path = self.path / MANIFEST
        if not path.exists():
            return None
        try:
            manifest = json.loads(path.read_bytes())
            body = json.dumps(manifest["body"], sort_keys=True).encode()
            if manifest.get("sha256") != _digest(body):
                raise ValueError("its checksum does not match")
            header = manifest["body"]
            if header.get("format") != FORMAT_NAME:
                raise ValueError("it is not a kvtrie store manifest")
        except (ValueError, KeyError, TypeError) as exc:
            self.report.warnings.append(f"{path}: unreadable manifest ({exc}): nothing adopted")
            return None
        version = header.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StoreError(
                f"{path}: store format version {version}, newer than this kvtrie's "
                f"{FORMAT_VERSION}; upgrade kvtrie or give another directory"
            )
        if header.get("fingerprint") != self.codec.fingerprint:
            raise StoreError(
                f"{self.path}: holds states of another model ({header.get('fingerprint')!r}, "
                f"not {self.codec.fingerprint!r}); give another directory, or delete this one"
            )
        return header

    def _adopt(self) -> list[SavedNode]:
        """Verify what the manifest lists, delete the rest of the store's own files, and
        return the saved trie with its verified snapshots (parents before children)."""
        header = self._read_manifest()
        listed: dict[str, dict[str, Any]] = dict(header.get("files", {})) if header else {}
        self._next_id = int(header.get("next_id", 0)) if header else 0
        present = {}
        for path in sorted(self.snapshot_dir.iterdir()):
            found = FILE_NAME.match(path.name)
            if found is None:
                self.report.warnings.append(f"{path}: not a file of this store: left alone")
                continue
            self._next_id = max(self._next_id, int(found.group(1)) + 1)
            present[path.name] = path
        verified: dict[str, StoredFile] = {}
        for name, path in present.items():
            entry = listed.get(name)
            why = self._unverified(path, entry)
            if why is not None:
                self.report.dropped(why)
                path.unlink()
                continue
            assert entry is not None
            stored = StoredFile(
                self,
                name,
                entry["layer"],
                entry["start"],
                entry["end"],
                entry["nbytes"],
                entry["sha256"],
                None,
            )
            verified[name] = stored
            self._files[name] = stored
        for name in listed:
            if name not in present:
                self.report.dropped("missing")
        return self._saved_nodes(header, verified) if header else []

    def _unverified(self, path: Path, entry: dict[str, Any] | None) -> str | None:
        """Why a file can't be adopted (None when it can)."""
        if path.name.endswith(".tmp"):
            return "half-written"
        if entry is None:
            return "orphaned"
        try:
            data = path.read_bytes()
        except OSError:
            return "unreadable"
        return None if self._intact(data, entry) else "corrupt"

    def _intact(self, data: bytes, entry: dict[str, Any]) -> bool:
        """Whether a file's bytes are those its manifest entry was written with."""
        return _digest(data) == entry.get("sha256")

    def _saved_nodes(
        self, header: dict[str, Any], verified: dict[str, StoredFile]
    ) -> list[SavedNode]:
        nodes = []
        for index, entry in enumerate(header.get("nodes", [])):
            names = entry.get("files")
            snapshots = None
            if names is not None:
                snapshots = [verified.get(n) if n is not None else None for n in names]
                if any(s is None and n is not None for s, n in zip(snapshots, names)):
                    for s in snapshots:  # a node's set is whole or not at all
                        if s is not None:
                            s.close()
                            self.report.dropped("incomplete")
                    snapshots = None
            nodes.append(
                SavedNode(
                    tokens=np.asarray(entry["tokens"], dtype=np.int32),
                    parent=int(entry["parent"]),
                    last_used=int(entry["last_used"]),
                    user=bool(entry.get("user", False)),
                    snapshots=snapshots,
                )
            )
            if snapshots is not None:
                self.report.adopted_nodes += 1
                self.report.adopted_files += sum(s is not None for s in snapshots)
            assert nodes[-1].parent < index, "a manifest lists parents before children"
        return nodes

    def opening(self) -> dict[str, Any] | None:
        return self.report.as_dict()

    def saved(self) -> list[SavedNode]:
        """The trie this store kept from its last run (once: the cache adopts it)."""
        saved, self._saved = self._saved, []
        return saved

    # ---- writing ---------------------------------------------------------------------------

    def fail_next_writes(self, count: int) -> None:
        """Make the next ``count`` writes fail, as a full disk would (fault injection)."""
        self.failing_writes += count

    def put(self, layer: int, snapshot: Snapshot) -> StoredSnapshot | None:
        tensors, meta = self.codec.encode(layer, snapshot)
        start, end, nbytes = snapshot.start, snapshot.end, snapshot.nbytes
        snapshot.close()
        if self.failing_writes:
            self.failing_writes -= 1
            return None
        data = _encode_file(
            tensors,
            {
                **meta,
                "layer": str(layer),
                "start": str(start),
                "end": str(end),
                "nbytes": str(nbytes),
            },
        )
        name = f"{self._next_id:012d}-{layer}.safetensors"
        self._next_id += 1
        stored = StoredFile(self, name, layer, start, end, nbytes, _digest(data), data)
        self._files[name] = stored
        if self._queue is None:
            if not self._write(stored):
                del self._files[name]
                return None
        else:
            self._queue.put(stored)
        return stored

    def _write(self, stored: StoredFile) -> bool:
        with self.lock:
            data = stored.pending
        if data is None or stored.closed:
            return True
        try:
            _write_atomically(stored.path, data)
        except OSError as exc:
            log.warning("disk tier: writing %s failed: %s", stored.path, exc)
            with self.lock:  # its bytes are let go: RAM is not a second disk tier
                stored.pending = None
                stored.failed = True
                self.write_errors += 1
            return False
        with self.lock:
            stored.pending = None
            stored.written = True
            self.written_bytes += len(data)
            closed = stored.closed
        if closed:  # dropped while it was being written
            stored.path.unlink(missing_ok=True)
        return True

    def _write_loop(self) -> None:
        assert self._queue is not None
        while True:
            stored = self._queue.get()
            try:
                if stored is None:
                    return
                self._write(stored)  # a failed one is a miss when read
            except BaseException as exc:  # noqa: BLE001 - kept for flush() to raise
                self._failure = exc
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until every queued file is written."""
        if self._queue is not None:
            self._queue.join()
        if self._failure is not None:
            raise self._failure

    def forget(self, stored: StoredFile) -> None:
        """A stored snapshot was dropped: delete its file (or, queued, never write it)."""
        self._files.pop(stored.name, None)
        with self.lock:
            pending = stored.pending is not None
            stored.pending = None
        if not pending:
            stored.path.unlink(missing_ok=True)

    # ---- the manifest ----------------------------------------------------------------------

    def save(self, cache: PrefixCache) -> None:
        """Write the manifest: the cache's nodes in this store and their ancestors, with the
        files already written (a file still queued is left out: after a crash it is an
        orphan, deleted on open)."""
        files: dict[str, dict[str, Any]] = {}
        nodes = []
        for saved in saved_trie(cache, self._listable):
            names = None
            if saved.snapshots is not None:
                names = []
                for snap in saved.snapshots:
                    assert snap is None or isinstance(snap, StoredFile)
                    names.append(None if snap is None else snap.name)
                    if snap is not None:
                        files[snap.name] = {
                            "layer": snap.layer,
                            "start": snap.start,
                            "end": snap.end,
                            "nbytes": snap.nbytes,
                            "sha256": snap.sha256,
                        }
            nodes.append(
                {
                    "parent": saved.parent,
                    "tokens": saved.tokens.tolist(),
                    "last_used": saved.last_used,
                    "user": saved.user,
                    "files": names,
                }
            )
        body = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "fingerprint": self.codec.fingerprint,
            "next_id": self._next_id,
            "files": files,
            "nodes": nodes,
        }
        text = json.dumps(body, sort_keys=True)
        manifest = {"sha256": _digest(text.encode()), "body": body}
        _write_atomically(self.path / MANIFEST, json.dumps(manifest).encode())

    def after_request(self, cache: PrefixCache) -> None:
        if self.clock() - self._saved_at >= self.save_every:
            self.save(cache)
            self._saved_at = self.clock()

    def _listable(self, snapshot: StoredSnapshot) -> bool:
        """Whether the manifest may list ``snapshot``: its file is written (listing one still
        queued would promise a file a crash may never leave)."""
        return isinstance(snapshot, StoredFile) and snapshot.written

    def close(self, cache: PrefixCache | None = None) -> None:
        """Finish the writes, write the manifest (of ``cache``'s trie when given) and release
        the directory."""
        if self._queue is not None and self._writer is not None:
            self._queue.put(None)
            self._writer.join()
            self._queue = None
        if cache is not None:
            self.save(cache)
        self._lock_handle.close()
