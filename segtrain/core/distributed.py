"""Process-group set-up from the environment that torchrun or SLURM provides.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT. Under SLURM without torchrun
(one task per GPU, ``srun``), SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID are used; when
MASTER_ADDR is not set, the master is the first host of SLURM_JOB_NODELIST, expanded as
``scontrol show hostnames`` does (``gpu[01-04]`` -> gpu01), and when MASTER_PORT is not set
the port is ``10000 + SLURM_JOB_ID % 20000`` (10000..29999: below Linux's ephemeral range
32768..60999, and two jobs sharing a node get different ports unless their ids are 20000
apart).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # the ranks on this node (they share its cores)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def slurm_tasks_on_node(env: os._Environ | dict) -> int:
    """This node's task count: SLURM_TASKS_PER_NODE (``4(x2),3``: 4, 4, 3) at SLURM_NODEID."""
    counts = []
    for item in env.get("SLURM_TASKS_PER_NODE", "").split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if m:
            counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(env.get("SLURM_NODEID", 0))
    return counts[node] if node < len(counts) else 1


def cores_per_rank() -> int:
    """This rank's share of the cores this process may run on (the affinity mask where there
    is one, which torch's DataLoader also reads): the cores divided among the ranks of this
    node (torchrun's LOCAL_WORLD_SIZE, SLURM's tasks on this node), at least one, so 8 ranks
    on a node start cores/8 processes each, not cores each."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        os.cpu_count() or 1
    return max(1, cores // env_info().local_world_size)


def env_info() -> DistInfo:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                        int(env.get("LOCAL_WORLD_SIZE", 1)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                        int(env.get("SLURM_LOCALID", 0)), slurm_tasks_on_node(env))
    return DistInfo()


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets: ``a[1,2],b`` -> ``a[1,2]``, ``b``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_range(spec: str, nodelist: str) -> list[str]:
    """``1,3-5`` -> 1, 3, 4, 5; ``01-03`` keeps the zero padding: 01, 02, 03."""
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r}: cannot read the range [{spec}]")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        width = len(lo) if lo.startswith("0") else 0
        out += [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    return out


def expand_nodelist(nodelist: str) -> list[str]:
    """The host names of a SLURM node list, in order, as ``scontrol show hostnames`` prints.

    ``node[01-04]`` -> node01..node04, ``a1,b2`` -> a1, b2, ``gpu[1,3-5]`` -> gpu1, gpu3,
    gpu4, gpu5, ``rack[1-2]-gpu[01-02]`` -> rack1-gpu01, rack1-gpu02, rack2-gpu01, ...
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        names = [""]
        for text, spec in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", item):
            if not text and not spec:
                continue
            options = _expand_range(spec, nodelist) if spec else [""]
            names = [n + text + o for n in names for o in options]
        hosts += names
    return hosts


def master_addr(env: os._Environ | dict) -> str:
    """The first host of SLURM_JOB_NODELIST (SLURM_NODELIST), else the local host."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    return expand_nodelist(nodelist)[0] if nodelist else "127.0.0.1"


def master_port(env: os._Environ | dict) -> int:
    """``10000 + SLURM_JOB_ID % 20000`` under SLURM (see the module docstring), else 29500."""
    job_id = re.match(r"\d+", env.get("SLURM_JOB_ID", ""))
    return 10000 + int(job_id.group()) % 20000 if job_id else 29500


def init(backend: str | None = None) -> DistInfo:
    """Initialise the default process group when the environment asks for several ranks."""
    info = env_info()
    if not info.enabled or dist.is_initialized():
        return info
    os.environ.setdefault("MASTER_ADDR", master_addr(os.environ))
    os.environ.setdefault("MASTER_PORT", str(master_port(os.environ)))
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"),
                            rank=info.rank, world_size=info.world_size)
    return info


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def all_reduce_min(value: torch.Tensor) -> torch.Tensor:
    """The element-wise minimum over the ranks (``value`` itself in one process)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return value


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, indexed by rank (``[obj]`` in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def shared_start_time() -> datetime:
    """Rank 0's clock, on every rank: the start time that names the run folder (each rank's
    own ``datetime.now()`` can fall in another second). Initialises the process group."""
    info = init()
    now = [datetime.now()]
    if info.enabled:
        dist.broadcast_object_list(now, src=0)
    return now[0]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
