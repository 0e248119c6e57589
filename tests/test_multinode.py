"""A failing, frozen or mismatched rank never hangs the others; two nodes on this machine.

- a rank that raises at step 2 and then stays alive (stuck in its teardown, say): the other rank exits
  within seconds, not at the collective timeout, naming rank 1 and the error (distributed.py's watchdog);
- a frozen rank (SIGSTOP: a node gone silent) is caught by distributed.timeout_s;
- ranks whose features differ in dim, dtype or batch all raise one clear ValueError naming the ranks and
  values (clipforge.loss), and ranks started with different run configs a ConfigError naming the keys;
- two `deepspeed --no_ssh --hostfile H --node_rank N` launchers on this machine (one rank each) train like
  one process; when node 1 dies (its launcher's process group SIGKILLed), node 0 exits well within the
  collective timeout with a message, and the pair relaunched with --resume auto continues from the last
  complete checkpoint to the per-step losses of an uninterrupted run.

The uninterrupted reference is one in-process run (a 1-rank gloo group; test_train.py shows that 1 and 2
ranks agree to TOL). Ranks are subprocesses writing to log files (a rank that stays alive keeps a pipe open).
"""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from clipforge.train.distributed import config_differences, free_port, remove_shm_buffers
from test_train import _env, assert_losses_close, one_rank, read_metrics, straight_run, write_config  # noqa: F401 (one_rank: a fixture)

pytest.importorskip("deepspeed")

MAX_STEPS = 10
SECTIONS = dict(batch={"micro_size": 8}, deepspeed={"zero_stage": 1}, max_steps=MAX_STEPS,
                schedule={"warmup_steps": 1, "total_steps": MAX_STEPS})
TIMEOUT_S = 20  # distributed.timeout_s of the runs that lose a rank
HERE = os.path.abspath(__file__)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, one_rank):
    """The uninterrupted run's metrics (in this process, one rank)."""
    return straight_run(tmp_path_factory.mktemp("straight"), SECTIONS)


# ------------------------------------------------------------------------------------ helpers
def start_ranks(tmp_path, cmd, port, name="rank"):
    """Two ranks of `cmd` with the launcher's environment, each logging to tmp_path/<name><r>.log."""
    procs = []
    for rank in range(2):
        env = _env()
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        with open(tmp_path / f"{name}{rank}.log", "w") as log:
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def start_nodes(tmp_path, config, port, *args, name="node"):
    """Two `deepspeed --no_ssh` launchers, node ranks 0 and 1 of a two-host hostfile, one rank each; each
    in its own session (so that a node's whole process tree can be killed at once)."""
    launcher = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    procs = []
    for node in range(2):
        cmd = [launcher, "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
               "--master_addr", "127.0.0.1", "--master_port", str(port),
               "--module", "clipforge.train", "--config", config, *args]
        with open(tmp_path / f"{name}{node}.log", "w") as log:
            procs.append(subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True))
    return procs


def wait_all(procs, timeout=240):
    deadline = time.monotonic() + timeout
    return [p.wait(timeout=max(1, deadline - time.monotonic())) for p in procs]


def kill_all(procs, groups=False):
    """Kill what is left: each process, or (groups) each launcher's whole session."""
    for p in procs:
        try:
            if groups:
                os.killpg(p.pid, signal.SIGKILL)
            elif p.poll() is None:
                p.kill()
        except ProcessLookupError:
            pass
        p.wait()


