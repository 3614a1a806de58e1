"""Collective helpers for samplers that learn from the batch (CD-GraB, herding) under torch.distributed.

Rank ``r`` of ``W`` holds positions ``r, r+W, r+2W, ...`` of each global batch (the strided
sharding of :func:`dataorder.samplers.base.shard`). :func:`gather_global_batch` all-gathers
the ranks' per-example rows and interleaves them back into global-batch order, so every
rank sees the same global batch and can run the same deterministic balancing on it: all
ranks then hold the identical state and next order without further messages.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dataorder._validate import check_world_size

__all__ = ["GroupError", "active_world", "check_same_on_all_ranks", "gather_global_batch", "gather_global_batches",
           "run_local_group"]


def active_world() -> int:
    """The process group's size when ``torch.distributed`` is initialised, else 1.

    >>> active_world()
    1
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def gather_global_batch(rows: torch.Tensor) -> torch.Tensor:
    """All-gather ``rows`` (B, ...) from every rank into (W·B, ...) in global-batch order.

    Row ``j`` of rank ``r`` lands at ``j·W + r``, matching strided sharding. Every rank
    must pass the same shape (check it first with :func:`check_same_on_all_ranks`). On the
    ``gloo`` backend tensors travel through the CPU; on ``nccl`` they stay on the GPU.
    Communication: each rank sends B·k elements and receives (W−1)·B·k.

    Without an initialised process group it returns ``rows`` unchanged.

    >>> gather_global_batch(torch.ones(2, 3)).shape
    torch.Size([2, 3])
    """
    world = active_world()
    if world == 1:
        return rows
    backend = dist.get_backend()
    source = rows.contiguous()
    device = source.device
    if backend == "gloo" and source.is_cuda:
        source = source.cpu()
    parts = [torch.empty_like(source) for _ in range(world)]
    dist.all_gather(parts, source)
    stacked = torch.stack(parts, dim=1)  # (B, W, ...): row j of rank r at [j, r]
    return stacked.reshape(-1, *source.shape[1:]).to(device)


