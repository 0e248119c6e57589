"""Process-group set-up and teardown, free ports and the clean-up of /dev/shm buffers."""
from __future__ import annotations

import os
import socket

import torch.distributed as dist



# ------------------------------------------------------------------------------ distributed
def shutdown_distributed() -> None:
    """Destroy the process group and unlink this rank's DeepSpeed shared-memory buffers. Idempotent;
    `init_distributed` also registers it to run at exit, before the interpreter's own teardown, where
    gloo's threads were seen to abort a rank that had finished ("terminate called without an active
    exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _remove_own_shm_buffers()


def _remove_own_shm_buffers() -> None:
    """Unlink the shared-memory all-reduce buffers DeepSpeed's CPU comm op made for this rank.

    DeepSpeed 0.19 creates /dev/shm/deepspeed_allreduce_buffer_<i>_<master addr>_<port>_<rank> (69 MB each,
    RAM-backed) when a CPU rank joins and never unlinks them, so every multi-rank CPU run leaked them (5 GB
    after one test session). Each rank removes its own once its group is gone; a peer still mapping one
    keeps its mapping until it exits.
    """
    addr, port, rank = (os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK"))
    if addr and port and rank:
        remove_shm_buffers(addr, port, rank)


def remove_shm_buffers(addr: str, port, rank="*") -> None:
    """Unlink DeepSpeed's /dev/shm all-reduce buffers of the group at addr:port: one rank's, or ("*") all."""
    import glob

    rank = rank if rank == "*" else glob.escape(str(rank))
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{glob.escape(addr)}_{port}_{rank}"):
        try:
            os.remove(path)
        except OSError:
            pass  # already gone (removed by its rank, or another clean-up)


def free_port() -> int:
    """A TCP port free on this host now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> None:
    """Join the launcher's process group (RANK/WORLD_SIZE/MASTER_* in the environment), or make a
    one-process group; gloo on CPU, the accelerator's backend (NCCL) on GPUs. Idempotent."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    accel = get_accelerator()
    if accel.device_name() == "cpu":
        backend = "gloo"
    else:
        accel.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = accel.communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    import atexit

    atexit.register(shutdown_distributed)