def wait_for_step(out_dir, step, procs, timeout=180):
    """Block until metrics.jsonl holds `step` rows (failing if a process ends first)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                if sum(1 for line in f if line.endswith("\n")) >= step:
                    return
        assert all(p.poll() is None for p in procs), "a process ended before step %d" % step
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {path} after {timeout} s")


def assert_no_shm_left(port):
    left = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*")
    remove_shm_buffers("127.0.0.1", port)  # whatever the verdict, leave nothing behind
    assert not left, f"the run left {left} behind"


# ------------------------------------------------------------------------------ task A: ranks
def test_a_rank_that_raises_stops_the_other_within_seconds(tmp_path):
    """Rank 1 raises at step 2 and stays alive: rank 0 stops within seconds with the message naming
    rank 1 (before: it waited in the collective until rank 1 exited, or DeepSpeed's group's 30 minutes)."""
    config = write_config(tmp_path, "raise", **SECTIONS)
    marker = tmp_path / "failed_at"
    port = free_port()
    procs = start_ranks(tmp_path, [sys.executable, HERE, "raise", str(marker), "--config", config], port)
    try:
        rc0 = procs[0].wait(timeout=240)
        stopped = time.time()
        assert procs[1].poll() is None, "rank 1 was to stay alive"
    finally:
        kill_all(procs)
    log0, log1 = ((tmp_path / f"rank{r}.log").read_text() for r in range(2))
    assert rc0 == 1, log0[-3000:]
    waited = stopped - float(marker.read_text())
    assert waited < 15, f"rank 0 stopped {waited:.1f} s after rank 1 failed"
    assert "clipforge train: rank 1 failed: RuntimeError: injected failure at step 2; stopping" in log0, log0[-3000:]
    assert "clipforge train: rank 1 failed: RuntimeError: injected failure at step 2; stopping the other ranks" in log1
    assert [r["step"] for r in read_metrics(tmp_path / "raise")] == [1]
    assert_no_shm_left(port)  # rank 0 removed this host's buffers of the failed group, rank 1's too


def test_a_frozen_rank_is_caught_by_the_collective_timeout(tmp_path):
    """SIGSTOP rank 1 (a node gone silent: no error, no closed connection) at step 2: rank 0 gives up after
    distributed.timeout_s, not torch's 30 minutes, and says so."""
    timeout = 6
    config = write_config(tmp_path, "frozen", **{**SECTIONS, "max_steps": 400, "distributed": {"timeout_s": timeout}})
    port = free_port()
    procs = start_ranks(tmp_path, [sys.executable, "-m", "clipforge.train", "--config", config], port)
    try:
        wait_for_step(tmp_path / "frozen", 2, procs)
        procs[1].send_signal(signal.SIGSTOP)
        frozen = time.monotonic()
        rc0 = procs[0].wait(timeout=timeout + 60)
        waited = time.monotonic() - frozen
    finally:
        kill_all(procs)
    log0 = (tmp_path / "rank0.log").read_text()
    assert rc0 != 0 and timeout - 1 <= waited < timeout + 20, (rc0, waited, log0[-3000:])
    assert "clipforge train: rank 0 failed: a collective failed" in log0 and f"{timeout * 1000}ms" in log0, log0[-3000:]
    assert_no_shm_left(port)


def test_ranks_that_disagree_get_one_clear_error(tmp_path):
    """Feature dim, dtype, batch or backend that differ across ranks: a ValueError on every rank naming the
    ranks and values (before: gloo aborted one rank, "op.preamble.length <= op.nbytes"); configs that
    differ: a ConfigError naming the keys. The group still works afterwards."""
    out = tmp_path / "results"
    procs = start_ranks(tmp_path, [sys.executable, HERE, "disagree", str(out)], free_port())
    assert wait_all(procs, timeout=120) == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]
    for rank in range(2):
        res = json.loads((tmp_path / f"results{rank}.json").read_text())
        for case in ("dim-cpp", "dim-torch", "dim-grads"):
            assert "feature dims differ: 8 x 64 float32 on rank 0; 8 x 63 float32 on rank 1" in res[case], res[case]
        assert "dtypes differ: 8 x 64 float32 on rank 0; 8 x 64 bfloat16 on rank 1" in res["dtype"], res["dtype"]
        assert "same local batch size" in res["batch"] and "8 x 64 float32 on rank 0; 7 x 64" in res["batch"]
        assert "backends differ" in res["backend"] and "(backend torch) on rank 1" in res["backend"]
        assert ("batch.micro_size is 8 on rank 0 but 4 on rank 1" in res["config"]
                and "output_dir" not in res["config"]), res["config"]
        assert res["after"] > 0  # the same call with agreeing ranks still works


