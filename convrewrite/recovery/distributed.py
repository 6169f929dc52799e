"""Data parallelism under ``torchrun``: one process per device, one process group for the run.

``torchrun --nproc-per-node N -m convrewrite ...`` starts N copies of the command with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in their environment. ``distributed_session``
reads them, initialises the process group (gloo for CPU tensors, nccl for CUDA, each rank on
``cuda:LOCAL_RANK``), and on the way out waits for every rank at a barrier before destroying the
group, so rank 0 can finish writing while the others wait. Without that environment (or with
WORLD_SIZE=1) it is a plain single-process session and nothing is initialised.

What runs inside sees the group through ``torch.distributed`` itself: ``distill`` wraps the student
in DistributedDataParallel, reads its shard of the fit split, and lets rank 0 alone print and write.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch

from convrewrite.errors import UsageError
from convrewrite.recovery.device import resolve_device

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistributedSession:
    """This process's place in the run: its rank, how many there are, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if not self.distributed:
            return
        import torch.distributed as dist

        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index or 0])
        else:
            dist.barrier()

    def to_dict(self) -> dict[str, object]:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "local_rank": self.local_rank,
            "device": str(self.device),
            "backend": self.backend,
        }


def torchrun_environment(environ: Mapping[str, str] | None = None) -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` set by torchrun, or None when this is a single process."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return None
    missing = [name for name in TORCHRUN_VARIABLES if name not in env]
    if missing:
        raise UsageError(
            f"a distributed launch needs {', '.join(TORCHRUN_VARIABLES)}; {', '.join(missing)} not set",
            hint="start the command with torchrun --nproc-per-node N -m convrewrite ...",
        )
    try:
        rank, world_size, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    except ValueError:
        raise UsageError(
            f"RANK={env['RANK']!r}, WORLD_SIZE={env['WORLD_SIZE']!r}, LOCAL_RANK={env['LOCAL_RANK']!r} "
            "are not whole numbers"
        ) from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise UsageError(f"RANK={rank} and WORLD_SIZE={world_size} do not describe a process of the run")
    return rank, world_size, local_rank


def device_for_rank(spec: str | torch.device | None, local_rank: int, world_size: int) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for CUDA, the CPU otherwise."""
    device = spec if isinstance(spec, torch.device) else resolve_device(spec)
    if world_size <= 1:
        return device
    if device.type == "cuda":
        if isinstance(spec, str) and ":" in spec:
            raise UsageError(
                f"--device {spec}: under torchrun each process takes cuda:LOCAL_RANK",
                hint="pass --device cuda (or auto)",
            )
        if local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"LOCAL_RANK {local_rank} has no GPU: this machine has {torch.cuda.device_count()}",
                hint="start at most that many processes per node",
            )
        return torch.device("cuda", local_rank)
    if device.type != "cpu":
        raise UsageError(f"--device {device}: torch.distributed has no backend for it", hint="use cpu or cuda")
    return device


def _import_group_default_modules() -> None:
    """Import, while no process group exists, the torch modules that capture one at import time.

    ``torch.distributed.nn.functional`` gives ten functions the default argument
    ``group=group.WORLD``, evaluated when the module is first imported. DistributedDataParallel
    imports it lazily, inside its constructor, so with the group already up those defaults keep a
    reference to it for the life of the process: ``destroy_process_group`` then cannot free the
    group, its gloo threads outlive ``main`` and race the interpreter's shutdown, and a rank that
    loses the race aborts ("terminate called without an active exception", SIGABRT) after its work
    is done, which fails the whole torchrun job. Imported first, the defaults are None.
    """
    import torch.distributed.nn.functional  # noqa: F401


@contextlib.contextmanager
def distributed_session(
    device: str | torch.device | None = "auto",
    *,
    environ: Mapping[str, str] | None = None,
    timeout: timedelta = timedelta(minutes=30),
) -> Iterator[DistributedSession]:
    """Join the run torchrun started (or be the only process); leave it cleanly."""
    found = torchrun_environment(environ)
    if found is None or found[1] == 1:
        rank, local_rank = (found[0], found[2]) if found is not None else (0, 0)
        yield DistributedSession(rank, 1, local_rank, device_for_rank(device, local_rank, 1))
        return
    rank, world_size, local_rank = found
    chosen = device_for_rank(device, local_rank, world_size)
    import torch.distributed as dist

    if not dist.is_available():
        raise UsageError("this torch build has no torch.distributed", hint="run without torchrun")
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    owns = not dist.is_initialized()
    if owns:
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        if environ is not None:
            # init_method env:// reads os.environ; a mapping given explicitly (tests) must land there.
            os.environ.update({k: environ[k] for k in TORCHRUN_VARIABLES})
        _import_group_default_modules()
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout)
    else:
        backend = str(dist.get_backend())
    session = DistributedSession(rank, world_size, local_rank, chosen, backend, owns)
    failed = False
    try:
        yield session
    except BaseException:
        failed = True
        raise
    finally:
        # After a failure another rank may never reach a barrier: only tear down.
        if not failed:
            session.barrier()
        if owns and dist.is_initialized():
            dist.destroy_process_group()
