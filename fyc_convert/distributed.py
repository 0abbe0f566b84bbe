"""torchrun support: who we are, and running a step on rank 0 so that every rank learns how it ended.

Without torchrun (or before `init_from_env`) there is one process, rank 0 of a world of 1, and `on_main`
simply calls its function.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from fyc_convert.errors import FycError

T = TypeVar("T")


class RankError(FycError):
    """The error rank 0 raised in a step that every rank waits for (same message and exit code)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def world() -> tuple[int, int]:
    """(world size, rank): (1, 0) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return world()[1] == 0


def launched_by_torchrun() -> bool:
    """Whether this process is one of several started by torchrun (WORLD_SIZE > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str) -> None:
    """Join the process group torchrun set up: NCCL on GPUs (each rank on its LOCAL_RANK device), else gloo."""
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def on_main(step: Callable[[], T]) -> T | None:
    """Run `step` on rank 0 only; every rank returns its result or raises its error.

    Other ranks wait for rank 0 and get the result (it must pickle) or a RankError with rank 0's message and
    exit code, so a failure on rank 0 ends all ranks at once instead of leaving them in a later collective.
    A KeyboardInterrupt on rank 0 is passed on as an interruption too.
    """
    size, rank = world()
    if size == 1:
        return step()
    outcome: list[object] = [None]
    error: BaseException | None = None
    if rank == 0:
        try:
            outcome = [("ok", step())]
        except KeyboardInterrupt as e:
            error, outcome = e, [("interrupted", "interrupted on rank 0", 130)]
        except FycError as e:
            error, outcome = e, [("error", str(e), e.exit_code)]
        except Exception as e:  # noqa: BLE001 - the other ranks must learn of it before rank 0 re-raises it
            error, outcome = e, [("error", f"rank 0 failed: {type(e).__name__}: {e}", 1)]
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    kind, *rest = outcome[0]  # type: ignore[misc]
    if kind == "ok":
        return rest[0]  # type: ignore[return-value]
    if kind == "interrupted":
        raise KeyboardInterrupt
    raise RankError(str(rest[0]), int(rest[1]))
