"""Run a function in several processes joined by a gloo process group on 127.0.0.1.

Bounded in time: a worker that hangs or dies fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, fn, args, out_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=60))
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:  # noqa: BLE001 - the parent reports it
        torch.save({"ok": False, "error": traceback.format_exc()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, out_dir, *args, timeout: float = 120.0) -> list:
    """Call ``fn(rank, world_size, *args)`` on each rank; return the ranks' results in order.

    ``fn`` must be importable (a module-level function of a test module).
    """
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    context = mp.get_context("spawn")
    port = free_port()
    processes = [context.Process(target=_worker, args=(r, world_size, port, fn, args, str(out_dir)))
                 for r in range(world_size)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout)
    hung = [r for r, p in enumerate(processes) if p.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(5)
    if hung:
        raise TimeoutError(f"ranks {hung} did not finish within {timeout}s")
    results = []
    for rank in range(world_size):
        path = Path(out_dir) / f"rank{rank}.pt"
        if not path.exists():
            raise RuntimeError(f"rank {rank} exited with code {processes[rank].exitcode} and wrote no result")
        payload = torch.load(path, weights_only=False)
        if not payload["ok"]:
            raise RuntimeError(f"rank {rank} failed:\n{payload['error']}")
        results.append(payload["result"])
    return results
