"""Fingerprints of checkpoint and data folders, so a resumed run notices new weights or new data.

A :class:`Fingerprint` maps every relevant file (posix path relative to the folder, sorted) to an
identity; its ``digest`` is :func:`~recomp_eval.records.stable_hash` of that map. Two modes:

``quick`` (default; reads no weights)
    files under :data:`SMALL_FILE_BYTES` (configs, ``*.index.json``, tokenizer files, chat
    templates, ``manifest.json``) are content-hashed (``sha256``); larger files contribute
    ``(size, mtime_ns)``. A checkpoint rewritten in place with the same sizes changes the digest
    through its mtimes; an edited config through its hash. A copied or moved folder keeps its
    digest only where the copy preserved mtimes (or every file is small).
``full`` (on request)
    ``sha256`` of every file, read in chunks and remembered in a :class:`HashCache`, so a second
    fingerprint of an unchanged 14 GB checkpoint reads nothing. The digest depends only on relative
    paths and contents: a copied folder with new mtimes has the same digest.

Small files get the same identity in both modes, so the digest of a folder without large files
does not depend on the mode. Files that are Hugging Face cache symlinks (``../../blobs/<hash>``)
are identified by the blob name (sha256 for LFS files, git sha1 for small ones) in both modes:
free, and exact unless someone wrote through the symlink into the blob. ``root`` and ``commit``
are informational, not part of the digest.

Ignored: any path component starting with ``.`` (``.cache``, ``.git``, ``.locks``), lock and
temporary files (:data:`DEFAULT_IGNORE`). Sub-folders (the tiny checkpoint's ``clip/``) are
included recursively; folder symlinks are followed (loops are cut).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from recomp_eval.records import stable_hash, write_json_atomic

log = logging.getLogger(__name__)

MODES = ("quick", "full")
FORMAT_VERSION = 1  # bump when an identity changes meaning: every stored digest then differs
SMALL_FILE_BYTES = 4 * 2**20  # quick mode content-hashes files smaller than this
CHUNK_BYTES = 8 * 2**20
DEFAULT_IGNORE = (".*", "*.lock", "*.tmp", "*.temp", "*.incomplete", "*.part", "*.swp", "*~")
DATA_FILES = ("manifest.json", "*.parquet")  # what data_fingerprint covers (tags.parquet too)
_BLOB_NAME = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_KIND_KEYS = ("blob", "sha256", "mtime_ns", "missing")
_KIND_LABELS = {"mtime_ns": "size+mtime"}


@dataclass(frozen=True)
class Fingerprint:
    """Identity of a folder's files; compare ``digest`` values, read :meth:`changes` for why."""

    mode: str
    files: dict[str, dict[str, Any]]
    digest: str
    root: str
    commit: str | None = None  # hub snapshot commit, when the folder is one

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "mode": self.mode,
            "digest": self.digest,
            "root": self.root,
            "commit": self.commit,
            "files": {path: dict(ident) for path, ident in self.files.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fingerprint:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` if the digest does not match."""
        fp = _make(d["mode"], d["files"], d.get("root", ""), d.get("commit"))
        if d.get("version", FORMAT_VERSION) != FORMAT_VERSION or fp.digest != d["digest"]:
            raise ValueError(f"fingerprint of {fp.root} does not match its digest {d['digest']}")
        return fp

    def changes(self, other: Fingerprint) -> list[str]:
        """One short line per file that differs from ``self`` (old) to ``other`` (new).

        Empty exactly when the digests are equal.
        """
        if self.files == other.files:
            return []
        lines = [f"mode: {self.mode} -> {other.mode}"] if self.mode != other.mode else []
        for path in sorted(self.files.keys() | other.files.keys()):
            old, new = self.files.get(path), other.files.get(path)
            if old == new:
                continue
            if old is None:
                lines.append(f"{path}: added")
            elif new is None:
                lines.append(f"{path}: removed")
            else:
                lines.append(f"{path}: {_describe(old, new)}")
        return lines


def _kind(ident: dict[str, Any]) -> str:
    return next((k for k in _KIND_KEYS if k in ident), "?")


def _describe(old: dict[str, Any], new: dict[str, Any]) -> str:
    kind_old, kind_new = _kind(old), _kind(new)
    size_old, size_new = old.get("size"), new.get("size")
    size = _size(size_old) if size_old == size_new else f"{_size(size_old)} -> {_size(size_new)}"
    if kind_old != kind_new:
        labels = (_KIND_LABELS.get(k, k) for k in (kind_old, kind_new))
        return "not comparable ({} -> {}; size {})".format(*labels, size)
    if kind_old == "mtime_ns":
        return f"modified (size {size}, mtime {_time(old['mtime_ns'])} -> {_time(new['mtime_ns'])})"
    if kind_old in ("sha256", "blob"):
        detail = f"; size {size}" if size_old != size_new else ""
        return f"contents changed ({kind_old} {old[kind_old][:8]} -> {new[kind_new][:8]}{detail})"
    return "changed"


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    value, unit = float(n), 0
    while value >= 1000 and unit < 3:
        value, unit = value / 1000, unit + 1
    return f"{n} B" if unit == 0 else f"{value:.1f} {('kB', 'MB', 'GB')[unit - 1]}"


def _time(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")


def _make(mode: str, files: dict[str, dict[str, Any]], root: str, commit: str | None = None):
    if mode not in MODES:
        raise ValueError(f"fingerprint mode must be one of {MODES}, got {mode!r}")
    files = {path: dict(files[path]) for path in sorted(files)}
    # The mode needs no place in the payload: a stat identity (mtime_ns) never equals a content
    # identity, and small files hash identically in both modes.
    digest = stable_hash({"version": FORMAT_VERSION, "files": files})
    return Fingerprint(mode=mode, files=files, digest=digest, root=root, commit=commit)


# --------------------------------------------------------------------------- hashing and cache


def _sha256_file(path: str | Path) -> str:
    """sha256 of a file's contents, read in :data:`CHUNK_BYTES` chunks."""
    digest = hashlib.sha256()
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def default_hash_cache_path() -> Path:
    """``$RECOMP_EVAL_CACHE/sha256.json``, else ``~/.cache/recomp_eval/sha256.json``."""
    root = os.environ.get("RECOMP_EVAL_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "recomp_eval"
    return base / "sha256.json"


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Inter-process (and inter-thread) exclusive lock on ``lock_path`` where ``fcntl`` exists."""
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic replace still keeps the file valid
        yield
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _read_entries(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    return entries if isinstance(entries, dict) else {}


class HashCache:
    """sha256 of files, remembered on disk under ``realpath`` with ``(size, mtime_ns, inode,
    ctime_ns)`` as validity key: any rewrite, ``touch`` or replacement misses; a hit reads nothing.

    Writes go through a temporary file and ``os.replace`` under an ``flock`` on ``<path>.lock``,
    merging with what other processes wrote meanwhile, so concurrent writers neither corrupt the
    file nor drop each other's entries. ``hits`` / ``misses`` count lookups.
    """

    def __init__(self, path: str | Path | None = None, *, persist: bool = True) -> None:
        self.path: Path | None = None
        if persist:
            self.path = Path(path) if path is not None else default_hash_cache_path()
        self.hits = 0
        self.misses = 0
        self._entries: dict[str, dict[str, Any]] | None = None
        self._new: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    @classmethod
    def in_memory(cls) -> HashCache:
        """A cache that is never read from or written to disk."""
        return cls(persist=False)

    @staticmethod
    def _key(st: os.stat_result) -> dict[str, int]:
        return {
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "inode": st.st_ino,
            "ctime_ns": st.st_ctime_ns,
        }

    def sha256(self, path: str | Path) -> str:
        """Content hash of ``path``, from the cache when its stat key is unchanged."""
        real = os.path.realpath(path)
        key = self._key(os.stat(real))
        with self._lock:
            if self._entries is None:
                self._entries = {} if self.path is None else _read_entries(self.path)
            entry = self._entries.get(real)
        if (
            entry
            and isinstance(entry.get("sha256"), str)
            and all(entry.get(k) == v for k, v in key.items())
        ):
            self.hits += 1
            return entry["sha256"]
        self.misses += 1
        digest = _sha256_file(real)
        if self._key(os.stat(real)) == key:  # unchanged while reading: safe to remember
            with self._lock:
                self._entries[real] = self._new[real] = {**key, "sha256": digest}
        return digest

    def save(self) -> None:
        """Merge new entries into the cache file (no-op when there are none); never raises."""
        with self._lock:
            if self.path is None or not self._new:
                return
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with _exclusive(self.path.with_name(self.path.name + ".lock")):
                    entries = _read_entries(self.path)
                    entries.update(self._new)
                    write_json_atomic(self.path, {"version": 1, "entries": entries})
            except OSError as err:
                log.warning("could not write the hash cache %s: %s", self.path, err)
                return
            self._entries, self._new = entries, {}


# --------------------------------------------------------------------------- folders


def _ignored(name: str, ignore: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in ignore)


def _walk(root: Path, ignore: tuple[str, ...], include: tuple[str, ...] | None):
    """``(relative posix path, path)`` of every kept file under ``root``; folder links followed."""

    def visit(folder: Path, prefix: str, ancestors: frozenset[str]):
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if _ignored(entry.name, ignore):
                continue
            if entry.is_dir(follow_symlinks=True):
                real = os.path.realpath(entry.path)
                if real not in ancestors:  # a link back up would loop forever
                    yield from visit(Path(entry.path), f"{prefix}{entry.name}/", ancestors | {real})
            elif include is None or _ignored(entry.name, include):
                yield f"{prefix}{entry.name}", Path(entry.path)

    yield from visit(root, "", frozenset({os.path.realpath(root)}))


def _hub_blob(path: Path) -> str | None:
    """Blob name of a Hugging Face cache symlink (``…/blobs/<sha1 or sha256>``), read by readlink."""
    if not path.is_symlink():
        return None
    target = Path(os.readlink(path))
    if target.parent.name == "blobs" and _BLOB_NAME.fullmatch(target.name):
        return target.name
    return None


def _identity(path: Path, mode: str, cache: HashCache | None) -> dict[str, Any]:
    blob = _hub_blob(path)
    try:
        st = path.stat()
    except FileNotFoundError:  # dangling link, e.g. a half-downloaded hub snapshot
        return {"missing": True, **({"blob": blob} if blob else {})}
    if blob is not None:
        return {"blob": blob, "size": st.st_size}
    if mode == "full":
        return {"size": st.st_size, "sha256": (cache or HashCache.in_memory()).sha256(path)}
    if st.st_size < SMALL_FILE_BYTES:
        return {"size": st.st_size, "sha256": _sha256_file(path)}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fingerprint_folder(
    path: str | Path,
    mode: str = "quick",
    cache: HashCache | None = None,
    ignore: tuple[str, ...] = DEFAULT_IGNORE,
    include: tuple[str, ...] | None = None,
) -> Fingerprint:
    """Fingerprint every file under ``path`` (see the module docstring for the two modes).

    Args:
        path: the folder.
        mode: ``quick`` or ``full``.
        cache: full mode's hash cache; default :class:`HashCache` at its default path.
        ignore: name patterns (any path component) left out.
        include: if given, only files whose name matches one of these patterns are kept.
    """
    if mode not in MODES:
        raise ValueError(f"fingerprint mode must be one of {MODES}, got {mode!r}")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise NotADirectoryError(f"cannot fingerprint {root}: not a folder")
    if mode == "full" and cache is None:
        cache = HashCache()
    files = {rel: _identity(p, mode, cache) for rel, p in _walk(root, tuple(ignore), include)}
    if cache is not None:
        cache.save()
    return _make(mode, files, str(root))


def hub_cache_dir() -> Path:
    """The hub cache ``huggingface_hub`` 2.x uses, read from the environment at call time.

    Same precedence as ``huggingface_hub.constants`` (which reads it once, at import):
    ``HF_HUB_CACHE``, legacy ``HUGGINGFACE_HUB_CACHE``, ``$HF_HOME/hub``,
    ``$XDG_CACHE_HOME/huggingface/hub``, ``~/.cache/huggingface/hub``.
    """
    env = os.environ
    value = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not value:
        xdg = env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
        value = os.path.join(env.get("HF_HOME") or os.path.join(xdg, "huggingface"), "hub")
    return Path(os.path.expandvars(os.path.expanduser(value)))


def hub_snapshot(
    repo_id: str, revision: str | None = None, cache_dir: str | Path | None = None
) -> Path | None:
    """Local snapshot folder of a hub model at ``revision`` (offline), or None if not cached.

    A snapshot the hub knows to be partial (``from_pretrained`` fetches only what it needs) is
    still returned: it is what the loader will read.
    """
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=str(cache_dir or hub_cache_dir()),
            local_files_only=True,
        )
    except OSError as err:  # LocalEntryNotFoundError; IncompleteSnapshotError has snapshot_path
        folder = getattr(err, "snapshot_path", None)
    except ValueError:  # HFValidationError: not a repo id
        return None
    return Path(folder) if folder else None


def checkpoint_fingerprint(
    model_id: str,
    revision: str | None = None,
    mode: str = "quick",
    cache: HashCache | None = None,
    hub_cache: str | Path | None = None,
) -> Fingerprint | None:
    """Fingerprint of what ``load_llava(model_id)`` reads: a local folder or a cached hub snapshot.

    Resolves ``model_id`` like the loader (an existing path is a folder; otherwise a hub id). A hub
    snapshot is fingerprinted from its blob names and records its ``commit``; never touches the
    network. None when the folder does not exist or the hub id is not cached.
    """
    local = Path(model_id).expanduser()
    if local.exists():
        return fingerprint_folder(local, mode, cache)
    if model_id.startswith((".", "/", "~")):
        return None
    snapshot = hub_snapshot(model_id, revision, hub_cache)
    if snapshot is None or not snapshot.is_dir():
        return None
    return replace(fingerprint_folder(snapshot, mode, cache), commit=snapshot.name)


def data_fingerprint(
    data_dir: str | Path, mode: str = "quick", cache: HashCache | None = None
) -> Fingerprint:
    """Fingerprint of a local benchmark folder: ``manifest.json`` and every ``*.parquet``
    (``<config>/<split>/*.parquet``, SynthVQA's ``tags.parquet``)."""
    return fingerprint_folder(data_dir, mode, cache, include=DATA_FILES)