def gather_global_batches(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`gather_global_batch` of several ``(B, ...)`` tensors, of any dtypes, in **one** all-gather.

    The tensors travel as the bytes of one ``(B, total)`` buffer (each piece padded to 8
    bytes), so a step that gathers many small tensors pays one collective's latency, not
    one per tensor; values are not converted, so integers and floats come back bit for bit.
    Every rank must pass the same shapes and dtypes.

    >>> [a, b] = gather_global_batches([torch.ones(2, 3), torch.arange(4).reshape(2, 2)])
    >>> a.shape, b.tolist()
    (torch.Size([2, 3]), [[0, 1], [2, 3]])
    """
    if not tensors:
        return []
    batch = tensors[0].shape[0] if tensors[0].dim() else None
    if batch is None or any(t.dim() == 0 or t.shape[0] != batch for t in tensors):
        raise ValueError("gather_global_batches needs tensors that share their first (batch) dimension, got shapes "
                         f"{[tuple(t.shape) for t in tensors]}")
    pieces, layout = [], []
    for tensor in tensors:
        raw = tensor.contiguous().reshape(batch, -1).view(torch.uint8)  # (B, bytes)
        width = raw.shape[1]
        padded = -width % 8
        pieces.append(torch.nn.functional.pad(raw, (0, padded)) if padded else raw)
        layout.append((width, width + padded, tensor.dtype, tensor.shape[1:]))
    gathered = gather_global_batch(torch.cat(pieces, dim=1))
    out, start = [], 0
    for width, stride, dtype, shape in layout:
        raw = gathered[:, start:start + width].contiguous()
        out.append(raw.view(dtype).reshape(len(gathered), *shape))
        start += stride
    return out


def collective_device() -> torch.device:
    """Where the default group's collectives take their tensors: the current GPU under NCCL alone, else the CPU.

    NCCL has no CPU transport, so a check's few integers travel on the GPU there; ``gloo``
    and mixed backends (``"cpu:gloo,cuda:nccl"``) take CPU tensors.

    >>> collective_device()  # no process group
    device(type='cpu')
    """
    if active_world() > 1 and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _digest(value: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(value).encode()).digest()[:7], "little")


def check_same_on_all_ranks(what: str, **values: Any) -> None:
    """Raise ``ValueError`` on every rank if any of ``values`` differs between ranks.

    One all-gather of a few integers (digests of the values). The error names the first
    differing value and each rank's setting, e.g. mismatched seeds or batch sizes.

    >>> check_same_on_all_ranks("GraBSampler", seed=0, balance="mean")  # one process: nothing to compare
    """
    world = active_world()
    if world == 1:
        return
    names = sorted(values)
    local = torch.tensor([_digest(values[name]) for name in names], dtype=torch.int64, device=collective_device())
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    for column, name in enumerate(names):
        digests = [int(part[column]) for part in gathered]
        if len(set(digests)) > 1:
            settings: list[Any] = [None] * world
            dist.all_gather_object(settings, values[name])
            listing = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(settings))
            raise ValueError(f"{what}: {name} differs across ranks ({listing}); every rank must use the same {name}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GroupError(RuntimeError):
    """A rank of :func:`run_local_group` failed, produced no result, or returned a result that
    cannot travel as plain data.

    >>> issubclass(GroupError, RuntimeError)
    True
    """


def _group_worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    path = Path(out_dir) / f"rank{rank}.pt"
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=60))
        payload = {"ok": True, "result": fn(rank, world_size, *args)}
    except BaseException:  # noqa: BLE001 - the parent reports it
        payload = {"ok": False, "error": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    partial = path.with_suffix(".partial")
    try:
        torch.save(payload, partial)
        torch.load(partial, weights_only=True)  # refuse here what the parent would refuse to load
    except Exception as error:  # noqa: BLE001 - reported as this rank's error
        torch.save({"ok": False, "error": f"rank {rank}'s result cannot travel as plain data (plain Python "
                                          f"types and tensors only): {error}"}, partial)
    os.replace(partial, path)  # the parent sees a whole result file or none


def _load_result(path: Path, rank: int, exitcode: int | None) -> Any:
    if not path.is_file():
        raise GroupError(f"rank {rank} exited with code {exitcode} and wrote no result")
    payload = torch.load(path, weights_only=True)  # plain data only: a result file cannot run code
    if not isinstance(payload, dict) or "ok" not in payload:
        raise GroupError(f"rank {rank}'s result file is not one run_local_group writes")
    if not payload["ok"]:
        raise GroupError(f"rank {rank} failed:\n{payload['error']}")
    return payload["result"]


def run_local_group(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0,
                    workdir: str | os.PathLike | None = None) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes joined by a gloo group on 127.0.0.1.

    For tests, benchmarks and trying a distributed loop on one machine. Each process uses
    one thread. Returns the ranks' results in rank order. ``fn`` must be importable (the
    processes are spawned) and its result plain data: Python numbers, strings, lists,
    tuples, dicts and tensors (results travel through ``torch.save`` and are read back with
    ``torch.load(weights_only=True)``, so nothing in them can run code).

    Bounded in time: a rank that hangs past ``timeout`` seconds is killed and
    ``TimeoutError`` raised. A rank that fails, dies without a result or returns something
    that is not plain data raises :class:`GroupError` (a ``RuntimeError``) naming the rank,
    with its traceback. Results travel through a private folder made for this call (inside
    ``workdir`` if given, else the system's temporary folder) and removed afterwards.

    Example (a function defined in an importable module, since the processes are spawned)::

        # mymodule.py
        def world(rank, world_size):
            return rank, world_size

        run_local_group(mymodule.world, 2)   # -> [(0, 2), (1, 2)]
    """
    import torch.multiprocessing as mp

    world_size = check_world_size(world_size)
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dataorder-group-", dir=workdir) as out_dir:
        context = mp.get_context("spawn")
        port = _free_port()
        processes = [context.Process(target=_group_worker, args=(r, world_size, port, fn, args, out_dir))
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
            raise TimeoutError(f"ranks {hung} did not finish within {timeout}s (killed)")
        return [_load_result(Path(out_dir) / f"rank{rank}.pt", rank, process.exitcode)
                for rank, process in enumerate(processes)]