def test_every_group_gets_the_configured_timeout(tmp_path, one_rank):
    """distributed.timeout_s reaches the world group and DeepSpeed's own groups (its data-parallel clone of
    the world had torch's 30-minute gloo default; the world group DeepSpeed's 10 minutes)."""
    from torch.distributed import distributed_c10d as c10d

    from clipforge.train.config import TrainConfig
    from clipforge.train.trainer import Trainer
    from deepspeed.utils import groups
    from test_train import BASE, _merge

    cfg = TrainConfig.from_dict(_merge(BASE, {"output_dir": str(tmp_path), "deepspeed": {"zero_stage": 1},
                                              "distributed": {"timeout_s": 7}}))
    Trainer(cfg)
    timeouts = {pg: pg._get_backend(torch.device("cpu")).options._timeout.total_seconds() for pg in c10d._world.pg_map}
    assert groups._get_data_parallel_group() in timeouts and set(timeouts.values()) == {7.0}, timeouts


def test_config_differences_name_keys_and_ranks():
    base = {"batch.micro_size": 8, "optimizer.lr": 1e-3, "output_dir": "a", "data.path": "/x"}
    assert config_differences([base, dict(base, output_dir="b", **{"data.path": "/y"})]) is None
    text = config_differences([base, dict(base), dict(base, **{"optimizer.lr": 2e-3})])
    assert "optimizer.lr is 0.001 on ranks 0, 1 but 0.002 on rank 2" in text
    text = config_differences([base, {k: v for k, v in base.items() if k != "batch.micro_size"}])
    assert "batch.micro_size is 8 on rank 0 but '<unset>' on rank 1" in text

    # sources may sit at other paths on other nodes; their number and weights must agree
    from clipforge.train.distributed import _flatten

    a = _flatten({"data": {"sources": [{"path": "/x/a", "weight": 3}, {"path": "/x/b"}]}, "model": {"pretrained": "/x/w"}})
    b = _flatten({"data": {"sources": [{"path": "/y/a", "weight": 3}, {"path": "/y/b"}]}, "model": {"pretrained": "/y/w"}})
    assert config_differences([a, b]) is None
    c = _flatten({"data": {"sources": [{"path": "/x/a", "weight": 1}, {"path": "/x/b"}]}, "model": {"pretrained": "/x/w"}})
    assert "data.sources" in config_differences([a, c])


