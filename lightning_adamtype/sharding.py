"""Sharded parameters (FSDP2's ``fully_shard``, Lightning's ``ModelParallelStrategy``): DTensor shards.

Each rank measures its local shards; :func:`combine` then reduces one step's terms across the ranks of the sharded
mesh dimension with two small all-reduces on the device (no host read): min_eta is the minimum, every other term (counts
included) and the coordinate count n are sums. Every rank then holds the terms of the unsharded group.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from .adapter_kit import to_device

__all__ = ["combine", "combine_shares", "is_dtensor", "local_view", "shard_group"]


@functools.lru_cache(maxsize=1)
def _dtensor_class() -> type | None:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - very old torch
        return None
    return DTensor


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def local_view(t: Any) -> Any:
    """This rank's local tensor of a DTensor; anything else unchanged."""
    return t.to_local() if is_dtensor(t) else t


def shard_group(param: Any) -> tuple[bool, Any]:
    """(measurable, process group): the process group of the one sharded mesh dimension of a DTensor parameter
    (None when it is only replicated); measurable is False when it is sharded over more than one dimension."""
    sharded = [i for i, placement in enumerate(param.placements) if placement.is_shard()]
    if len(sharded) > 1:
        return False, None
    return True, (param.device_mesh.get_group(mesh_dim=sharded[0]) if sharded else None)


def combine(terms: Tensor | None, n: int, group: Any, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(terms, n) summed (min for min_eta) over the ranks of ``group`` (:data:`lightning_adamtype.row.TERM_KEYS`:
    every term but min_eta is a sum, counts included); ``terms`` None: this rank holds no coordinate of the group
    and adds neutral terms."""
    count = torch.tensor([float(n)], dtype=dtype).to(device)
    if terms is None:
        low = torch.full((1,), math.inf, dtype=dtype, device=device)
        sums = torch.cat([torch.zeros(8, dtype=dtype, device=device), count])
    else:
        low = terms[0:1].to(dtype).clone()
        sums = torch.cat([terms[1:].to(dtype), count])
    if group is not None:
        torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM, group=group)
        torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN, group=group)
    return torch.cat([low, sums[:-1]]), sums[-1]


def combine_shares(per_tensor: Tensor | None, positions: list[int], total: int, group: Any, device: torch.device,
                   dtype: torch.dtype) -> Tensor:
    """Each parameter's share of a sharded step, (b_i, c_i, activations_i, inactive_i) for i < ``total`` (the group's
    parameters that stepped, in order), summed over the ranks of ``group``: this rank's rows (``per_tensor``, for
    the parameters at ``positions``) in place, zeros elsewhere (``per_tensor`` None: this rank holds nothing or its
    backend gave no shares), then one all-reduce. Every share is a sum over coordinates, so the sum over shards
    is the parameter's share of the unsharded step."""
    rows = per_tensor.to(device=device, dtype=dtype) if per_tensor is not None and positions else None
    if rows is not None and len(positions) == total:  # this rank holds a piece of every parameter (the usual case)
        table = rows.clone()
    else:
        table = torch.zeros(total, 4, dtype=dtype, device=device)
        if rows is not None:  # (the index is copied from pinned memory without waiting: no host synchronisation)
            table.index_copy_(0, to_device(positions, torch.int64, device), rows)
    if group is not None:
        torch.distributed.all_reduce(table, op=torch.distributed.ReduceOp.SUM, group=group)
    return table
