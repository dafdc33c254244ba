"""``torchrun`` for ``msff predict``: one process per GPU (or per CPU share), scenes dealt to ranks.

``torchrun --nproc_per_node=N [--nnodes=M ...] -m msff.cli predict CKPT 'scenes/*.tif' --out OUT/``

torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`init` joins the process group
(NCCL on GPUs, gloo on CPUs), pins rank ``r`` to ``cuda:LOCAL_RANK`` when the device is CUDA, and
hands back what :func:`msff.inference.batch.run_scenes` needs: scene ``i`` is predicted by rank
``i mod WORLD_SIZE`` (each output written atomically by that rank alone), the records are gathered
with ``all_gather_object`` and rank 0 writes the summary. Every rank returns the same exit status.
The output folder must be one filesystem seen by all ranks (for several nodes: a shared one).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = ["DistContext", "init", "world_from_env"]


@dataclass
class DistContext:
    """``rank``/``world`` of this process; ``device`` (None: the caller resolves it); ``gather``
    (None in a single process) collects a list from every rank on every rank."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: Optional[torch.device] = None
    gather: Optional[Callable[[list], list]] = None


def world_from_env() -> tuple[int, int, int]:
    """``(WORLD_SIZE, RANK, LOCAL_RANK)`` as torchrun sets them (1, 0, 0 otherwise)."""
    try:
        return (int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)),
                int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise ValueError("WORLD_SIZE / RANK / LOCAL_RANK must be integers (as torchrun sets them)") from None


def init(device_arg: Optional[str] = "auto") -> DistContext:
    """Join torchrun's process group if there is one; otherwise a single-process context.

    Args:
        device_arg: the ``--device`` option: ``auto``/``cuda`` put rank r on ``cuda:LOCAL_RANK``
            where CUDA is available; ``cpu`` keeps every rank on the CPU (gloo).
    """
    world, rank, local = world_from_env()
    if world <= 1:
        return DistContext()
    import torch.distributed as dist

    want_cuda = str(device_arg or "auto") in ("auto", "cuda") and torch.cuda.is_available()
    device = torch.device("cuda", local) if want_cuda else None
    if device is not None:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    group = dist.new_group(backend="gloo")  # python objects travel over gloo whatever the device

    def gather(items: list) -> list:
        parts: list = [None] * world
        dist.all_gather_object(parts, items, group=group)
        return [x for p in parts for x in (p or [])]

    return DistContext(rank=rank, world=world, local_rank=local, device=device, gather=gather)
