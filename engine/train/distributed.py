"""Process-group set-up and teardown, the collective timeout, the failure watchdog, free ports and the
clean-up of /dev/shm buffers.

A rank that fails never leaves the others waiting for long:
- every collective gives up after `distributed.timeout_s` (default 600 s; torch's gloo groups, which
  DeepSpeed clones for its data-parallel group, otherwise wait 30 minutes);
- a rank that raises (in `Trainer.train_step`, or anywhere uncaught) writes "rank R: <error>" into the
  process group's TCPStore, and a watchdog thread on every rank polls that key every second: a peer that
  reads it prints "clipforge train: rank R failed: <error>; stopping" and exits 1 at once, even from
  inside a collective that would only have failed at the timeout (the failing rank may stay alive in
  its own teardown for a while, or be stuck).
A rank that dies outright (SIGKILL, OOM) cannot announce: its peers' collectives fail at once on the
closed connection, and a frozen node (SIGSTOP, a network partition) is caught by the timeout.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from datetime import timedelta

import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0  # the config's distributed.timeout_s
POLL_S = 1.0  # how often the watchdog reads the failure key
_watchdog = None  # this process's _Watchdog, while the group is up (world > 1)


# ------------------------------------------------------------------------------ distributed
def shutdown_distributed() -> None:
    """Stop the watchdog, destroy the process group and unlink this rank's DeepSpeed shared-memory
    buffers. Idempotent; `init_distributed` also registers it to run at exit, before the interpreter's
    own teardown, where gloo's threads were seen to abort a rank that had finished ("terminate called
    without an active exception")."""
    failed = _stop_watchdog()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _remove_own_shm_buffers()
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if failed and addr and port:
        remove_shm_buffers(addr, port)  # the run failed: this host's buffers of it, a killed peer's too


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches the groups it derived from the world (its clone of the world group, the data-parallel
    group) in module globals; once the world is destroyed they name dead groups, and the next process
    group in this process (a second run in a notebook or a test session) failed in deepspeed.initialize
    with "Group ... is not registered". `init_distributed` clears them before it makes a world (however the
    earlier one was destroyed)."""
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is None:
        return
    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP",
                 "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP", "mpu"):
        if hasattr(groups, name):
            setattr(groups, name, None)
    for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                 "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
        if isinstance(getattr(groups, name, None), dict):
            getattr(groups, name).clear()


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


def init_distributed(timeout_s: float | None = None) -> None:
    """Join the launcher's process group (RANK/WORLD_SIZE/MASTER_* in the environment), or make a
    one-process group; gloo on CPU, the accelerator's backend (NCCL) on GPUs. The rendezvous and every
    collective give up after `timeout_s` (None: DEFAULT_TIMEOUT_S; a run's distributed.timeout_s is set
    again by the Trainer); with several ranks the failure watchdog starts. Idempotent."""
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
    timeout_s = timeout_s or DEFAULT_TIMEOUT_S
    _forget_deepspeed_groups()  # a new world: groups DeepSpeed derived from an earlier one are dead
    deepspeed.init_distributed(dist_backend=backend, verbose=False, timeout=timedelta(seconds=timeout_s))
    import atexit

    atexit.register(shutdown_distributed)
    set_collective_timeout(timeout_s)
    start_watchdog()


def set_collective_timeout(timeout_s: float) -> None:
    """Make every collective of every process group give up after `timeout_s` seconds, and the groups
    DeepSpeed creates later too (its `new_group` passes no timeout: gloo's default is 30 minutes)."""
    import importlib

    from torch.distributed import distributed_c10d as c10d

    timeout = timedelta(seconds=timeout_s)
    set_timeout = getattr(c10d, "_set_pg_timeout", None)  # private (torch >= 2.4); without it: init's timeout
    if set_timeout is not None:
        for group in list(c10d._world.pg_map):
            set_timeout(timeout, group)
    cdb = getattr(sys.modules.get("deepspeed.comm.comm") or importlib.import_module("deepspeed.comm.comm"), "cdb", None)
    if cdb is not None:
        cdb.new_group = lambda ranks: dist.new_group(ranks, timeout=timeout)


# keys that may differ between nodes: where files are, each node's loader threads and devices, logging
NODE_LOCAL_KEYS = ("output_dir", "checkpointing.dir", "deepspeed.config_file", "logging", "distributed",
                   "data.path", "data.eval_path", "data.cache_dir", "data.num_workers", "data.token_workers",
                   "data.loader", "data.device", "data.prefetch", "model.pretrained", "model.pretrained_image",
                   "model.pretrained_text", "evaluation.zeroshot.path")


def check_same_config(config: dict) -> None:
    """Refuse, on every rank, a run whose ranks were started with different run configs (one all_gather
    of the config at start-up, before DeepSpeed broadcasts weights shaped by it): a ConfigError naming
    the keys, instead of mismatched collectives later (gloo aborts) or ranks that silently train apart."""
    from ..config import ConfigError

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    configs = [None] * dist.get_world_size()
    dist.all_gather_object(configs, _flatten(config))
    problem = config_differences(configs)
    if problem:
        raise ConfigError(problem)


def _flatten(tree: dict, prefix: str = "") -> dict:
    """Dotted keys; data.sources compared without their paths (node-local, like data.path): the number of
    sources and their weights must agree."""
    out = {}
    for key, value in tree.items():
        if f"{prefix}{key}" == "data.sources" and isinstance(value, list):
            value = [{k: v for k, v in s.items() if k != "path"} if isinstance(s, dict) else s for s in value]
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(configs: list[dict]) -> str | None:
    """One sentence on how the ranks' flattened configs differ (NODE_LOCAL_KEYS aside), or None."""
    missing = "<unset>"
    lines = []
    for key in sorted(set().union(*configs)):
        if any(key == k or key.startswith(k + ".") for k in NODE_LOCAL_KEYS):
            continue
        values = [c.get(key, missing) for c in configs]
        if all(v == values[0] for v in values):
            continue
        groups: list[tuple[object, list[int]]] = []
        for rank, value in enumerate(values):
            for seen, ranks in groups:
                if seen == value:
                    ranks.append(rank)
                    break
            else:
                groups.append((value, [rank]))
        lines.append(f"{key} is " + " but ".join(
            f"{v!r} on rank{'s' * (len(r) > 1)} {', '.join(map(str, r))}" for v, r in groups))
    if not lines:
        return None
    more = f" (and {len(lines) - 5} more keys)" if len(lines) > 5 else ""
    return ("the ranks were started with different run configs: " + "; ".join(lines[:5]) + more
            + "; start every node with the same config and --set overrides")


# ---------------------------------------------------------------------------- the watchdog
class _Watchdog(threading.Thread):
    """Polls the group's store for a failure announced by another rank; then prints it and ends this
    process at once (os._exit: the main thread may be blocked in a collective). A launcher's death is
    signals.py's (a checkpoint and a stop on every rank), not a failure."""

    def __init__(self, store, rank: int, world: int, key: str, poll_s: float):
        super().__init__(name="clipforge-watchdog", daemon=True)
        self.store, self.rank, self.world, self.poll_s = store, rank, world, poll_s
        self.failed_key, self.seen_key, self.done_key = f"{key}/failed", f"{key}/failed_seen", f"{key}/stopped"
        self.halt = threading.Event()
        self.announced = False
        self.store_gone = False  # once the store failed, never touch it again (each failure logs a C++ warning)

    def run(self) -> None:
        while not self.halt.wait(self.poll_s):
            try:
                if self.store.check([self.failed_key]):
                    failed = json.loads(self.store.get(self.failed_key))
                    if failed["rank"] != self.rank:
                        self.store.add(self.seen_key, 1)
                        _exit_now(failed["rank"], failed["error"])
                    return  # this rank's own failure: the main thread is on its way out
            except Exception:
                # the store's host is gone (rank 0 ended its run or died): the collectives' own errors
                # and timeout take over from here
                self.store_gone = True
                return

    def announce(self, error: str) -> None:
        """Publish this rank's failure (the first rank to fail wins) and wait up to 2 polls for the
        others to read it, so that a failing rank 0, which hosts the store, does not take it down first."""
        if self.announced or self.store_gone:
            return
        self.announced = True
        value = json.dumps({"rank": self.rank, "error": error})
        try:
            if self.store.compare_set(self.failed_key, "", value).decode() != value:
                self.store.add(self.seen_key, 1)  # another rank failed first (its message counts): seen
                return
            print(f"clipforge train: rank {self.rank} failed: {error}; stopping the other ranks",
                  file=sys.stderr, flush=True)
            deadline = time.monotonic() + 2 * self.poll_s
            while time.monotonic() < deadline and self.store.add(self.seen_key, 0) < self.world - 1:
                time.sleep(0.05)
        except Exception:
            self.store_gone = True  # nothing more to tell anyone

    def close(self) -> None:
        """Stop polling; on rank 0 (the store's host) wait briefly for the others to stop theirs, so that
        none of them polls a store that has gone away at the end of a good run."""
        self.halt.set()
        if threading.current_thread() is not self:
            self.join(timeout=2 * self.poll_s)
        if self.store_gone:
            return
        with contextlib.suppress(Exception):
            self.store.add(self.done_key, 1)
            deadline = time.monotonic() + 2 * self.poll_s
            while (self.rank == 0 and not self.announced and time.monotonic() < deadline
                   and self.store.add(self.done_key, 0) < self.world):
                time.sleep(0.05)


def _exit_now(rank: int, error: str) -> None:
    """End this process now: the message, this node's DeepSpeed /dev/shm buffers of the group, exit 1."""
    print(f"clipforge train: rank {rank} failed: {error}; stopping", file=sys.stderr, flush=True)
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        remove_shm_buffers(addr, port)  # the group is over: this host's buffers of it, the dead ranks' too
    _release_lock()
    sys.stdout.flush()
    os._exit(1)


def _release_lock() -> None:
    """The run folder's lock, if this process holds it (os._exit skips atexit)."""
    try:
        from .rundir import release_held

        release_held()
    except Exception:  # noqa: BLE001 - leaving anyway; a stale lock is taken over by the next run
        pass


def start_watchdog(poll_s: float = POLL_S) -> None:
    """Start this rank's failure watchdog (idempotent; nothing with one rank or without MASTER_ADDR/PORT,
    the TCPStore of an env:// rendezvous, which the watchdog reaches over its own connection)."""
    global _watchdog
    if _watchdog is not None or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not addr or not port:
        return
    try:
        # a short timeout: a failing rank must not wait long on a store whose host froze
        store = dist.TCPStore(addr, int(port), None, False, timeout=timedelta(seconds=5), wait_for_workers=False)
    except Exception as exc:  # no store to reach: the timeout remains the only guard
        print(f"clipforge train: no failure watchdog ({exc})", file=sys.stderr)
        return
    key = f"clipforge/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"  # torchrun's store outlives restarts
    _watchdog = _Watchdog(store, dist.get_rank(), dist.get_world_size(), key, poll_s)
    _watchdog.start()
    previous = sys.excepthook

    def excepthook(kind, value, tb):  # an uncaught exception anywhere: tell the others before teardown
        announce_failure(describe(value))
        previous(kind, value, tb)

    sys.excepthook = excepthook


def _stop_watchdog() -> bool:
    """Stop the watchdog; True if this rank announced a failure."""
    global _watchdog
    failed = False
    if _watchdog is not None:
        _watchdog.close()
        failed = _watchdog.announced
        _watchdog = None
    return failed


def describe(exc: BaseException) -> str:
    """One line for a failure: its type and the first line of its message (a peer's end, for a collective)."""
    text = (str(exc).strip().splitlines() or [""])[0][:400]
    if isinstance(exc, getattr(dist, "DistError", ())) or "gloo/transport" in text:
        return f"a collective failed (a peer rank died, froze or stopped): {text}"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def announce_failure(error: str) -> None:
    """Tell the other ranks that this one failed (they stop within ~1 s); a no-op with one rank."""
    if _watchdog is not None:
        _watchdog.announce(error)


@contextlib.contextmanager
def failures_announced(ignore: tuple = ()):
    """Run a block whose exceptions (but `ignore`, raised alike on every rank) are announced, then re-raised."""
    try:
        yield
    except ignore:
        raise
    except BaseException as exc:
        announce_failure(describe(exc))
        raise
