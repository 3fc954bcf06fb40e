"""The process group and the few collectives the run needs: the rank's environment, the accelerator choice (CUDA, or
DeepSpeed's CPU accelerator over gloo), ``deepspeed.init_distributed``, the GPU and host threads of a rank,
DeepSpeed's CPU shared-memory segments, and barrier / all-reduce / gather / broadcast of small values."""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def env_rank() -> int:
    """Global rank from the launcher's environment (0 for a plain ``python`` run)."""
    return int(os.environ.get("RANK", "0"))


def set_single_process_defaults() -> None:
    """Let ``python launch/train.py`` run as a world of one: DeepSpeed would otherwise try MPI discovery."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    with socket.socket() as s:  # a free port for the (single-member) process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: Any  # torch.device
    on_gpu: bool


def select_accelerator() -> bool:
    """Choose CUDA when present, else DeepSpeed's CPU accelerator (gloo). Call before anything imports
    DeepSpeed (transformers does, lazily), so DeepSpeed never has to guess. Returns True on GPU."""
    import torch

    on_gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return on_gpu


def init() -> DistInfo:
    """Pick the accelerator, start the process group and return this rank's coordinates."""
    import torch

    on_gpu = select_accelerator()
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    import torch.distributed as dist

    if not on_gpu:
        release_shm_segment(dist.get_rank(), dist.get_world_size())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # Host threads are shared among the node's ranks on GPU too: DeepSpeedCPUAdam (optimizer offload) and the
    # data collation run on them, and every rank taking every core oversubscribes the node.
    torch.set_num_threads(cpu_threads_per_rank())
    if on_gpu:
        device = torch.device("cuda", gpu_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device, on_gpu)


SHM_SEGMENT_PREFIX = "deepspeed_allreduce_buffer"  # csrc/cpu/comm/shm.cpp's SHM_BUFFER_NAME


