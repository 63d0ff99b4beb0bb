"""Checkpoint and data fingerprints: what changes the digest, what does not, and what is read."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recomp_eval import fingerprint as fpm
from recomp_eval.fingerprint import (
    Fingerprint,
    HashCache,
    checkpoint_fingerprint,
    data_fingerprint,
    default_hash_cache_path,
    fingerprint_folder,
    hub_cache_dir,
)

BIG = 5 * 2**20  # over SMALL_FILE_BYTES: identified by (size, mtime) in quick mode
T0 = 1_700_000_000_000_000_000  # explicit mtimes (ns): no dependence on clock granularity
COMMIT = "a" * 40
COMMIT2 = "b" * 40


def _random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _set_mtime(path: Path, ns: int) -> None:
    os.utime(path, ns=(ns, ns))


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A fake checkpoint: configs, tokenizer, a 5 MiB weight file, a ``clip/`` sub-folder, and
    things that must be ignored (a hidden cache folder, a lock file, a folder link back up)."""
    root = tmp_path / "ckpt"
    (root / "clip").mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"hidden_size": 64}))
    (root / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0}}}))
    (root / "model.safetensors").write_bytes(_random_bytes(BIG, 0))
    (root / "clip" / "config.json").write_text(json.dumps({"projection_dim": 16}))
    (root / "clip" / "model.safetensors").write_bytes(_random_bytes(1000, 1))
    (root / ".cache" / "huggingface").mkdir(parents=True)
    (root / ".cache" / "huggingface" / "download.json").write_text("{}")
    (root / "model.safetensors.lock").write_text("")
    (root / "clip" / "up").symlink_to("..", target_is_directory=True)
    _set_mtime(root / "model.safetensors", T0)
    return root


