"""Two CPU ranks on gloo for the distributed tests: run one job per rank, collect each rank's JSON result.

``job(rank, *args)`` must be a module-level function (``torch.multiprocessing.spawn`` pickles it by reference). A
rank writes its result, waits at a barrier for the other, and leaves through ``os._exit(0)``: the interpreter's
teardown of gloo's threads aborts now and then ("terminate called without an active exception", SIGABRT) after
all the work is done, which failed CI once on a result that was already written. A job that raises still fails
the run (its traceback reaches ``spawn``), and a rank that died before writing its result fails in :func:`spawn_two`.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

WORLD = 2


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out_dir: str, job: Callable[..., Any], args: tuple) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        result = job(rank, *args)
        path = Path(out_dir) / f"rank{rank}.json"
        path.with_suffix(".part").write_text(json.dumps(result))
        path.with_suffix(".part").replace(path)  # a result file is complete or absent
        dist.barrier()  # both ranks have written their results
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)


def spawn_two(tmp_path: Path, job: Callable[..., Any], *args: Any) -> list[dict]:
    """Run ``job(rank, *args)`` on two gloo ranks; their results (JSON), by rank."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.multiprocessing.spawn(_rank_main, args=(free_port(), str(tmp_path), job, args), nprocs=WORLD, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