def shm_segment(rank: int) -> Path:
    """The POSIX shared-memory segment DeepSpeed's CPU backend makes for ``rank`` of a one-node job (its shm
    all-reduce workspace, 66 MiB): named by user, ``MASTER_ADDR``, ``MASTER_PORT`` and rank, as
    ``csrc/cpu/comm/shm.cpp`` (deepspeed 0.19) does."""
    return Path("/dev/shm") / (f"{SHM_SEGMENT_PREFIX}_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def remove_shm_segments(port: int | str) -> list[Path]:
    """Remove the shm segments that a finished one-node DeepSpeed CPU job on ``port`` left (every rank's, as
    programs other than launch/train.py leave them: the benches' peers); returns those it removed. Only for a
    job that is over: a running job's ranks may still be mapping them."""
    left = sorted(Path("/dev/shm").glob(f"{SHM_SEGMENT_PREFIX}_{os.getuid()}_*_{port}_*"))
    for f in left:
        f.unlink(missing_ok=True)
    return left


def release_shm_segment(rank: int, world_size: int) -> None:
    """Unlink this rank's shm segment once every rank has mapped every other's, so the kernel frees it when the
    job's processes end, however they end. DeepSpeed creates one per rank at ``init_distributed`` and never
    unlinks it: each run left 66 MiB per rank in /dev/shm (RAM) for good, and a machine that runs many jobs
    (our test suite; sglang's CI, sgl-project/sglang#38638) runs out of memory. A mapped segment stays valid
    after its name is gone."""
    # DeepSpeed's own test for making the segments (all ranks on this node), the same on every rank: all of them
    # enter the barrier or none does.
    if os.environ.get("LOCAL_SIZE") != str(world_size):
        return
    import torch.distributed as dist

    dist.barrier()  # every rank is past DeepSpeed's shm_initialize, which maps all ranks' segments
    with contextlib.suppress(FileNotFoundError):
        shm_segment(rank).unlink()


def gpu_index(local_rank: int, visible: int) -> int:
    """This rank's GPU among those it sees. The deepspeed launcher shows every rank all the node's GPUs (rank
    ``LOCAL_RANK`` takes GPU ``LOCAL_RANK``); a scheduler that binds one GPU per task (SLURM ``--gpus-per-task=1``)
    shows each rank one, its ``cuda:0``."""
    from pipeline.errors import UserError

    if visible == 1:
        return 0
    if local_rank >= visible:
        listed = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        raise UserError(f"local rank {local_rank} sees {visible} GPU(s) (CUDA_VISIBLE_DEVICES={listed}): start at "
                        f"most {visible} ranks per node, or give each rank one GPU")
    return local_rank


def cpu_threads_per_rank() -> int:
    """torch threads for one CPU rank: ``OMP_NUM_THREADS`` if set, else this machine's cores shared among its
    ranks (the launcher's ``LOCAL_SIZE``). torch's default gives every rank every core; two ranks on two cores then
    oversubscribe them, and steps took 2.8x as long under ZeRO-2 and swung 4x under ZeRO-3 (bench/README.md)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or "1"
    return max(1, cores // max(1, int(local)))


def barrier(group=None) -> None:
    """Every rank (of ``group``, a :func:`subgroup`; default all) reaches this point."""
    import torch.distributed as dist

    dist.barrier(group=group)


_SUBGROUPS: dict[int, Any] = {}


def subgroup(size: int):
    """The process group of ranks ``0 .. size - 1`` (``None``: all of them). Collective the first time a size is
    asked for: every rank must ask for the same sizes in the same order (``torch.distributed.new_group``)."""
    import torch.distributed as dist

    if size >= dist.get_world_size():
        return None
    if size not in _SUBGROUPS:
        _SUBGROUPS[size] = dist.new_group(list(range(size)))
    return _SUBGROUPS[size]


def all_reduce_sum(t):
    """Sum a tensor over all ranks, in place, and return it. Gloo on CPU, NCCL on GPU."""
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def exchange(values, group=None):
    """Every rank's 1-D tensor ``values``, stacked in rank order (``[world, len]``), with one all-gather: sums and
    maxima of several small values then cost one collective. ``group``: among a :func:`subgroup`'s ranks only."""
    import torch
    import torch.distributed as dist

    out = [torch.empty_like(values) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, values, group=group)
    return torch.stack(out)


def on_rank0(fn, rank: int):
    """``fn()`` on rank 0 only, its result given to every rank. An exception there is raised on every rank
    (a :class:`UserError` as itself, anything else as a :class:`RunError`), so no rank waits for one that died."""
    from pipeline.errors import RunError, UserError

    result = error = None
    if rank == 0:
        try:
            result = fn()
        except UserError as e:
            error = e
        except Exception as e:  # noqa: BLE001
            error = RunError(f"{type(e).__name__}: {e}")
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


def max_over_ranks(value: int | list[int]) -> int | list[int]:
    """The largest of every rank's ``value``, elementwise for a list (one small all-reduce)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(value if isinstance(value, list) else [value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(x) for x in t.tolist()] if isinstance(value, list) else int(t.item())


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_objects_to(obj: Any, dst: int = 0, group=None) -> list[Any] | None:
    """Every rank's ``obj`` (of ``group``, a :func:`subgroup`), in rank order, on global rank ``dst``; ``None``
    elsewhere."""
    import torch.distributed as dist

    out: list[Any] | None = [None] * dist.get_world_size(group) if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)
    return out


def first_error(error: str | None) -> str | None:
    """Agree on failure: ``None`` on every rank if no rank failed, else the first failing rank's message on all.
    Call at points every rank reaches, so one rank's failure cannot leave the others waiting in a collective."""
    errors = gather_objects(error)
    return next((f"rank {r}: {e}" if len(errors) > 1 else e for r, e in enumerate(errors) if e), None)


def _collective_device():
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and \
        os.environ.get("DS_ACCELERATOR", "cuda") == "cuda" else torch.device("cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
