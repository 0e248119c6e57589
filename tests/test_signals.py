"""A scheduler's SIGTERM (or a Ctrl-C) checkpoints the run on every rank, and --resume auto continues it exactly.

- the `deepspeed` launcher on CPU (2 gloo ranks), SIGTERM to the launcher at a random step: every rank
  stops, one complete checkpoint of the step reached, no /dev/shm buffer and no rank left; resumed with
  the launcher, the per-step losses are those of an uninterrupted run;
- SIGINT to every process of a one-process `python -m clipforge.train` (Ctrl-C) reading shards with 2
  loader workers: a checkpoint, exit 130, resumes exactly;
- a second SIGTERM while the checkpoint is written exits at once and leaves the previous complete
  checkpoint what --resume auto continues from.

The uninterrupted references are in-process runs (a 1-rank gloo group; test_train.py shows that 1 and 2
ranks agree to TOL); the resumed runs are compared with them step by step.
"""
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from clipforge.train.distributed import free_port
from test_train import _env, assert_losses_close, one_rank, read_metrics, run_main, straight_run, write_config  # noqa: F401 (one_rank: a fixture)

psutil = pytest.importorskip("psutil")  # a dependency of deepspeed

MAX_STEPS = 12
SECTIONS = dict(batch={"micro_size": 8}, deepspeed={"zero_stage": 1}, max_steps=MAX_STEPS,
                schedule={"warmup_steps": 1, "total_steps": MAX_STEPS})
PICK = random.Random(20261201)  # the steps at which the signals are sent: random, but the same every run


@pytest.fixture(scope="module")
def straight(tmp_path_factory, one_rank):
    """The uninterrupted run's metrics (in this process, one rank)."""
    return straight_run(tmp_path_factory.mktemp("straight"), SECTIONS)


def _child_env(**extra) -> dict:
    """The test's environment without this process's own group (the in-process runs set RANK, MASTER_PORT...)."""
    env = _env()
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def _steps(out) -> list[int]:
    try:
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [json.loads(line)["step"] for line in f if line.endswith("\n")]
    except OSError:
        return []


def _wait_for_step(proc, out, k: int, log, timeout=240) -> None:
    deadline = time.monotonic() + timeout
    while not (_steps(out) and _steps(out)[-1] >= k):
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before step {k}:\n{_tail(log)}"
        assert time.monotonic() < deadline, f"no step {k} after {timeout} s:\n{_tail(log)}"
        time.sleep(0.02)


def _tail(log) -> str:
    with open(log, errors="replace") as f:
        return f.read()[-4000:]


def _complete(ckpts) -> list[int]:
    from clipforge.model.weights import list_complete

    return [step for step, _ in list_complete(str(ckpts))]


def _shm(port) -> list[str]:
    return glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*")


def _kill_group(proc) -> None:
    """Whatever a failed test left of the run it started (its own session)."""
    if proc.poll() is None or any(p.is_running() for p in _session(proc)):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def _session(proc) -> list:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
def test_sigterm_to_the_deepspeed_launcher_checkpoints_every_rank_and_resumes_exactly(straight, tmp_path):
    """SIGTERM to `deepspeed` (its runner process, which does not pass it on: the ranks see it exit)."""
    launcher = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    config = write_config(tmp_path, "run", **SECTIONS)
    out, log = tmp_path / "run", tmp_path / "launcher.log"
    port = free_port()
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(port), "--module", "clipforge.train", "--config", config]
    k = PICK.randint(2, 8)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=_child_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_step(proc, out, k, log)
        tree = _session(proc)  # the runner's launch.py and the two ranks
        assert sum("--local_rank=" in " ".join(p.cmdline()) for p in tree) == 2, tree
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) != 0
        _, alive = psutil.wait_procs(tree, timeout=60)
        stopped_after = time.monotonic() - t0
        assert not alive, f"left running: {alive}\n{_tail(log)}"
    finally:
        _kill_group(proc)
    reached = _steps(out)[-1]
    assert k <= reached < MAX_STEPS, _tail(log)
    ckpts = out / "checkpoints"
    assert _complete(ckpts) == [reached], sorted(os.listdir(ckpts))
    assert not [n for n in os.listdir(ckpts) if n.startswith(".tmp-")]
    assert {f"trainer_rank{r}.pt" for r in (0, 1)} <= set(os.listdir(ckpts / f"step_{reached:06d}"))
    text = _tail(log)
    assert f"stopped at step {reached}, checkpoint {ckpts / f'step_{reached:06d}'}" in text, text
    assert not _shm(port), f"the stopped run left {_shm(port)} behind"
    print(f"SIGTERM after step {k}: stopped at step {reached}, launcher tree gone {stopped_after:.1f} s later")

    port = free_port()
    cmd[cmd.index("--master_port") + 1] = str(port)
    resumed = subprocess.run([*cmd, "--resume", "auto"], env=_child_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert f"resumed from {ckpts / f'step_{reached:06d}'} at step {reached}" in resumed.stdout
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    assert_losses_close(rows, straight)
    assert not _shm(port)


def _start_one_process(config, log, *args, **env):
    port = free_port()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "clipforge.train", "--config", config, *args],
                                env=_child_env(MASTER_PORT=str(port), **env), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, port