# ------------------------------------------------------------------------------ task B: nodes
def test_two_nodes_train_like_one_process_and_resume_after_one_dies(tmp_path, straight):
    """`deepspeed --no_ssh --node_rank N` twice on this machine (2 nodes x 1 rank) trains with the losses
    of one process. SIGKILL node 1 (its launcher's whole process group) after step 3 of a run that
    checkpoints every 2 steps: node 0 exits non-zero well within distributed.timeout_s, with a message;
    the pair relaunched with --resume auto continues from the last complete checkpoint to the losses of
    the straight run and ends cleanly."""
    config = write_config(tmp_path, "killed", **SECTIONS, checkpointing={"every_steps": 2, "save_final": False},
                          distributed={"timeout_s": TIMEOUT_S})
    out = tmp_path / "killed"
    port = free_port()
    procs = start_nodes(tmp_path, config, port)
    try:
        wait_for_step(out, 3, procs)
        os.killpg(procs[1].pid, signal.SIGKILL)  # the node: launcher, launch.py and the rank
        killed = time.monotonic()
        rc0 = procs[0].wait(timeout=TIMEOUT_S + 60)
        waited = time.monotonic() - killed
    finally:
        kill_all(procs, groups=True)
    log0 = (tmp_path / "node0.log").read_text()
    assert rc0 != 0 and waited < TIMEOUT_S + 10, (rc0, waited, log0[-3000:])
    assert "clipforge train: rank 0 failed: a collective failed (a peer rank died" in log0, log0[-3000:]
    rows = read_metrics(out)
    reached = rows[-1]["step"]
    assert 3 <= reached < MAX_STEPS, "the run was to be killed mid-way"
    assert "nnodes=2, num_local_procs=1, node_rank=1" in (tmp_path / "node1.log").read_text()  # two launchers
    assert_losses_close(rows, straight[:reached])  # two nodes, the losses of one process
    assert_no_shm_left(port)  # node 0's rank removed this host's buffers of the group, the killed rank's too

    port = free_port()
    procs = start_nodes(tmp_path, config, port, "--resume", "auto", name="resumed")
    try:
        rcs = wait_all(procs)
    finally:
        kill_all(procs, groups=True)
    log0 = (tmp_path / "resumed0.log").read_text()
    assert rcs == [0, 0], log0[-3000:]
    # the last complete checkpoint: step `reached` rounded down to even, or the one before when the kill
    # came while that one was written (step `reached` even: its row is logged before its checkpoint)
    resumed = re.search(r"resumed from (\S+) at step (\d+)", log0)
    assert resumed and resumed.group(1).startswith(str(out / "checkpoints")), log0[-3000:]
    assert int(resumed.group(2)) in {reached // 2 * 2, reached - 2 if reached % 2 == 0 else -1}, (reached, resumed)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    assert_losses_close(rows, straight)
    assert (out / "model.safetensors").exists()
    assert_no_shm_left(port)


# ------------------------------------------------------------------------ the rank scripts
def _raise(marker: str, config: str) -> None:
    """One rank of the failure test: the real training loop; rank 1 raises during step 2 and then stays
    alive (as a rank stuck in its teardown would) until the test kills it."""
    import torch.distributed as dist

    from clipforge.train import train
    from clipforge.train.config import TrainConfig
    from clipforge.train.distributed import init_distributed

    init_distributed()

    def hook(trainer):
        if trainer.step == 1 and dist.get_rank() == 1:
            with open(marker, "w") as f:
                f.write(repr(time.time()))
            raise RuntimeError("injected failure at step 2")

    try:
        train(TrainConfig.load(config), grad_hook=hook)
    except RuntimeError:
        if dist.get_rank() == 1:
            time.sleep(600)
        raise


def _disagree(out: str) -> None:
    """One rank of the mismatch test: loss calls whose inputs differ across the 2 ranks, and the run config
    check; each rank writes what it got to OUT<rank>.json."""
    import torch.distributed as dist

    from clipforge.config import ConfigError
    from clipforge.loss import contrastive_loss, contrastive_loss_and_grads
    from clipforge.train.config import TrainConfig
    from clipforge.train.distributed import check_same_config

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    img, txt = torch.randn(8, 64), torch.randn(8, 64)
    cases = {
        "dim-cpp": lambda: contrastive_loss(img[:, :63 + (rank == 0)], txt[:, :63 + (rank == 0)], 10.0,
                                            group=dist.group.WORLD, backend="cpp"),
        "dim-torch": lambda: contrastive_loss(img[:, :63 + (rank == 0)], txt[:, :63 + (rank == 0)], 10.0,
                                              group=dist.group.WORLD, backend="torch"),
        "dim-grads": lambda: contrastive_loss_and_grads(img[:, :63 + (rank == 0)], txt[:, :63 + (rank == 0)], 10.0,
                                                        group=dist.group.WORLD),
        "dtype": lambda: contrastive_loss(img.to(torch.bfloat16 if rank else torch.float32),
                                          txt.to(torch.bfloat16 if rank else torch.float32), 10.0,
                                          group=dist.group.WORLD, backend="chunked"),
        "batch": lambda: contrastive_loss(img[:8 - rank], txt[:8 - rank], 10.0, group=dist.group.WORLD),
        "backend": lambda: contrastive_loss(img, txt, 10.0, group=dist.group.WORLD,
                                            backend="torch" if rank else "cpp"),
        "config": lambda: check_same_config(TrainConfig.from_dict(
            {"batch": {"micro_size": 4 if rank else 8}, "output_dir": f"runs/{rank}"}).to_dict()),
    }
    results = {}
    for name, call in cases.items():
        try:
            call()
            results[name] = None
        except (ValueError, ConfigError) as exc:
            results[name] = str(exc)
    results["after"] = float(contrastive_loss(img, txt, 10.0, group=dist.group.WORLD))
    with open(f"{out}{rank}.json", "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "raise":
    _raise(sys.argv[2], sys.argv[4])  # raise MARKER --config CONFIG
if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "disagree":
    _disagree(sys.argv[2])  # disagree OUT
