"""The run folder's guards: a used folder is never clobbered, and one live run writes into a folder.

- A folder that holds a run (any of USED, or checkpoints in `checkpointing.dir`) needs `--resume`
  (continue it) or `--force` (a fresh run; the old contents are first renamed to
  `<folder>.previous-<time>/`, byte for byte, never deleted; so are they when `--resume auto` finds no
  complete checkpoint and starts fresh). The preflight refuses anything else, before any work starts.
- A lock file (`<output_dir>/.clipforge.lock`: host, pid, start time) refuses a second live run in the
  same folder. A lock whose process is gone (same host) is stale and taken over, with a message; a lock
  of another host cannot be checked from here and is refused, naming the file to remove if that run is
  dead. Rank 0 takes it after the process group exists (all ranks then agree on the outcome) and drops
  it when the process exits.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import time

from .config import ConfigError, TrainConfig

USED = ("metrics.jsonl", "config.yaml", "deepspeed_config.json", "model.safetensors", "checkpoints", "tensorboard",
        "data_stats.json", "summary.json", "loss_curve.png")
LOCK = ".clipforge.lock"


def _ckpt_entries(path: str) -> list[str]:
    if not os.path.isdir(path):
        return []
    return sorted(n for n in os.listdir(path) if n.startswith(("step_", ".tmp-step_")))


def used_entries(cfg: TrainConfig) -> list[str]:
    """What of an earlier run the output folder (and a separate checkpoint folder) holds."""
    out = cfg.output_dir
    found = [n for n in USED if os.path.lexists(os.path.join(out, n))]
    if os.path.isdir(os.path.join(out, "checkpoints")) and not os.listdir(os.path.join(out, "checkpoints")):
        found.remove("checkpoints")  # an empty folder is no run
    own = os.path.join(out, "checkpoints")
    if os.path.abspath(cfg.checkpoint_dir) != os.path.abspath(own) and _ckpt_entries(cfg.checkpoint_dir):
        found.append(f"checkpoints in {cfg.checkpoint_dir}")
    return found


HEARTBEAT_S = 60  # the holder touches its lock this often; one untouched for STALE_S is stale
STALE_S = 900
_held: dict = {}  # {"out": folder, "stop": threading.Event} while this process holds a lock


def read_lock(out: str) -> dict | None:
    path = os.path.join(out, LOCK)
    try:
        with open(path) as f:
            lock = json.load(f)
        lock["age_s"] = time.time() - os.path.getmtime(path)
        return lock if isinstance(lock, dict) else {"pid": None}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": None}  # unreadable: its writer died between creating and writing it (stale)


def _alive(lock: dict) -> bool:
    """Whether the lock's run still lives: its process, on this host; on another host (which cannot be
    asked) its heartbeat (the holder touches the lock every HEARTBEAT_S seconds)."""
    if lock.get("pid") is None:
        return False
    if lock.get("host") != socket.gethostname():
        return lock.get("age_s", 0) < STALE_S
    if lock.get("pid") == os.getpid():
        return False  # this process's own, left by an earlier run in it that did not release it
    try:
        os.kill(int(lock["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, KeyError):
        return True
    return True


def check_free(cfg: TrainConfig, resume: str | None, force: bool) -> None:
    """Preflight: refuse (ConfigError) a run that would clobber a used folder or share it with a live run."""
    if force and resume:
        raise ConfigError("--force starts a fresh run and --resume continues one: pass one of them")
    # the lock is rank 0's to take and check: a slower rank would see rank 0's own fresh lock
    lock = read_lock(cfg.output_dir) if os.environ.get("RANK", "0") == "0" else None
    if lock is not None and _alive(lock):
        raise ConfigError(
            f"{cfg.output_dir} is in use by another run (pid {lock.get('pid')} on {lock.get('host')}, started "
            f"{lock.get('started')}); wait for it, stop it, or choose another --output-dir (if that run is dead, "
            f"delete {os.path.join(cfg.output_dir, LOCK)})")
    used = used_entries(cfg)
    if used and not resume and not force:
        raise ConfigError(
            f"{cfg.output_dir} holds an earlier run ({', '.join(used)}): pass --resume auto to continue it, --force "
            "to start a fresh run there (the earlier files are moved to a .previous-<time> folder beside it), or "
            "choose another --output-dir")


def _aside(path: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = f"{os.path.normpath(path)}.previous-{stamp}", 1
    while os.path.lexists(target):
        n += 1
        target = f"{os.path.normpath(path)}.previous-{stamp}-{n}"
    os.rename(path, target)
    return target


def prepare(cfg: TrainConfig, force: bool, resume: str | None = None) -> list[str]:
    """Rank 0, after the preflight: move the earlier run aside when this one starts fresh in its folder
    (--force, or --resume auto finding no complete checkpoint: a job requeued before its first checkpoint
    restarts, and the earlier attempt's files are kept), then take the lock. Returns messages for the log;
    raises ConfigError when another run took the folder meanwhile."""
    from .checkpoint import find_latest, folder_run_id

    notes = []
    own = folder_run_id(cfg.output_dir)
    fresh = force or (resume == "auto" and find_latest(cfg.checkpoint_dir, own or "") is None)
    lock = read_lock(cfg.output_dir)
    if lock is not None and _alive(lock):  # again: the rendezvous took a while, another run may have started
        raise ConfigError(f"{cfg.output_dir} was taken by another run as this one started (pid {lock.get('pid')} "
                          f"on {lock.get('host')}); choose another --output-dir")
    if fresh and used_entries(cfg):
        own = os.path.join(cfg.output_dir, "checkpoints")
        if os.path.abspath(cfg.checkpoint_dir) != os.path.abspath(own) and _ckpt_entries(cfg.checkpoint_dir):
            notes.append(f"--force: moved the earlier checkpoints to {_aside(cfg.checkpoint_dir)}")
        if os.path.isdir(cfg.output_dir):
            notes.append(f"--force: moved the earlier run to {_aside(cfg.output_dir)}")
    os.makedirs(cfg.output_dir, exist_ok=True)
    path = os.path.join(cfg.output_dir, LOCK)
    lock = read_lock(cfg.output_dir)
    if lock is not None and not _alive(lock):
        notes.append(f"took over the stale lock of pid {lock.get('pid')} (no longer running) in {path}")
        os.remove(path)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        other = read_lock(cfg.output_dir) or {}
        raise ConfigError(f"{cfg.output_dir} was taken by another run as this one started (pid {other.get('pid')} "
                          f"on {other.get('host')}); choose another --output-dir") from None
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    atexit.register(release, cfg.output_dir, os.getpid())
    _heartbeat(path)
    return notes


def _heartbeat(path: str) -> None:
    import threading

    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_S):
            try:
                os.utime(path)
            except OSError:
                return

    _held.update(out=os.path.dirname(path), stop=stop)
    threading.Thread(target=beat, name="clipforge-lock-heartbeat", daemon=True).start()


def release_held() -> None:
    """Drop this process's lock, if it holds one (the exits that skip atexit call it: os._exit paths)."""
    if _held:
        release(_held["out"])


def set_run_id(cfg: TrainConfig, resume: str | None, resumed_from: str | None) -> None:
    """Rank 0, once the run stands (a resume has loaded): the folder's run id, which its checkpoints
    carry (train/checkpoint.py): the resumed checkpoint's, else the folder's own, else a new one."""
    import uuid

    from .checkpoint import RUN_ID, folder_run_id, run_of

    run_id = (run_of(resumed_from) or {}).get("run_id") if resumed_from else None
    run_id = run_id or (folder_run_id(cfg.output_dir) if resume else None) or uuid.uuid4().hex
    path = os.path.join(cfg.output_dir, RUN_ID)
    with open(path + ".tmp", "w") as f:
        f.write(run_id + "\n")
    os.replace(path + ".tmp", path)


def release(out: str, pid: int | None = None) -> None:
    """Drop the lock if this process holds it."""
    if _held.get("out") == out:
        _held["stop"].set()
        _held.clear()
    lock = read_lock(out)
    if lock is not None and lock.get("pid") == (pid or os.getpid()) and lock.get("host") == socket.gethostname():
        try:
            os.remove(os.path.join(out, LOCK))
        except FileNotFoundError:
            pass
