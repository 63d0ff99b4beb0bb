"""Which process evaluates which samples: the world of a launch and the shard of a sample.

Three ways to split one run over processes, one rule:

* ``torchrun --nproc-per-node N`` or ``accelerate launch``: each process reads ``RANK``,
  ``WORLD_SIZE`` and ``LOCAL_RANK`` from the environment and takes device ``cuda:LOCAL_RANK``;
* a SLURM job array (``hydra/launcher=submitit_slurm``): ``runner.shard`` (the array index) and
  ``runner.num_shards`` (the array size) say it, one process per job;
* neither: one process, shard 0 of 1.

A sample's shard is a pure function of its id, the run's ids and the world size
(:func:`owned_ids`): the run's ids are ranked by a stable hash of the id and dealt round-robin.
So the shards are exactly balanced (sizes differ by at most one), every sample is in exactly one
shard (no padding, no duplicates), the assignment does not depend on the order the data comes
in, and every process computes it without talking to the others; the rank never enters the run
key. Nothing collective ever runs: each process appends to its own per-sample file
(:func:`samples_file`) and records its end in a shard marker; the run's record is built from all
shard files by whichever process sees the set complete, or by ``recomp-eval-merge``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# set by torchrun / accelerate and read by transformers (tensor-parallel switch on WORLD_SIZE)
DISTRIBUTED_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                    "MASTER_PORT", "GROUP_RANK", "ROLE_RANK")  # fmt: skip


@dataclass(frozen=True)
class World:
    """This process's shard of every run: ``rank`` of ``size``; ``local_rank`` picks the GPU."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launcher: str = "single"  # single | torchrun | array

    @property
    def name(self) -> str:
        """``shard-<rank>-of-<size>``, the suffix of this shard's files."""
        return f"shard-{self.rank}-of-{self.size}"

    def owns(self, position: int) -> bool:
        return position % self.size == self.rank


def launched_world_size(environ: dict[str, str] | None = None) -> int:
    """``WORLD_SIZE`` set by torchrun / accelerate launch (1 when not launched)."""
    env = os.environ if environ is None else environ
    try:
        return int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def rank_suffix() -> str:
    """``-rank<R>`` for torchrun / accelerate ranks other than 0, else empty (Hydra folders)."""
    rank = os.environ.get("RANK", "0")
    return "" if rank in ("", "0") or launched_world_size() <= 1 else f"-rank{rank}"


def world_from(runner: Any, environ: dict[str, str] | None = None) -> World:
    """The world of this process: the launcher's environment, or ``runner.shard`` /
    ``runner.num_shards`` (a job array), or a single process. One-line errors for mixes."""
    env = os.environ if environ is None else environ
    shard, shards = runner.get("shard"), runner.get("num_shards")
    launched = all(v in env for v in LAUNCH_VARS) and int(env.get("WORLD_SIZE", "1")) > 1
    if launched:
        if shard is not None or shards is not None:
            raise ValueError(
                "runner.shard/num_shards set under torchrun or accelerate (RANK/WORLD_SIZE in "
                "the environment); use one way of splitting a run: drop runner.shard/num_shards"
            )
        rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
        return World(rank, size, int(env["LOCAL_RANK"]), "torchrun")
    if shard is None and shards is None:
        return World()
    if shard is None or shards is None:
        raise ValueError("runner.shard and runner.num_shards go together (e.g. shard=0 of 4)")
    if not (isinstance(shards, int) and shards >= 1 and isinstance(shard, int)
            and 0 <= shard < shards):  # fmt: skip
        raise ValueError(
            f"runner.shard={shard} of runner.num_shards={shards}: need 0 <= shard < num_shards"
        )
    return World(shard, shards, 0, "array" if shards > 1 else "single")


def samples_file(world: World) -> str:
    """The per-sample file a process appends to (a single process keeps ``samples.jsonl``)."""
    return "samples.jsonl" if world.size == 1 else f"samples.{world.name}.jsonl"


def marker_file(world: World) -> str:
    """The file a process writes when its shard of a run is complete."""
    return f"{world.name}.json"


def device_for(device: str, world: World) -> str:
    """``cuda:LOCAL_RANK`` for a CUDA model under torchrun/accelerate, else ``device``."""
    if world.launcher == "torchrun" and str(device).startswith("cuda"):
        return f"cuda:{world.local_rank}"
    return str(device)


def shard_rank(sample_id: str) -> str:
    """The stable sort key of a sample id (sha1 hex: independent of Python's hash seed)."""
    return hashlib.sha1(str(sample_id).encode()).hexdigest()


def shard_of(sample_ids: Iterable[str], size: int) -> dict[str, int]:
    """Sample id -> shard in ``0..size-1``: ids ranked by :func:`shard_rank` (ties by id), the
    ``i``-th gets shard ``i % size``. Shard sizes differ by at most one."""
    ranked = sorted(set(sample_ids), key=lambda i: (shard_rank(i), i))
    return {sample_id: n % size for n, sample_id in enumerate(ranked)}


def owned_ids(sample_ids: Iterable[str], world: World) -> set[str]:
    """The ids of the run that ``world``'s process evaluates."""
    if world.size == 1:
        return set(sample_ids)
    return {i for i, shard in shard_of(sample_ids, world.size).items() if shard == world.rank}