def test_ctrl_c_to_one_process_with_loader_workers_checkpoints_exits_130_and_resumes(tmp_path, one_rank):
    """SIGINT to the whole process group (what a terminal's Ctrl-C does; SLURM too signals every process)
    of a shard run whose PyTorch loader has 2 worker processes: they ignore it, the rank checkpoints,
    exits 130, and resumes exactly (12 steps of 8 over 48 samples: an epoch boundary, new workers)."""
    from test_train import _write_shards

    _write_shards(tmp_path / "shards", n_shards=2, per_shard=24)
    sections = dict(SECTIONS, batch={"global_size": 8, "micro_size": 4},
                    data={"kind": "webdataset", "path": str(tmp_path / "shards"), "loader": "pytorch",
                          "num_workers": 2, "cache_dir": str(tmp_path / "cache")})
    assert run_main(write_config(tmp_path, "straight", **sections)) == 0
    config = write_config(tmp_path, "run", **sections)
    out, log = tmp_path / "run", tmp_path / "run.log"
    k = PICK.randint(2, 8)
    proc, port = _start_one_process(config, log)
    try:
        _wait_for_step(proc, out, k, log)
        tree = _session(proc)
        assert len(tree) == 2, tree  # the loader's workers
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 130, _tail(log)
        _, alive = psutil.wait_procs(tree, timeout=30)
        assert not alive
    finally:
        _kill_group(proc)
    reached = _steps(out)[-1]
    assert reached >= k and _complete(out / "checkpoints") == [reached]
    text = _tail(log)
    assert f"SIGINT: stopped at step {reached}" in text and "Traceback" not in text, text
    assert not _shm(port)
    assert run_main(config, "--resume", "auto") == 0  # in this process: the same arithmetic, faster
    assert_losses_close(read_metrics(out), read_metrics(tmp_path / "straight"))


def test_a_second_sigterm_during_the_checkpoint_exits_at_once_and_keeps_the_previous_one(straight, tmp_path):
    """The second SIGTERM is sent as soon as a checkpoint's temp dir appears. Whichever way the race goes
    (exit at once, or the checkpoint got finished first), the complete checkpoints stay complete and
    --resume auto continues exactly from the newest."""
    config = write_config(tmp_path, "run", **SECTIONS, checkpointing={"every_steps": 5, "keep_last": 20})
    out, log = tmp_path / "run", tmp_path / "run.log"
    ckpts = out / "checkpoints"
    k = PICK.randint(6, 8)  # the stop lands on step k or k + 1: its own checkpoint, after step_000005
    # signals closer than CLIPFORGE_SIGNAL_MERGE_S (default 2 s) count as one request; here every one counts
    proc, port = _start_one_process(config, log, CLIPFORGE_SIGNAL_MERGE_S="0")
    try:
        _wait_for_step(proc, out, k, log)
        before = _complete(ckpts)
        assert before == [5]
        pending = set(glob.glob(str(ckpts / ".tmp-*")))  # a periodic save under way: not the one to cut
        proc.send_signal(signal.SIGTERM)
        while proc.poll() is None and not set(glob.glob(str(ckpts / ".tmp-*"))) - pending:
            time.sleep(0.001)
        t_second = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 143, _tail(log)
        elapsed = time.monotonic() - t_second
    finally:
        _kill_group(proc)
    text = _tail(log)
    after = _complete(ckpts)
    assert set(before) <= set(after), (before, after)  # no complete checkpoint was harmed
    for name in os.listdir(ckpts):  # under a final name only complete ones; the rest is .tmp-*, ignored
        assert name.startswith(".tmp-") or os.path.exists(ckpts / name / "COMPLETE"), name
    at_once = "SIGTERM again: exiting at once" in text
    if at_once:
        assert elapsed < 5, f"{elapsed:.1f} s from the second signal to the exit"
    else:  # the stop's checkpoint was done before the second signal arrived
        assert after[-1] == _steps(out)[-1] and "stopped at step" in text, text
    assert not _shm(port)
    print(f"second SIGTERM: {'exit at once' if at_once else 'the checkpoint was finished first'} "
          f"({elapsed:.2f} s to the exit); complete checkpoints {before} -> {after}, "
          f"left: {sorted(n for n in os.listdir(ckpts) if n.startswith('.tmp-'))}")
    assert run_main(config, "--resume", "auto") == 0
    assert_losses_close(read_metrics(out), straight)
    assert not [n for n in os.listdir(ckpts) if n.startswith(".tmp-")]  # the next save cleaned up


# ------------------------------------------------------------------------- the pieces, in this process
def test_signals_are_recorded_merged_and_the_handlers_given_back():
    from clipforge.train.signals import StopOnSignal, exit_code

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    stop = StopOnSignal()
    stop.merge_s = 60.0
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # recorded, not fatal
        deadline = time.monotonic() + 10
        while not stop.signum and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)  # within the merge window: the same request (else os._exit)
        time.sleep(0.2)
        assert (stop.signum, stop.reason) == (signal.SIGTERM, "SIGTERM")
        assert stop.agreed() == signal.SIGTERM and exit_code(stop.agreed()) == 143
    finally:
        stop.close()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert exit_code(signal.SIGINT) == 130


def test_a_launcher_that_is_gone_or_a_zombie_is_seen():
    from clipforge.train.signals import _first_gone, _proc_stat, launcher_chain

    assert launcher_chain() == []  # pytest is no DeepSpeed launcher: a plain run outlives its shell
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        chain = [(child.pid, _proc_stat(child.pid)[2])]
        assert _first_gone(chain) is None
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _proc_stat(child.pid)[0] != "Z" and time.monotonic() < deadline:  # dead, not yet reaped
            time.sleep(0.01)
        assert _first_gone(chain) == child.pid
    finally:
        child.kill()
        child.wait()
    assert _first_gone(chain) == child.pid  # reaped: gone
    assert _first_gone([(os.getpid(), _proc_stat(os.getpid())[2] + 1)]) == os.getpid()  # a reused pid
