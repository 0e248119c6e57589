"""The training preflight: a run that cannot finish is refused before anything starts.

Every case runs `clipforge.train.main` in ONE subprocess (a probe that calls main() once per case, and
reports its exit code, what it printed on stderr, whether DeepSpeed was imported or a process group
made, and what the output folder holds). Missing packages are simulated per case with
`sys.modules[name] = None` (what makes `import name` raise ImportError). Each case must give exit code 2,
one line on stderr naming the key, file or package, no traceback, and nothing started or written.
"""
import io
import json
import math
import os
import subprocess
import sys
import tarfile

import pytest
import yaml
from PIL import Image

from clipforge.train.config import ConfigError, TrainConfig

from test_train import BASE  # the tiny run the trainer's tests use


def write_tar(path, n: int) -> str:
    """A webdataset tar of n (jpg, txt) samples (n = 0: an empty, valid tar)."""
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (24, 24), (10 * i % 250, 90, 160)).save(buf, "JPEG")
            for ext, data in (("jpg", buf.getvalue()), ("txt", f"sample {i}".encode())):
                info = tarfile.TarInfo(f"k{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


WDS = ["data.kind=webdataset", "data.loader=pytorch", "data.num_workers=0"]

# name -> (--set overrides, modules blocked, what the one stderr line must name); {root} is the case folder
CASES = {
    "no_tensorboard": (["logging.tensorboard=true"], ["tensorboard"], ["tensorboard", "logging.tensorboard=false"]),
    "no_matplotlib": (["logging.plot=true"], ["matplotlib"], ["matplotlib", "logging.plot=false"]),
    "no_tqdm": (["logging.progress_bar=true"], ["tqdm"], ["tqdm", "logging.progress_bar=false"]),
    "no_dali": (WDS[:1] + ["data.path={shards}", "data.loader=dali"], ["nvidia.dali"],
                ["nvidia-dali", "data.loader"]),
    "unknown_model": (["model.name=tiny-vitt"], [], ["'model.name'", "tiny-vitt", "tiny-rn, tiny-vit"]),
    "bad_override": (["model.overrides.embed_dim=0"], [], ["'model.overrides.embed_dim'"]),
    "unknown_override": (["model.overrides.visionn={{}}"], [], ["'model.overrides.visionn'"]),
    "bad_attention": (["model.overrides.attention_backend=flash9"], [], ["'model.overrides.attention_backend'"]),
    "unknown_loss": (["loss.kind=sigmoid"], [], ["'loss.kind'", "clip, siglip"]),
    "bias_without_siglip": (["model.overrides.init_logit_bias=-10"], [], ["'model.overrides.init_logit_bias'",
                                                                         "loss.kind: siglip"]),
    "siglip_without_bias": (["loss.kind=siglip", "model.overrides.init_logit_bias=null"], [],
                            ["'model.overrides.init_logit_bias'", "null"]),
    "bad_bias": (["loss.kind=siglip", "model.overrides.init_logit_bias=.inf"], [],
                 ["'model.overrides.init_logit_bias'", "finite"]),
    "context_too_long": (["data.context_length=100"], [], ["'data.context_length'", "77"]),
    "missing_shards": (WDS + ["data.path={root}/nowhere"], [], ["data.path", "nowhere"]),
    "missing_brace_shard": (WDS + ["data.path={root}/s{{00000..00001}}.tar"], [], ["data.path", "s00000.tar"]),
    "empty_folder": (WDS + ["data.path={root}/empty"], [], ["data.path", "empty"]),
    "empty_tar": (WDS + ["data.path={root}/empty.tar"], [], ["'data.path'", "empty.tar", "no sample"]),
    "not_a_tar": (WDS + ["data.path={root}/garbage.tar"], [], ["garbage.tar", "not a readable tar"]),
    "missing_eval_shards": (WDS + ["data.path={shards}", "data.eval_path={root}/heldout"], [],
                            ["data.eval_path", "heldout"]),
    "eval_without_eval_path": (WDS + ["data.path={shards}", "evaluation.every_steps=1"], [],
                               ["'evaluation.every_steps'", "data.eval_path"]),
    "eval_batches_0": (["evaluation.batches=0"], [], ["'evaluation.batches'"]),
    "num_samples_0": (["data.num_samples=0"], [], ["'data.num_samples'"]),
    "num_classes_0": (["data.num_classes=0"], [], ["'data.num_classes'"]),
    "chunk_size_0": (["loss.chunk_size=0"], [], ["'loss.chunk_size'"]),
    "lr_nan": (["optimizer.lr=.nan"], [], ["'optimizer.lr'"]),
    "lr_negative": (["optimizer.lr=-1e-3"], [], ["'optimizer.lr'"]),
    "eps_nan": (["optimizer.eps=.nan"], [], ["'optimizer.eps'"]),
    "eps_negative": (["optimizer.eps=-1e-8"], [], ["'optimizer.eps'"]),
    "seed_negative_webdataset": (WDS + ["data.path={shards}", "data.seed=-1"], [], ["'data.seed'"]),
    "bad_yaml_set": (["optimizer.lr=[1,"], [], ["optimizer.lr", "not valid YAML"]),
    "num_workers_negative": (["data.num_workers=-1"], [], ["'data.num_workers'"]),
    "eval_every_negative": (["evaluation.every_steps=-1"], [], ["'evaluation.every_steps'"]),
    "weight_decay_negative": (["optimizer.weight_decay=-0.1"], [], ["'optimizer.weight_decay'"]),
    "total_steps_negative": (["schedule.warmup_steps=0", "schedule.total_steps=-5"], [], ["'schedule.total_steps'"]),
    "output_dir_empty": ([], [], ["'output_dir'", "--output-dir"]),
    "output_dir_is_a_file": ([], [], ["'output_dir'", "afile", "--output-dir"]),
    "output_dir_under_a_file": ([], [], ["'output_dir'", "afile"]),
    "existing_output_kept": (["model.name=nope"], [], ["'model.name'"]),
    "resume_missing": ([], [], ["--resume", "no-such-checkpoint"]),
    "world_size_2_rank_0": ([], [], ["'batch.global_size'", "2 x 16"]),
    "world_size_2_rank_1": ([], [], ["'batch.global_size'", "2 x 16"]),
    "bad_yaml_file": ([], [], ["bad.yaml", "not valid YAML"]),
    "fp16_on_cpu": (["precision.dtype=fp16"], [], ["'precision.dtype'", "fp16"]),
}

PROBE = r'''
import contextlib, io, json, os, sys, traceback
import torch.distributed as dist
from clipforge.train import main

for case in json.load(open(sys.argv[1])):
    saved = {m: sys.modules.get(m, "absent") for m in case["block"]}
    for m in case["block"]:
        sys.modules[m] = None  # `import m` now raises ImportError
    env = dict(os.environ)
    os.environ.update(case["env"])
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rc = main(case["argv"])
    except BaseException:
        rc = "raised"
        err.write(traceback.format_exc())
    finally:
        os.environ.clear()
        os.environ.update(env)
        for m, mod in saved.items():
            if mod == "absent":
                sys.modules.pop(m, None)
            else:
                sys.modules[m] = mod
    out = case["out"]
    listing = sorted(os.listdir(out)) if os.path.isdir(out) else (open(out).read() if os.path.isfile(out) else None)
    print("RESULT " + json.dumps({"name": case["name"], "rc": rc, "stderr": err.getvalue(),
                                  "deepspeed": "deepspeed" in sys.modules, "group": dist.is_initialized(),
                                  "out": listing}), flush=True)
'''


def _case_argv(name: str, root: str, shards: str, config: str):
    sets, block, _ = CASES[name]
    out = os.path.join(root, "out")
    env, argv = {}, ["--config", config, "--output-dir", out]
    if name == "output_dir_empty":
        argv[-1] = ""
    elif name == "output_dir_is_a_file":
        out = argv[-1] = os.path.join(root, "afile")
        with open(out, "w") as f:
            f.write("not a folder")
    elif name == "output_dir_under_a_file":
        with open(os.path.join(root, "afile"), "w") as f:
            f.write("x")
        out = argv[-1] = os.path.join(root, "afile", "run")
    elif name == "existing_output_kept":
        os.makedirs(out)
        with open(os.path.join(out, "keep.txt"), "w") as f:
            f.write("an earlier run")
    elif name == "resume_missing":
        argv += ["--resume", os.path.join(root, "no-such-checkpoint")]
    elif name.startswith("world_size_2"):
        env = {"WORLD_SIZE": "2", "RANK": name[-1], "LOCAL_RANK": name[-1]}
    elif name == "bad_yaml_file":
        argv[1] = os.path.join(root, "bad.yaml")
        with open(argv[1], "w") as f:
            f.write("model:\n  name: [tiny-vit\n")
    os.makedirs(os.path.join(root, "empty"), exist_ok=True)
    for item in sets:
        argv += ["--set", item.format(root=root, shards=shards)]
    return {"name": name, "argv": argv, "block": block, "env": env, "out": out}


def probe_inputs(tmp):
    """(a folder of one good shard, the tiny run config) for the probe's cases."""
    shards = tmp / "shards"
    shards.mkdir()
    write_tar(shards / "00000.tar", 20)
    config = tmp / "run.yaml"
    config.write_text(yaml.safe_dump(BASE))
    return shards, config


def run_probe(tmp, cases: list[dict]) -> dict:
    """Every case through clipforge.train's main in one subprocess (PROBE) -> {case name: its result}."""
    (tmp / "cases.json").write_text(json.dumps(cases))
    (tmp / "probe.py").write_text(PROBE)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, str(tmp / "probe.py"), str(tmp / "cases.json")], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = (json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return {row["name"]: row for row in rows}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preflight")
    shards, config = probe_inputs(tmp)
    cases = []
    for name in CASES:
        root = tmp / name
        root.mkdir()
        write_tar(root / "empty.tar", 0)
        (root / "garbage.tar").write_bytes(b"this is not a tar file " * 40)
        cases.append(_case_argv(name, str(root), str(shards), str(config)))
    if _cuda():
        cases = [c for c in cases if c["name"] != "fp16_on_cpu"]
    return run_probe(tmp, cases)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize("name", list(CASES))
def test_refused_before_anything_starts(results, name):
    if name == "fp16_on_cpu" and _cuda():
        pytest.skip("fp16 runs on this machine's GPU")
    row = results[name]
    lines = row["stderr"].splitlines()
    assert row["rc"] == 2, row["stderr"]
    assert len(lines) == 1 and lines[0].startswith("clipforge train: "), row["stderr"]
    assert "Traceback" not in row["stderr"]
    for word in CASES[name][2]:
        assert word in lines[0], (word, lines[0])
    # nothing started: DeepSpeed never imported, no process group, the output folder untouched
    assert row["deepspeed"] is False and row["group"] is False
    if name == "existing_output_kept":
        assert row["out"] == ["keep.txt"]
    elif name == "output_dir_is_a_file":
        assert row["out"] == "not a folder"
    else:
        assert row["out"] is None, row["out"]


def test_every_rank_refuses_with_the_same_sentence(results):
    assert results["world_size_2_rank_0"]["stderr"] == results["world_size_2_rank_1"]["stderr"]


# ------------------------------------------------------------------ the ranges, in the configs' check()
@pytest.mark.parametrize("key, value", [
    ("optimizer.lr", math.nan), ("optimizer.lr", math.inf), ("optimizer.eps", 0.0), ("optimizer.weight_decay", math.nan),
    ("optimizer.grad_clip", math.nan), ("loss.chunk_size", -3), ("evaluation.batches", None),
    ("checkpointing.every_steps", -1), ("precision.min_loss_scale", 0.0), ("precision.hysteresis", 0),
    ("deepspeed.reduce_bucket_size", 0), ("data.seed", -2),
])
def test_check_refuses_out_of_range_values_set_in_code(key, value):
    cfg = TrainConfig()
    section, field = key.split(".")
    setattr(getattr(cfg, section), field, value)
    with pytest.raises(ConfigError, match=f"'{key}'"):
        cfg.check()


# -------------------------------------------------------------------------------- what passes
def test_a_sound_run_passes_and_writes_nothing(tmp_path):
    from clipforge.train.preflight import check_shards, preflight

    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "00000.tar", 0)  # an empty shard beside good ones is fine (the catalog skips it)
    write_tar(shards / "00001.tar", 5)
    heldout = tmp_path / "heldout.tar"
    write_tar(heldout, 3)
    out = tmp_path / "out"
    cfg = TrainConfig.from_dict({**BASE, "output_dir": str(out)})
    preflight(cfg, world_size=1)
    cfg = TrainConfig.from_dict({**BASE, "output_dir": str(out), "evaluation": {"every_steps": 2},
                                 "data": {"kind": "webdataset", "path": str(shards), "eval_path": str(heldout),
                                          "loader": "auto", "cache_dir": str(tmp_path / "cache")}})
    preflight(cfg, world_size=1)
    assert check_shards("data.path", str(shards)) == [str(shards / "00000.tar"), str(shards / "00001.tar")]
    assert sorted(os.listdir(tmp_path)) == ["heldout.tar", "shards"]  # no output, checkpoint or cache folder