def test_quick_fingerprint_is_stable_and_complete(ckpt: Path) -> None:
    a, b = fingerprint_folder(ckpt), fingerprint_folder(ckpt)
    assert a == b and a.digest == b.digest and len(a.digest) == 16
    assert a.changes(b) == []
    assert list(a.files) == [
        "clip/config.json",
        "clip/model.safetensors",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert a.files["model.safetensors"] == {"size": BIG, "mtime_ns": T0}
    config_sha = hashlib.sha256((ckpt / "config.json").read_bytes()).hexdigest()
    assert a.files["config.json"]["sha256"] == config_sha
    assert a.mode == "quick" and a.root == str(ckpt)


def test_small_files_hash_the_same_in_both_modes(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "model.safetensors").unlink()
    cache = HashCache(tmp_path / "sha.json")
    quick, full = fingerprint_folder(ckpt), fingerprint_folder(ckpt, "full", cache)
    assert quick.digest == full.digest and quick.changes(full) == []


def test_changes_across_modes_say_so(ckpt: Path, tmp_path: Path) -> None:
    quick, full = fingerprint_folder(ckpt), fingerprint_folder(ckpt, "full", HashCache.in_memory())
    assert quick.digest != full.digest
    assert quick.changes(full) == [
        "mode: quick -> full",
        "model.safetensors: not comparable (size+mtime -> sha256; size 5.2 MB)",
    ]


def test_rewrite_with_same_size_changes_quick_digest(ckpt: Path) -> None:
    before = fingerprint_folder(ckpt)
    (ckpt / "model.safetensors").write_bytes(_random_bytes(BIG, 2))  # retrained, same size
    _set_mtime(ckpt / "model.safetensors", T0 + 86_400 * 10**9)
    after = fingerprint_folder(ckpt)
    assert after.digest != before.digest
    (line,) = before.changes(after)
    assert line.startswith("model.safetensors: modified (size 5.2 MB, mtime ")
    assert "->" in line


def test_edited_config_changes_digest_even_with_old_mtime(ckpt: Path) -> None:
    before = fingerprint_folder(ckpt)
    stat = (ckpt / "config.json").stat()
    (ckpt / "config.json").write_text(json.dumps({"hidden_size": 65}))  # same size
    _set_mtime(ckpt / "config.json", stat.st_mtime_ns)
    after = fingerprint_folder(ckpt)
    assert after.digest != before.digest
    assert [line.split(" (")[0] for line in before.changes(after)] == [
        "config.json: contents changed"
    ]


def test_added_and_removed_files_change_digest_and_are_named(ckpt: Path) -> None:
    before = fingerprint_folder(ckpt)
    (ckpt / "chat_template.jinja").write_text("{{ messages }}")
    added = fingerprint_folder(ckpt)
    assert added.digest != before.digest
    assert before.changes(added) == ["chat_template.jinja: added"]
    (ckpt / "clip" / "model.safetensors").unlink()
    removed = fingerprint_folder(ckpt)
    assert removed.digest != added.digest
    assert added.changes(removed) == ["clip/model.safetensors: removed"]


def test_ignored_files_do_not_matter(ckpt: Path) -> None:
    before = fingerprint_folder(ckpt)
    (ckpt / ".cache" / "huggingface" / "download.json").write_text('{"x": 1}')
    (ckpt / ".git").mkdir()
    (ckpt / ".git" / "HEAD").write_text("ref")
    (ckpt / "model.safetensors.lock").write_text("pid 1")
    (ckpt / "weights.tmp").write_text("partial")
    assert fingerprint_folder(ckpt).digest == before.digest


def test_touch_changes_quick_but_not_full(ckpt: Path, tmp_path: Path) -> None:
    cache = HashCache(tmp_path / "sha.json")
    quick, full = fingerprint_folder(ckpt), fingerprint_folder(ckpt, "full", cache)
    _set_mtime(ckpt / "model.safetensors", T0 + 10**9)
    assert fingerprint_folder(ckpt).digest != quick.digest
    full_after = fingerprint_folder(ckpt, "full", cache)
    assert full_after.digest == full.digest and full.changes(full_after) == []


def test_copied_folder_keeps_full_digest(ckpt: Path, tmp_path: Path) -> None:
    cache = HashCache(tmp_path / "sha.json")
    copy = tmp_path / "elsewhere" / "ckpt"
    shutil.copytree(ckpt, copy, copy_function=shutil.copyfile, symlinks=True)  # new mtimes
    _set_mtime(copy / "model.safetensors", T0 + 5 * 10**9)
    full_a, full_b = (
        fingerprint_folder(ckpt, "full", cache),
        fingerprint_folder(copy, "full", cache),
    )
    assert full_a.digest == full_b.digest and full_a.root != full_b.root
    assert fingerprint_folder(ckpt).digest != fingerprint_folder(copy).digest  # quick: mtimes


def _count_hashing(monkeypatch: pytest.MonkeyPatch, root: Path) -> list[str]:
    """Replace the hashing function by one that records which files (relative to root) it read."""
    calls: list[str] = []
    real = fpm._sha256_file

    def counting(path):
        calls.append(Path(os.path.realpath(path)).relative_to(root.resolve()).as_posix())
        return real(path)

    monkeypatch.setattr(fpm, "_sha256_file", counting)
    return calls


def test_full_mode_cache_hit_and_invalidation(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_hashing(monkeypatch, ckpt)
    path = tmp_path / "cache" / "sha256.json"
    first = fingerprint_folder(ckpt, "full", HashCache(path))
    assert len(calls) == 5 and path.is_file()
    entries = json.loads(path.read_text())["entries"]
    big = entries[os.path.realpath(ckpt / "model.safetensors")]
    assert {"size", "mtime_ns", "inode", "sha256"} <= big.keys()

    calls.clear()
    cache = HashCache(path)  # a fresh process would start like this
    second = fingerprint_folder(ckpt, "full", cache)
    assert calls == [] and cache.hits == 5 and cache.misses == 0
    assert second.digest == first.digest

    (ckpt / "model.safetensors").write_bytes(_random_bytes(BIG, 3))
    _set_mtime(ckpt / "model.safetensors", T0 + 10**9)
    third = fingerprint_folder(ckpt, "full", HashCache(path))
    assert calls == ["model.safetensors"]
    assert third.digest != first.digest
    assert [line.split(" (")[0] for line in first.changes(third)] == [
        "model.safetensors: contents changed"
    ]


def test_quick_mode_never_hashes_big_files(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_hashing(monkeypatch, ckpt)
    fingerprint_folder(ckpt)
    assert sorted(calls) == [
        "clip/config.json",
        "clip/model.safetensors",
        "config.json",
        "tokenizer.json",
    ]


def test_default_cache_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECOMP_EVAL_CACHE", str(tmp_path / "rc"))
    assert default_hash_cache_path() == tmp_path / "rc" / "sha256.json"
    assert HashCache().path == tmp_path / "rc" / "sha256.json"
    monkeypatch.delenv("RECOMP_EVAL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_hash_cache_path() == tmp_path / "home" / ".cache" / "recomp_eval" / "sha256.json"
    assert HashCache.in_memory().path is None


def test_corrupt_cache_file_is_replaced(ckpt: Path, tmp_path: Path) -> None:
    path = tmp_path / "sha256.json"
    path.write_text('{"entries": {')
    fp = fingerprint_folder(ckpt, "full", HashCache(path))
    assert len(json.loads(path.read_text())["entries"]) == len(fp.files)


_WRITER = """
import sys
from recomp_eval.fingerprint import HashCache
cache_path, files = sys.argv[1], sys.argv[2:]
for f in files:
    cache = HashCache(cache_path)
    cache.sha256(f)
    cache.save()
"""


def test_cache_stays_valid_with_concurrent_writers(tmp_path: Path) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    files = []
    for i in range(60):
        (folder / f"f{i}.bin").write_bytes(_random_bytes(64, i))
        files.append(str(folder / f"f{i}.bin"))
    path = tmp_path / "cache" / "sha256.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), *files[k:40:2]], env=env)
        for k in (0, 1)
    ]

    def write(chunk: list[str]) -> None:
        for f in chunk:
            cache = HashCache(path)
            cache.sha256(f)
            cache.save()

    threads = [threading.Thread(target=write, args=(files[40 + k :: 4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    entries = json.loads(path.read_text())["entries"]  # valid JSON, nothing lost
    assert set(entries) == {os.path.realpath(f) for f in files}
    f0 = files[0]
    assert (
        entries[os.path.realpath(f0)]["sha256"] == hashlib.sha256(Path(f0).read_bytes()).hexdigest()
    )


def test_round_trip_and_tamper_check(ckpt: Path) -> None:
    fp = fingerprint_folder(ckpt)
    again = Fingerprint.from_dict(json.loads(json.dumps(fp.to_dict())))
    assert again == fp
    bad = fp.to_dict()
    bad["files"]["config.json"]["sha256"] = "0" * 64
    with pytest.raises(ValueError, match="does not match"):
        Fingerprint.from_dict(bad)
    with pytest.raises(ValueError, match="mode"):
        fingerprint_folder(ckpt, mode="fast")


# --------------------------------------------------------------------------- hub cache


def _blob(repo: Path, name: str, data: bytes) -> str:
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "blobs" / name).write_bytes(data)
    return name


def _snapshot(repo: Path, commit: str, files: dict[str, str]) -> Path:
    """``snapshots/<commit>/<file> -> ../../blobs/<name>`` as huggingface_hub lays it out."""
    snap = repo / "snapshots" / commit
    for rel, blob in files.items():
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        up = "../" * (rel.count("/") + 2)
        link.symlink_to(f"{up}blobs/{blob}")
    return snap


def _hub_repo(cache: Path, repo_id: str = "org/name") -> Path:
    """A cached model whose blob names are NOT the hash of their (random) contents: a digest
    built from names proves the blobs were not read."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    config = _blob(repo, "1" * 40, b'{"a": 1}')  # git sha1 name, as for small files
    weights = _blob(repo, "2" * 64, _random_bytes(2000, 4))  # sha256 name, as for LFS files
    clip = _blob(repo, "3" * 40, b'{"b": 2}')
    _snapshot(
        repo, COMMIT, {"config.json": config, "model.safetensors": weights, "clip/c.json": clip}
    )
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return repo


@pytest.fixture
def no_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(path):
        raise AssertionError(f"read {path}")

    monkeypatch.setattr(fpm, "_sha256_file", refuse)


def test_hub_snapshot_uses_blob_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_hashing: None
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    _hub_repo(tmp_path / "hub")
    fp = checkpoint_fingerprint("org/name")
    assert fp is not None and fp.commit == COMMIT
    assert fp.files == {
        "clip/c.json": {"blob": "3" * 40, "size": 8},
        "config.json": {"blob": "1" * 40, "size": 8},
        "model.safetensors": {"blob": "2" * 64, "size": 2000},
    }
    full = checkpoint_fingerprint("org/name", mode="full", cache=HashCache(tmp_path / "c.json"))
    pinned = checkpoint_fingerprint("org/name", revision=COMMIT)
    assert full is not None and pinned is not None
    assert full.digest == fp.digest == pinned.digest
    assert checkpoint_fingerprint("org/uncached") is None
    assert checkpoint_fingerprint("org/name", revision="c" * 40) is None
    assert checkpoint_fingerprint(str(tmp_path / "no" / "such" / "folder")) is None


def test_hub_new_commit_changes_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_hashing: None
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = _hub_repo(tmp_path / "hub")
    before = checkpoint_fingerprint("org/name")
    weights = _blob(repo, "4" * 64, _random_bytes(2000, 5))  # retrained, same size
    _snapshot(
        repo,
        COMMIT2,
        {"config.json": "1" * 40, "model.safetensors": weights, "clip/c.json": "3" * 40},
    )
    (repo / "refs" / "main").write_text(COMMIT2)
    after = checkpoint_fingerprint("org/name")
    assert before is not None and after is not None and after.commit == COMMIT2
    assert after.digest != before.digest
    assert before.changes(after) == [
        "model.safetensors: contents changed (blob 22222222 -> 44444444)"
    ]


def test_hub_cache_from_hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache_dir() == tmp_path / "hf" / "hub"
    _hub_repo(tmp_path / "hf" / "hub")
    fp = checkpoint_fingerprint("org/name")
    assert fp is not None and fp.commit == COMMIT


def test_partial_hub_snapshot_is_still_fingerprinted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_hashing: None
) -> None:
    """``from_pretrained`` fetches a subset; huggingface_hub's tree listing then calls the snapshot
    incomplete (IncompleteSnapshotError), but it is exactly what the loader reads."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = _hub_repo(tmp_path / "hub")
    listing = {
        "config.json": 8,
        "model.safetensors": 2000,
        "clip/c.json": 8,
        "pytorch_model.bin": 9,
    }
    (repo / "trees").mkdir()
    (repo / "trees" / f"{COMMIT}.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "files": {p: {"size": n, "blob_id": "9" * 40} for p, n in listing.items()},
            }
        )
    )
    fp = checkpoint_fingerprint("org/name")
    assert fp is not None and fp.commit == COMMIT and "pytorch_model.bin" not in fp.files
    assert len(fp.files) == 3


# --------------------------------------------------------------------------- data folders


def _write_split(path: Path, answers: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"question_id": [f"q{i}" for i in range(len(answers))], "answer": answers})
    pq.write_table(table, path)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({"dataset_id": "x/y", "revision": "r1"}))
    _write_split(root / "default" / "val" / "val-00000-of-00001.parquet", ["yes", "no", "cat"])
    pq.write_table(pa.table({"sample_id": ["q0"], "size": ["small"]}), root / "tags.parquet")
    (root / "README.md").write_text("notes")
    return root


def test_data_fingerprint_covers_manifest_and_parquet(data_dir: Path) -> None:
    fp = data_fingerprint(data_dir)
    assert list(fp.files) == [
        "default/val/val-00000-of-00001.parquet",
        "manifest.json",
        "tags.parquet",
    ]
    (data_dir / "README.md").write_text("other notes")
    assert data_fingerprint(data_dir).digest == fp.digest


def test_changed_gold_answers_change_data_digest(data_dir: Path) -> None:
    shard = data_dir / "default" / "val" / "val-00000-of-00001.parquet"
    before = data_fingerprint(data_dir)
    mtime = shard.stat().st_mtime_ns
    _write_split(shard, ["yes", "no", "dog"])  # same manifest, same size, same mtime
    _set_mtime(shard, mtime)
    after = data_fingerprint(data_dir)
    assert after.digest != before.digest
    assert [line.split(" (")[0] for line in before.changes(after)] == [
        "default/val/val-00000-of-00001.parquet: contents changed"
    ]
    (data_dir / "manifest.json").write_text(json.dumps({"dataset_id": "x/y", "revision": "r2"}))
    assert data_fingerprint(data_dir).digest != after.digest


# --------------------------------------------------------------------------- the real tiny checkpoint


def test_tiny_checkpoint_quick_fingerprint() -> None:
    from recomp_eval.models.llava.tiny import build_tiny

    folder = build_tiny()
    start = time.perf_counter()
    a = checkpoint_fingerprint(str(folder))
    elapsed = time.perf_counter() - start
    b = fingerprint_folder(folder)
    assert a is not None and a.digest == b.digest and a.commit is None
    assert {
        "config.json",
        "model.safetensors",
        "clip/config.json",
        "tiny_spec.json",
    } <= a.files.keys()
    print(f"tiny checkpoint: {len(a.files)} files fingerprinted in {elapsed * 1000:.1f} ms")
