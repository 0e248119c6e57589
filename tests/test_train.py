"""The DeepSpeed trainer on CPU: gradient caching, ZeRO 1/2/3 on 2 gloo ranks against one process,
resume, the logit-scale clamp, non-finite losses, and the `deepspeed` launcher itself.

One-process runs go through `clipforge.train.main` in this process (a 1-rank gloo group); 2-rank runs
are two `python -m clipforge.train` processes with the launcher's environment variables.
"""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from clipforge.train.distributed import free_port

pytest.importorskip("deepspeed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5

BASE = {
    "model": {"name": "tiny-vit", "overrides": {}},
    "data": {"num_samples": 256, "num_classes": 8, "context_length": 12},
    "batch": {"global_size": 16, "micro_size": 16},
    "optimizer": {"lr": 2.0e-3, "grad_clip": 1.0},
    "schedule": {"warmup_steps": 1, "total_steps": 6},
    "checkpointing": {"every_steps": 0, "save_final": False},
    "logging": {"tensorboard": False, "progress_bar": False, "plot": False},
    "max_steps": 3,
    "seed": 3,
}


def _merge(base: dict, extra: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for key, value in extra.items():
        if isinstance(value, dict):
            out[key] = _merge(out.get(key, {}), value)
        else:
            out[key] = value
    return out


def write_config(tmp_path, name: str, **sections) -> str:
    path = tmp_path / f"{name}.yaml"
    data = _merge(BASE, sections)
    data["output_dir"] = str(tmp_path / name)
    path.write_text(yaml.safe_dump(data))
    return str(path)


def read_metrics(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_weights(out_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(out_dir, "model.safetensors"))


def assert_weights_close(a: dict, b: dict, atol=TOL):
    assert a.keys() == b.keys()
    worst = max(((k, (a[k] - b[k]).abs().max().item()) for k in a), key=lambda kv: kv[1])
    assert worst[1] <= atol, f"largest weight difference {worst[1]:.3g} in {worst[0]}"


def assert_losses_close(a: list[dict], b: list[dict]):
    la, lb = [r["loss"] for r in a], [r["loss"] for r in b]
    assert len(la) == len(lb) and None not in la and None not in lb
    diffs = [abs(x - y) for x, y in zip(la, lb)]
    assert max(diffs) <= TOL, f"per-step losses differ: {la} vs {lb}"


@pytest.fixture(scope="module")
def one_rank():
    """A 1-rank gloo group in this process for in-process runs, removed after this module."""
    import torch.distributed as dist

    from clipforge.train.distributed import init_distributed

    created = not dist.is_initialized()
    init_distributed()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second OpenMP thread only spins, and badly on a busy machine
    yield
    torch.set_num_threads(threads)
    if created and dist.is_initialized():
        dist.destroy_process_group()


def run_main(config: str, *args) -> int:
    from clipforge.train import main

    state = torch.get_rng_state()
    try:
        return main(["--config", config, *args])
    finally:
        torch.set_rng_state(state)


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_two_ranks(config: str, *args, script=("-m", "clipforge.train"), extra=(), timeout=240):
    """Two ranks of `script` (default: python -m clipforge.train) with the launcher's environment."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = _env()
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        cmd = [sys.executable, *script, *extra, "--config", config, *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
    # each rank unlinks DeepSpeed's RAM-backed shared-memory buffers (69 MB each) it made for this run
    import glob

    leaked = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_127.0.0.1_{port}_*")
    assert not leaked, f"the run left {leaked} behind"
    return outputs


def straight_run(tmp, sections: dict) -> list[dict]:
    """The metrics of an uninterrupted in-process run of `sections` (for interrupted runs to equal)."""
    assert run_main(write_config(tmp, "straight", **sections)) == 0
    rows = read_metrics(tmp / "straight")
    assert [r["step"] for r in rows] == list(range(1, sections["max_steps"] + 1))
    return rows


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, one_rank):
    """One process, the whole global batch of 16 in one forward (no caching), ZeRO 0, 3 steps."""
    tmp = tmp_path_factory.mktemp("reference")
    config = write_config(tmp, "ref")
    assert run_main(config) == 0
    out = tmp / "ref"
    return read_metrics(out), read_weights(out)


def test_metrics_and_outputs(reference_run, tmp_path):
    metrics, weights = reference_run
    assert [r["step"] for r in metrics] == [1, 2, 3]
    for row in metrics:
        for key in ("step", "loss", "lr", "logit_scale", "samples_per_s"):
            assert isinstance(row[key], (int, float)), key
        assert row["samples_per_s"] > 0 and not row["skipped"] and row["step_applied"] is True
    # warm-up of one step then cosine over 6: lr = 2e-3 * (1, cos(0)=1, ...)
    assert metrics[0]["lr"] == pytest.approx(2e-3)
    assert metrics[2]["lr"] < metrics[1]["lr"]
    assert metrics[0]["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-2)
    assert weights["logit_scale"].shape == ()  # OpenAI's key and shape survive DeepSpeed


def test_trained_weights_load_with_clipforge(reference_run, tmp_path):
    import clipforge

    _, weights = reference_run
    model = clipforge.create_model("tiny-vit", **BASE["model"]["overrides"])
    missing = model.load_state_dict(weights, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys


def test_gradient_caching_matches_full_batch(reference_run, tmp_path, one_rank):
    """Micro-batch 4 (4 cached forwards, one step) == micro-batch 16 (one forward) after 3 steps."""
    config = write_config(tmp_path, "cached", batch={"micro_size": 4})
    assert run_main(config) == 0
    metrics, weights = read_metrics(tmp_path / "cached"), read_weights(tmp_path / "cached")
    ref_metrics, ref_weights = reference_run
    assert_losses_close(metrics, ref_metrics)
    assert_weights_close(weights, ref_weights)
    # the runs trained (a test that cannot fail would pass on frozen weights too)
    import clipforge

    torch.manual_seed(BASE["seed"])
    init = clipforge.create_model("tiny-vit", **BASE["model"]["overrides"]).state_dict()
    moved = max((weights[k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-3
    assert len({round(r["loss"], 6) for r in metrics}) == 3


def reference_gradients(cfg) -> dict:
    """Plain autograd of the reference loss over the whole first global batch, one process."""
    import clipforge
    from clipforge import reference
    from clipforge.data.synthetic import SyntheticPairs

    torch.manual_seed(cfg.seed)  # the trainer's initial weights
    model = clipforge.create_model(cfg.model.name, **cfg.model_overrides())
    text = model.config.text
    data = SyntheticPairs(cfg.data, image_size=model.config.vision.image_size, vocab_size=text.vocab_size,
                          context_length=text.context_length, global_batch=cfg.batch.global_size)
    images, tokens = data.next_batch()
    loss = reference.siglip_loss if cfg.loss.kind == "siglip" else reference.contrastive_loss
    loss(*model(images, tokens)).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_gradients_close(got: dict, want: dict):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] is not None, f"no gradient for {name}"
        assert got[name].shape == want[name].shape, name
        err = (got[name] - want[name]).abs().max().item()
        assert err <= 1e-6 + 1e-4 * want[name].abs().max().item(), f"{name}: gradient off by {err:.3g}"
    # the scale's (and SigLIP's bias's) gradient is counted once, not once per micro-batch or rank
    for name in ("logit_scale", "logit_bias"):
        if name in want:
            assert got[name].item() == pytest.approx(want[name].item(), rel=1e-4), name


def capture_first_gradients(trainer) -> dict:
    captured = {}

    def hook(t):
        if not captured:
            captured.update(t.full_gradients())

    trainer.grad_hook = hook
    trainer.train_step()
    return captured


@pytest.mark.parametrize("micro, grad_checkpointing, backend, kind",
                         [(16, False, "auto", "clip"), (4, False, "auto", "clip"), (1, False, "auto", "clip"),
                          (4, True, "auto", "clip"), (4, False, "torch", "clip"),
                          (16, False, "auto", "siglip"), (4, False, "auto", "siglip"), (4, False, "torch", "siglip")])
def test_step_gradient_equals_full_batch_gradient(tmp_path, one_rank, micro, grad_checkpointing, backend, kind):
    """What DeepSpeed steps with is the plain gradient of the loss over the global batch, whatever the
    micro-batch (1 = sixteen cached forwards), with activation checkpointing on or off, with the chunked
    C++ loss (auto on CPU) or the PyTorch one; for SigLIP's loss too, bias included."""
    from clipforge.train.config import TrainConfig
    from clipforge.train.trainer import Trainer

    cfg = TrainConfig.from_dict(_merge(BASE, {"batch": {"micro_size": micro}, "output_dir": str(tmp_path),
                                              "model": {"grad_checkpointing": grad_checkpointing},
                                              "loss": {"backend": backend, "kind": kind}}))
    trainer = Trainer(cfg)
    assert trainer.module.transformer.grad_checkpointing is grad_checkpointing
    # SigLIP's initialisation (t = 10, b = -10); CLIP's model has no bias
    assert (trainer.module.logit_bias is not None) is (kind == "siglip")
    if kind == "siglip":
        assert trainer.logit_scale() == pytest.approx(10.0) and trainer.logit_bias() == -10.0
    assert_gradients_close(capture_first_gradients(trainer), reference_gradients(cfg))


def test_the_run_follows_the_configured_schedule(tmp_path, one_rank):
    """schedule.kind reaches the optimizer: const-cooldown with a 1-step warm-up, flat, then a linear
    cool-down over the last 2 of 4 steps (the metrics log the rate each step used)."""
    rows = straight_run(tmp_path, dict(max_steps=4, schedule={"kind": "const-cooldown", "warmup_steps": 1,
                                                              "total_steps": 4, "cooldown_steps": 2}))
    assert [r["lr"] for r in rows] == pytest.approx([2e-3, 2e-3, 2e-3, 1e-3], rel=1e-9)


def test_gradient_caching_replays_rng(one_rank, tmp_path):
    """With randomness inside the forward, the replayed micro-batches must draw the same numbers."""
    from clipforge.train.config import TrainConfig
    from clipforge.train.trainer import Trainer

    def noisy(module, inputs, output):  # a dropout-like draw on the image features
        return output + 0.1 * torch.randn_like(output)

    results = []
    for micro in (16, 4):
        cfg = TrainConfig.from_dict(_merge(BASE, {"batch": {"micro_size": micro}, "output_dir": str(tmp_path)}))
        trainer = Trainer(cfg)
        torch.manual_seed(123)
        images, tokens = trainer.data.next_batch()
        handle = trainer.module.visual.register_forward_hook(noisy)
        trainer.train_step((images, tokens))
        handle.remove()
        results.append(trainer.full_state_dict())
    # same RNG stream consumed in the same order: micro-batch 4 equals one forward of 16 only if the
    # noise of each replayed micro-batch equals the noise its cached forward drew
    full, cached = results
    assert_weights_close(cached, full, atol=1e-4)


@pytest.mark.parametrize("stage, micro, kind", [(1, 8, "clip"), (2, 4, "clip"), (3, 4, "clip"),
                                               (2, 4, "siglip"), (3, 8, "siglip")])
def test_zero_two_ranks_match_one_process(reference_run, tmp_path, one_rank, stage, micro, kind):
    """2 gloo ranks, ZeRO 1/2/3 (micro-batch 8: no caching; 4: caching), 3 steps of the training loop,
    with CLIP's loss and with SigLIP's (loss.kind: siglip, the model's logit bias trained too):
    - the reduced gradient DeepSpeed steps with at step 1 equals one process's plain autograd gradient
      over the global batch (the loss's cross-rank convention, DeepSpeed's average, 1/GAS accounted for);
    - per-step losses and final weights equal the 1-process run's within 1e-5."""
    from clipforge.train.config import TrainConfig

    config = write_config(tmp_path, f"zero{stage}", batch={"micro_size": micro}, deepspeed={"zero_stage": stage},
                          loss={"kind": kind})
    grads = tmp_path / "grads.pt"
    run_two_ranks(config, script=[os.path.abspath(__file__), "probe"], extra=[str(grads)])
    assert_gradients_close(torch.load(grads, weights_only=True), reference_gradients(TrainConfig.load(config)))
    out = tmp_path / f"zero{stage}"
    ds = json.loads((out / "deepspeed_config.json").read_text())
    assert ds["gradient_accumulation_steps"] == 16 // (2 * micro) and ds["zero_optimization"]["stage"] == stage
    ref_metrics, ref_weights = reference_run
    if kind == "siglip":  # its own one-process run (no caching, ZeRO 0)
        assert run_main(write_config(tmp_path, "ref", loss={"kind": kind})) == 0
        ref_metrics, ref_weights = read_metrics(tmp_path / "ref"), read_weights(tmp_path / "ref")
        bias = [r["logit_bias"] for r in ref_metrics]
        assert bias[0] != -10.0 and len(set(bias)) == 3  # the bias trains
        assert [r["logit_bias"] for r in read_metrics(out)] == pytest.approx(bias, abs=TOL)
    assert_losses_close(read_metrics(out), ref_metrics)
    assert_weights_close(read_weights(out), ref_weights)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_two_ranks_clamp_logit_scale(tmp_path, stage):
    """On 2 ranks the clamp reaches ZeRO's partitioned fp32 copy (ZeRO 3 pads the 1-element scale with
    one element per rank): step 1 ends at 100; step 2 starts from ln(100) and this batch lowers it.
    The checkpoint of step 2 carries the model (gathered under ZeRO 3): `clipforge.load(dir)` gives the
    final weights; under ZeRO 3 DeepSpeed's module state holds only placeholders and is refused."""
    import clipforge
    from clipforge.model.weights import CheckpointError

    config = write_config(tmp_path, "clamp", model={"overrides": {"init_logit_scale": 4.7}}, max_steps=2,
                          batch={"micro_size": 4}, deepspeed={"zero_stage": stage},
                          checkpointing={"every_steps": 2, "keep_last": 1, "save_final": True})
    run_two_ranks(config)
    scales = [r["logit_scale"] for r in read_metrics(tmp_path / "clamp")]
    assert scales[0] == pytest.approx(100.0, rel=1e-6)
    assert 99.0 < scales[1] < 100.0 - 1e-3
    final = read_weights(tmp_path / "clamp")
    assert final["logit_scale"].item() < 4.6052
    ckpt = tmp_path / "clamp" / "checkpoints" / "step_000002"
    loaded = clipforge.load(str(ckpt)).state_dict()  # the same step as the final weights: equal bit for bit
    assert loaded.keys() == final.keys() and all(torch.equal(loaded[k], final[k]) for k in final)
    if stage == 3:
        states = sorted((ckpt / "ds").glob("*model_states.pt"))
        assert states
        for path in states:
            with pytest.raises(CheckpointError, match="empty placeholders.*ZeRO stage 3"):
                clipforge.load(str(path), model_name="tiny-vit")
        # a checkpoint without model.safetensors (written before it existed) falls back to that state
        os.remove(ckpt / "model.safetensors")
        for kwargs in ({}, {"model_name": "tiny-vit"}):
            with pytest.raises(CheckpointError, match="empty placeholders.*ZeRO stage 3"):
                clipforge.load(str(ckpt), **kwargs)


DIGITS_PER_CLASS = 5


def write_digit_folder(root, size: int) -> str:
    """An ImageFolder of scikit-learn's real digit scans (classes zero..nine, DIGITS_PER_CLASS each),
    ink on paper, upscaled from 8x8 to `size`."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    d = load_digits()
    for label, name in enumerate(names):
        os.makedirs(os.path.join(root, name))
        for i in np.flatnonzero(d.target == label)[:DIGITS_PER_CLASS]:
            ink = (255 - d.images[i] * 255 / 16).astype(np.uint8)
            Image.fromarray(ink).resize((size, size), Image.BILINEAR).convert("RGB").save(
                os.path.join(root, name, f"{i:04d}.png"))
    return str(root)


def test_intermediate_checkpoints_evaluate_like_the_final_model(tmp_path, capsys):
    """2 ranks, ZeRO 2, 4 steps, a checkpoint every 2: `clipforge eval --model <checkpoint dir>` reports
    exactly what the final model.safetensors does at the same step; step 2 is another model; DeepSpeed's
    module state loads given a model name and is refused without one; an incomplete checkpoint and the
    checkpoints/ directory itself are refused in one sentence."""
    import itertools

    import clipforge
    from clipforge import cli
    from clipforge.model.config import get_preset
    from clipforge.model.weights import CheckpointError

    config = write_config(tmp_path, "ckpt", batch={"micro_size": 8}, deepspeed={"zero_stage": 2}, max_steps=4,
                          checkpointing={"every_steps": 2, "keep_last": 2, "save_final": True})
    run_two_ranks(config)
    out = tmp_path / "ckpt"
    ckpts = out / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["step_000002", "step_000004"]
    assert all((ckpts / n / "model.safetensors").is_file() for n in os.listdir(ckpts))
    data = write_digit_folder(tmp_path / "digits", get_preset("tiny-vit").vision.image_size)  # 32
    reports = itertools.count()

    def evaluate(model, *extra, rc=0):
        report = tmp_path / f"report{next(reports)}.json"
        argv = ["eval", "--model", str(model), *extra, "--task", "zeroshot", "--data", data,
                "--templates", "a handwritten {}", "--out", str(report)]
        assert cli.main(argv) == rc, capsys.readouterr().err
        if rc:
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1, err
            return err
        rep = json.loads(report.read_text())
        assert rep["images"] == 10 * DIGITS_PER_CLASS and "confusion_matrix" in rep
        return {k: v for k, v in rep.items() if k not in ("model", "confusion_png")}

    step4 = evaluate(ckpts / "step_000004")
    assert step4 == evaluate(out / "model.safetensors")
    assert step4 == evaluate(out)  # the run's output directory: its final model.safetensors
    evaluate(ckpts / "step_000002")
    w2, w4 = (clipforge.load(str(ckpts / n)).state_dict() for n in ("step_000002", "step_000004"))
    assert any(not torch.equal(w2[k], w4[k]) for k in w4)
    final = read_weights(out)
    assert all(torch.equal(w4[k], final[k]) for k in final)
    # DeepSpeed's module state (ZeRO 2: full fp32 weights, logit_scale of shape (1,)): needs a model name
    states = ckpts / "step_000004" / "ds" / "mp_rank_00_model_states.pt"
    assert step4 == evaluate(states, "--model-name", "tiny-vit")
    err = evaluate(states, rc=2)
    assert "stores no model config" in err and "--model-name" in err and str(out / "config.yaml") in err
    ds = clipforge.load(str(states), model_name="tiny-vit").state_dict()
    assert ds["logit_scale"].shape == () and all(torch.equal(ds[k], final[k]) for k in final)
    # a checkpoint written before checkpoints carried model.safetensors: the directory falls back to it
    old = tmp_path / "old" / "step_000004"
    shutil.copytree(ckpts / "step_000004", old)
    os.remove(old / "model.safetensors")
    assert step4 == evaluate(old, "--model-name", "tiny-vit")
    with pytest.raises(CheckpointError, match="stores no model config"):
        clipforge.load(str(old))
    # refused: a checkpoint whose write was interrupted, a directory of checkpoints
    os.remove(old / "COMPLETE")
    assert "its write was interrupted" in evaluate(old, rc=2)
    err = evaluate(ckpts, rc=2)
    assert "directory of training checkpoints" in err and err.endswith(str(ckpts / "step_000004"))



@pytest.mark.parametrize("stage, kind", [(1, "clip"), (3, "clip"), (3, "siglip")])
def test_resume_matches_straight_run(tmp_path, one_rank, stage, kind):
    """6 steps straight == 3 steps, then --resume auto for 3 more; an interrupted checkpoint is ignored.
    Under SigLIP's loss the bias resumes too, and the run's model loads with it."""
    sections = dict(batch={"micro_size": 8}, deepspeed={"zero_stage": stage}, max_steps=6, loss={"kind": kind},
                    checkpointing={"every_steps": 3, "keep_last": 2, "save_final": True})
    straight = write_config(tmp_path, "straight", **sections)
    assert run_main(straight) == 0
    resumed = write_config(tmp_path, "resumed", **sections)
    assert run_main(resumed, "--max-steps", "3") == 0
    ckpts = tmp_path / "resumed" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["step_000003"]
    # a later checkpoint whose write was interrupted: renamed into place but never marked complete,
    # and a temp dir a crash left behind; --resume auto must skip both
    shutil.copytree(ckpts / "step_000003", ckpts / "step_000005")
    os.remove(ckpts / "step_000005" / "COMPLETE")
    os.makedirs(ckpts / ".tmp-step_000004" / "ds")
    (ckpts / ".tmp-step_000004" / "trainer_rank0.pt").write_bytes(b"truncated")
    assert run_main(resumed, "--resume", "auto") == 0
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert_losses_close(a, b)
    assert [r["lr"] for r in a] == pytest.approx([r["lr"] for r in b], abs=1e-12)
    assert_weights_close(read_weights(tmp_path / "straight"), read_weights(tmp_path / "resumed"), atol=1e-6)
    if kind == "siglip":
        import clipforge

        model = clipforge.load(str(tmp_path / "resumed"))  # the run's model.safetensors, bias and all
        assert model.logit_bias.item() == pytest.approx(float(read_weights(tmp_path / "straight")["logit_bias"]))
        assert clipforge.load(str(ckpts / "step_000003")).logit_bias.item() != model.logit_bias.item()
    # the last 2 complete checkpoints are kept, the crash's temp dir is cleaned up; the incomplete
    # step_000005 (not ours to judge) stays, ignored
    assert sorted(os.listdir(ckpts)) == ["step_000003", "step_000005", "step_000006"]
    # an explicit path to an incomplete checkpoint is refused
    from clipforge.train.checkpoint import CheckpointError, resolve_resume

    with pytest.raises(CheckpointError, match="interrupted"):
        resolve_resume(str(ckpts / "step_000005"), str(ckpts))


def _write_shards(folder, n_shards=2, per_shard=12):
    import io
    import tarfile

    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = torch.Generator().manual_seed(0)
    for s in range(n_shards):
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                color = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=rng))
                buf = io.BytesIO()
                Image.new("RGB", (40, 36), color).save(buf, format="JPEG")
                for ext, payload in (("jpg", buf.getvalue()), ("txt", f"a photo of colour {color}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def _plant_corrupt(tar_path, n_bad: int, n_empty: int) -> None:
    """Append samples a validator must skip: undecodable JPEGs and empty captions."""
    import io
    import tarfile

    with tarfile.open(tar_path, "a") as tar:
        for i in range(n_bad + n_empty):
            bad = i < n_bad
            members = (("jpg", b"\xff\xd8 not really a jpeg"), ("txt", b"a caption")) if bad else \
                (("jpg", _solid_jpeg()), ("txt", b"   "))
            for ext, payload in members:
                info = tarfile.TarInfo(f"planted{i:03d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _solid_jpeg() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 36), (10, 200, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def test_the_summary_counts_steps_samples_and_skips_by_shard(tmp_path, one_rank, capsys):
    """summary.json: steps, samples, checkpoints, and the planted corrupt samples by reason and by shard."""
    _write_shards(tmp_path / "shards")
    _plant_corrupt(tmp_path / "shards" / "00001.tar", n_bad=3, n_empty=2)
    config = write_config(
        tmp_path, "sum", max_steps=3, schedule={"warmup_steps": 1, "total_steps": 3},
        data={"kind": "webdataset", "path": str(tmp_path / "shards"), "loader": "pytorch", "num_workers": 0,
              "cache_dir": str(tmp_path / "cache")},
        batch={"global_size": 8, "micro_size": 4}, checkpointing={"every_steps": 2, "save_final": True})
    assert run_main(config) == 0
    summary = json.loads((tmp_path / "sum" / "summary.json").read_text())
    assert summary["status"] == 0 and summary["step"] == 3 and summary["steps_run"] == 3
    assert summary["samples_seen"] == 24 and summary["samples_per_s"] > 0 and summary["nonfinite_steps_skipped"] == 0
    assert [os.path.basename(p) for p in summary["checkpoints_written"]] == ["step_000002", "step_000003"]
    skipped = summary["data"]["skipped"]
    assert sum(skipped.values()) == 5, skipped
    assert summary["data"]["skipped_by_shard"] == {"00001.tar": skipped}
    err = capsys.readouterr().err
    assert "3 steps (to step 3), 24 samples" in err and "5 samples skipped" in err and "summary.json" in err


def test_a_checkpoint_that_cannot_be_written_leaves_nothing_partial(tmp_path, one_rank, monkeypatch, capsys):
    """A full disk during a checkpoint: one sentence naming it, the partial temporary checkpoint removed,
    the previous checkpoint intact; a resume that then fails leaves the folder's config as it was."""
    from clipforge.train.trainer import Trainer

    config = write_config(tmp_path, "full", max_steps=4, batch={"micro_size": 8},
                          checkpointing={"every_steps": 2, "keep_last": 3})
    real = Trainer.save_checkpoint

    def disk_full(self, path):
        if self.step == 4:
            (open(os.path.join(path, "trainer_rank0.pt"), "wb")).write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 7424 vs 7316")
        return real(self, path)

    monkeypatch.setattr(Trainer, "save_checkpoint", disk_full)
    capsys.readouterr()
    assert run_main(config) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "writing checkpoint" in err and ".tmp-step_000004 failed (RuntimeError: " in err and "a full disk?" in err
    ckpts = tmp_path / "full" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["step_000002"]
    monkeypatch.setattr(Trainer, "save_checkpoint", real)
    before = (tmp_path / "full" / "config.yaml").read_bytes()
    states = ckpts / "step_000002" / "ds" / "mp_rank_00_model_states.pt"
    states.write_bytes(bytes(states.stat().st_size))  # same size, unreadable: the resume itself fails
    assert run_main(config, "--resume", str(ckpts / "step_000002"), "--set", "optimizer.lr=1e-3") == 2
    assert (tmp_path / "full" / "config.yaml").read_bytes() == before


@pytest.mark.parametrize("small", ["path", "eval_path"])
def test_shards_smaller_than_a_batch_stop_at_start_in_one_sentence(tmp_path, one_rank, capsys, small):
    _write_shards(tmp_path / "big", n_shards=1, per_shard=12)
    _write_shards(tmp_path / "small", n_shards=1, per_shard=3)
    data = {"kind": "webdataset", "path": str(tmp_path / ("small" if small == "path" else "big")),
            "eval_path": str(tmp_path / ("small" if small == "eval_path" else "big")), "loader": "pytorch",
            "num_workers": 0, "cache_dir": str(tmp_path / "cache")}
    config = write_config(tmp_path, "small", data=data, batch={"global_size": 8, "micro_size": 8},
                          evaluation={"every_steps": 2, "batches": 1})
    capsys.readouterr()
    assert run_main(config) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"clipforge train: config key 'data.{small}'") and "one global batch of 8" in err[-1]
    assert not os.path.exists(tmp_path / "small" / "metrics.jsonl")  # before the first step


def test_webdataset_shards_train_and_resume(tmp_path, one_rank):
    """Shards through clipforge.data (PyTorch/Pillow loader): 4 steps across an epoch boundary equal
    2 steps + --resume auto for 2 (the loader's position is part of the trainer state)."""
    pytest.importorskip("clipforge.data")
    _write_shards(tmp_path / "shards")
    sections = dict(
        data={"kind": "webdataset", "path": str(tmp_path / "shards"), "loader": "pytorch", "num_workers": 0,
              "cache_dir": str(tmp_path / "cache")},
        batch={"global_size": 8, "micro_size": 4}, max_steps=4, schedule={"warmup_steps": 1, "total_steps": 4},
        checkpointing={"every_steps": 2, "save_final": False})
    straight = write_config(tmp_path, "wds-straight", **sections)
    assert run_main(straight) == 0
    resumed = write_config(tmp_path, "wds-resumed", **sections)
    assert run_main(resumed, "--max-steps", "2") == 0
    assert run_main(resumed, "--resume", "auto") == 0
    a, b = read_metrics(tmp_path / "wds-straight"), read_metrics(tmp_path / "wds-resumed")
    assert [r["step"] for r in a] == [1, 2, 3, 4]  # 24 samples, 3 batches of 8 per epoch: crosses into epoch 2
    assert_losses_close(a, b)
    assert_weights_close(read_weights(tmp_path / "wds-straight"), read_weights(tmp_path / "wds-resumed"), atol=1e-6)


def test_deepspeed_checkpoint_files_load_without_code(tmp_path):
    """DeepSpeed's own files are read with weights_only=True: a pickle that would run code is refused."""
    import pickle

    from clipforge.train.deepspeed_compat import _weights_only_load

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "optim_states.pt"
    torch.save({"optimizer_state_dict": Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        _weights_only_load(str(path))


def test_main_reports_bad_resume_and_batch(tmp_path, one_rank, capsys):
    config = write_config(tmp_path, "bad")
    assert run_main(config, "--resume", str(tmp_path / "nowhere")) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    assert run_main(config, "--set", "batch.micro_size=3") == 2  # 16 is not a multiple of 1 x 3
    assert "'batch.global_size'" in capsys.readouterr().err


def test_resume_survives_a_torn_metrics_log(tmp_path, one_rank):
    """A write cut short (a full disk) leaves a partial last line in metrics.jsonl: --resume auto cuts the
    log back to its last complete record, with a warning, instead of stopping on a JSONDecodeError."""
    config = write_config(tmp_path, "torn", batch={"micro_size": 8}, max_steps=2,
                          checkpointing={"every_steps": 2, "keep_last": 1, "save_final": True})
    assert run_main(config) == 0
    log = tmp_path / "torn" / "metrics.jsonl"
    with open(log, "a") as f:
        f.write('{"step": 3, "loss": 2.07')  # the torn record of a step after the checkpoint
    with pytest.warns(RuntimeWarning, match="line 3 is not a complete record"):
        assert run_main(config, "--resume", "auto", "--max-steps", "3") == 0
    assert [r["step"] for r in read_metrics(tmp_path / "torn")] == [1, 2, 3]


def test_a_damaged_newest_checkpoint_is_skipped_for_the_intact_one(tmp_path, one_rank, capsys):
    """A checkpoint file cut short after the write (a full disk, a lost file): --resume auto warns and
    continues from the newest intact checkpoint; naming the damaged one is refused in one sentence."""
    sections = dict(batch={"micro_size": 8}, max_steps=4, checkpointing={"every_steps": 2, "keep_last": 2})
    config = write_config(tmp_path, "dmg", **sections)
    assert run_main(config) == 0
    ckpts = tmp_path / "dmg" / "checkpoints"
    states = ckpts / "step_000004" / "ds" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    capsys.readouterr()
    assert run_main(config, "--resume", str(ckpts / "step_000004")) == 2
    err = capsys.readouterr().err
    assert "step_000004: this checkpoint is damaged (ds/mp_rank_00_model_states.pt holds" in err
    with pytest.warns(RuntimeWarning, match="step_000004 is damaged .*skipping it"):
        assert run_main(config, "--resume", "auto", "--max-steps", "5") == 0
    out = capsys.readouterr()
    assert "resumed from " + str(ckpts / "step_000002") + " at step 2" in out.out + out.err
    assert [r["step"] for r in read_metrics(tmp_path / "dmg")] == [1, 2, 3, 4, 5]


def test_checkpoints_of_different_runs_never_mix(tmp_path, one_rank, capsys):
    """Two runs sharing a checkpointing.dir: --resume auto in the second folder refuses the first run's
    checkpoints (never continues another run under this config); --force moves them aside; the second
    run's checkpoints carry its id and --resume auto continues them."""
    from clipforge.train.checkpoint import run_of

    shared = str(tmp_path / "shared-ckpts")
    sections = dict(batch={"micro_size": 8}, max_steps=2,
                    checkpointing={"every_steps": 2, "keep_last": 1, "dir": shared})
    first = write_config(tmp_path, "first", **sections)
    assert run_main(first) == 0
    theirs = os.path.join(shared, "step_000002")
    assert run_of(theirs)["output_dir"] == str(tmp_path / "first")
    second = write_config(tmp_path, "second", **sections)
    capsys.readouterr()
    assert run_main(second, "--resume", "auto") == 2
    assert "written by another run" in capsys.readouterr().err
    assert run_main(second, "--force", "--max-steps", "4") == 0  # moves the shared folder aside, starts fresh
    assert run_main(second, "--resume", "auto", "--max-steps", "6") == 0  # its own checkpoints: continues
    assert [r["step"] for r in read_metrics(tmp_path / "second")] == [1, 2, 3, 4, 5, 6]
    own = sorted(os.listdir(shared))
    assert own == ["step_000006"] and run_of(os.path.join(shared, own[0]))["output_dir"] == str(tmp_path / "second")


def test_keep_last_keeps_the_new_checkpoint_and_sets_a_later_timeline_aside(tmp_path):
    """keep_last prunes only checkpoints older than the one just written; after a resume from an older
    checkpoint the later ones are renamed aside (never deleted), so --resume auto cannot jump to them;
    when every checkpoint of the run is damaged, --resume auto refuses instead of restarting from 0."""
    from clipforge.train import checkpoint as ck

    out, d = tmp_path / "out", str(tmp_path / "ck")
    out.mkdir()
    (out / "run_id").write_text("r1\n")

    def write(step):
        path = ck.prepare_tmp(d, step, 0)
        (open(os.path.join(path, "trainer_rank0.pt"), "wb")).write(b"x" * step)
        return ck.finalize(d, step, keep_last=2, output_dir=str(out))

    for step in (100, 200, 300):
        write(step)
    assert sorted(os.listdir(d)) == ["step_000200", "step_000300"]
    assert write(250).endswith("step_000250")  # the run went back to 200 and saved again
    names = sorted(os.listdir(d))
    assert [n for n in names if n.startswith("step_")] == ["step_000200", "step_000250"]
    assert any(n.startswith("abandoned-step_000300") for n in names)
    assert ck.resolve_resume("auto", d, str(out)).endswith("step_000250")
    for name in ("step_000200", "step_000250"):
        with open(os.path.join(d, name, "trainer_rank0.pt"), "ab") as f:
            f.write(b"!")  # both damaged after they were written
    with pytest.raises(ck.CheckpointError, match="every complete checkpoint of this run .* is damaged"):
        with pytest.warns(RuntimeWarning):
            ck.resolve_resume("auto", d, str(out))


def test_a_lock_of_another_host_is_live_while_its_heartbeat_is(tmp_path):
    import json as _json

    from clipforge.train.config import ConfigError, TrainConfig
    from clipforge.train.rundir import LOCK, STALE_S, check_free

    cfg = TrainConfig.from_dict({"output_dir": str(tmp_path / "run")})
    (tmp_path / "run").mkdir()
    lock = tmp_path / "run" / LOCK
    lock.write_text(_json.dumps({"host": "node-b", "pid": 4242, "started": "then"}))
    with pytest.raises(ConfigError, match="in use by another run \\(pid 4242 on node-b"):
        check_free(cfg, None, False)
    old = lock.stat().st_mtime - STALE_S - 1
    os.utime(lock, (old, old))  # no heartbeat for longer than STALE_S: that run is gone
    check_free(cfg, None, False)
    lock.write_text('{"host": "node-b", "pi')  # its writer died mid-write
    check_free(cfg, None, False)


def test_trainer_state_loads_with_weights_only(tmp_path, one_rank):
    from clipforge.train.checkpoint import load_trainer_state, save_trainer_state
    from clipforge.train.config import TrainConfig
    from clipforge.train.trainer import Trainer

    trainer = Trainer(TrainConfig.from_dict(_merge(BASE, {"output_dir": str(tmp_path)})))
    trainer.train_step()
    save_trainer_state(str(tmp_path), 0, trainer.state_dict())
    state = load_trainer_state(str(tmp_path), 0)  # torch.load(weights_only=True) inside
    assert state["step"] == 1 and state["samples_seen"] == 16 and state["data"] == {"position": 16}
    assert torch.equal(state["rng"]["torch"], torch.get_rng_state())


@pytest.mark.parametrize("stage", [0, 1])
def test_logit_scale_clamped_in_model_and_master_copy(tmp_path, one_rank, stage):
    """The scale starts above ln(100); after each step it is ln(100) in the model and in ZeRO's fp32 copy."""
    import math

    from deepspeed.utils import safe_get_full_fp32_param

    from clipforge.train.config import TrainConfig
    from clipforge.train.trainer import Trainer

    cfg = TrainConfig.from_dict(_merge(BASE, {
        "model": {"overrides": {"init_logit_scale": 4.9}}, "deepspeed": {"zero_stage": stage},
        "output_dir": str(tmp_path)}))
    trainer = Trainer(cfg)
    assert trainer.logit_scale() > 130
    metrics = trainer.train_step()  # one AdamW step moves the scale by ~lr: still far above ln(100)
    assert metrics["logit_scale"] == pytest.approx(100.0, rel=1e-6)
    assert trainer.module.logit_scale.item() == pytest.approx(math.log(100), abs=1e-7)
    master = safe_get_full_fp32_param(trainer.module.logit_scale)
    if stage:  # ZeRO steps an fp32 copy: it must be clamped too
        assert master is not None and float(master) == pytest.approx(math.log(100), abs=1e-7)
    # the second step starts from ln(100) (not from the unclamped 4.9 an unclamped master copy would
    # hold) and this batch's gradient lowers the scale: strictly below 100 afterwards
    metrics = trainer.train_step()
    assert 99.0 < metrics["logit_scale"] < 100.0 - 1e-3


def test_nonfinite_losses_skip_then_stop(tmp_path, one_rank):
    from clipforge.train.config import TrainConfig
    from clipforge.train.trainer import NonFiniteLossError, Trainer

    cfg = TrainConfig.from_dict(_merge(BASE, {"max_nonfinite_steps": 3, "batch": {"micro_size": 8},
                                              "output_dir": str(tmp_path)}))
    trainer = Trainer(cfg)
    before = trainer.full_state_dict()
    images, tokens = trainer.data.next_batch()
    bad = images.clone()
    bad[3] = float("nan")
    for i in range(2):
        metrics = trainer.train_step((bad, tokens))
        assert metrics["skipped"] and metrics["loss"] is None and metrics["nonfinite_total"] == i + 1
    assert_weights_close(trainer.full_state_dict(), before, atol=0)  # skipped steps change nothing
    metrics = trainer.train_step((images, tokens))  # a good step resets the count
    assert not metrics["skipped"] and trainer.nonfinite_in_row == 0
    trainer.train_step((bad, tokens))
    trainer.train_step((bad, tokens))
    with pytest.raises(NonFiniteLossError, match="3 steps in a row.*optimizer.lr"):
        trainer.train_step((bad, tokens))


def _tree(root) -> dict:
    """{relative path: bytes} of every file below root."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def test_a_used_folder_is_never_clobbered(tmp_path, one_rank, capsys):
    """A second run into a used folder is refused without a flag (nothing touched); with --force the first
    run's files are moved aside byte for byte; a run that then diverges (lr 1e30: NaN losses from step 2)
    stops with exit 1 and writes no model.safetensors, and the earlier model still loads."""
    import glob

    import clipforge

    config = write_config(tmp_path, "run", max_steps=2)
    assert run_main(config) == 0
    first = _tree(tmp_path / "run")
    assert "model.safetensors" in first and "metrics.jsonl" in first and ".clipforge.lock" not in first
    capsys.readouterr()
    assert run_main(config) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and "--resume auto" in err and "--force" in err
    assert _tree(tmp_path / "run") == first
    diverging = write_config(tmp_path, "run", max_steps=12, max_nonfinite_steps=3, optimizer={"lr": 1e30})
    assert run_main(diverging, "--force") == 1
    err = capsys.readouterr().err
    assert "no model.safetensors written (it stopped on non-finite losses)" in err
    aside, = glob.glob(str(tmp_path / "run.previous-*"))
    assert "--force: moved the earlier run to " + aside in err
    assert _tree(aside) == first
    assert not (tmp_path / "run" / "model.safetensors").exists()
    clipforge.load(os.path.join(aside, "model.safetensors"))  # finite: loads
    # --resume and --force together contradict each other
    assert run_main(config, "--force", "--resume", "auto") == 2
    assert "pass one of them" in capsys.readouterr().err


def test_a_second_live_run_in_the_folder_is_refused(tmp_path, one_rank, capsys):
    """The folder's lock: a live process's lock refuses the run; a dead one's is taken over."""
    import json as _json
    import socket

    from clipforge.train.rundir import LOCK

    config = write_config(tmp_path, "locked", max_steps=1)
    (tmp_path / "locked").mkdir()
    lock = tmp_path / "locked" / LOCK
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(_json.dumps({"host": socket.gethostname(), "pid": sleeper.pid, "started": "now"}))
        assert run_main(config) == 2
        err = capsys.readouterr().err
        assert f"in use by another run (pid {sleeper.pid}" in err and not (tmp_path / "locked" / "metrics.jsonl").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert run_main(config) == 0  # the dead process's lock is stale: taken over
    assert "took over the stale lock" in capsys.readouterr().err and not lock.exists()


@pytest.mark.parametrize("dtype", ["bf16"])
def test_low_precision_caching_matches_full_batch(tmp_path, one_rank, dtype):
    """bf16 (DeepSpeed's bf16 optimizer with fp32 master weights) on CPU: gradient caching still gives
    the full-batch losses, within bf16's resolution."""
    runs = []
    for micro in (16, 4):
        config = write_config(tmp_path, f"{dtype}{micro}", precision={"dtype": dtype}, batch={"micro_size": micro},
                              deepspeed={"zero_stage": 2})
        assert run_main(config) == 0
        runs.append([r["loss"] for r in read_metrics(tmp_path / f"{dtype}{micro}")])
    assert runs[0] == pytest.approx(runs[1], abs=2e-2)
    assert all(math.isfinite(x) for x in runs[0])


@pytest.mark.parametrize("dtype, micro", [("bf16", 16), ("bf16", 4), ("fp32", 4)])
def test_loss_receives_features_in_the_model_precision(tmp_path, one_rank, dtype, micro):
    """Under precision.dtype bf16 the loss gets the model's bf16 features (as OpenCLIP's autocast hands its
    loss; on a GPU that is the Triton row of clipforge.ops' table), plain and gradient-cached; fp32 stays
    fp32. The scale is always fp32."""
    from clipforge.train.config import TrainConfig
    from clipforge.train.trainer import Trainer

    cfg = TrainConfig.from_dict(_merge(BASE, {"batch": {"micro_size": micro}, "output_dir": str(tmp_path),
                                              "precision": {"dtype": dtype}, "deepspeed": {"zero_stage": 2}}))
    trainer = Trainer(cfg)
    seen = []

    def spy(fn):
        def call(img, txt, scalars):
            seen.append((img.dtype, txt.dtype, [x.dtype for x in scalars]))
            return fn(img, txt, scalars)
        return call

    # the plain step's loss, and the cached step's loss with its (fp32) feature gradients
    trainer.contrastive_loss = spy(trainer.contrastive_loss)
    trainer.contrastive_loss_and_grads = spy(trainer.contrastive_loss_and_grads)
    metrics = trainer.train_step()
    want = torch.bfloat16 if dtype == "bf16" else torch.float32
    assert seen == [(want, want, [torch.float32])] and math.isfinite(metrics["loss"])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype, stage", [("bf16", 2), ("fp16", 1), ("fp16", 3)])
def test_gpu_mixed_precision_runs(tmp_path, one_rank, dtype, stage):
    """On a GPU: bf16 and fp16 (dynamic loss scaling) with ZeRO, gradient caching, the fused loss."""
    config = write_config(tmp_path, "gpu", precision={"dtype": dtype}, batch={"micro_size": 4},
                          deepspeed={"zero_stage": stage}, max_steps=4, schedule={"warmup_steps": 1, "total_steps": 4})
    assert run_main(config) == 0
    rows = read_metrics(tmp_path / "gpu")
    assert len(rows) == 4 and all(r["loss"] is not None and math.isfinite(r["loss"]) for r in rows)
    if dtype == "fp16":
        assert all(r["loss_scale"] and r["loss_scale"] >= 1 for r in rows)
    assert rows[-1]["logit_scale"] <= 100.0 + 1e-3


def test_deepspeed_launcher_runs_on_cpu(reference_run, tmp_path):
    """`deepspeed --num_gpus 2 --module clipforge.train` on a machine without GPUs: 2 gloo ranks."""
    launcher = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    config = write_config(tmp_path, "launched", batch={"micro_size": 4}, deepspeed={"zero_stage": 1},
                          max_steps=2, logging={"tensorboard": True, "plot": True, "progress_bar": True})
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "clipforge.train",
           "--config", config]
    proc = subprocess.run(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    out = tmp_path / "launched"
    ds = json.loads((out / "deepspeed_config.json").read_text())
    assert ds["gradient_accumulation_steps"] == 2  # 16 = 2 ranks x 4 x 2: the launcher made 2 ranks
    metrics = read_metrics(out)
    assert_losses_close(metrics, reference_run[0][:2])
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out / "tensorboard"))


def _probe(out: str, config: str) -> None:
    """One rank of the 2-rank ZeRO test: the real training loop, and rank 0 saves the gradient
    DeepSpeed steps with at step 1."""
    import torch.distributed as dist

    from clipforge.train.distributed import init_distributed
    from clipforge.train import train
    from clipforge.train.config import TrainConfig

    init_distributed()
    captured = {}

    def hook(trainer):
        if trainer.step == 0:  # the counter advances after the optimizer step
            captured.update(trainer.full_gradients())

    assert train(TrainConfig.load(config), grad_hook=hook) == 0
    if dist.get_rank() == 0:
        torch.save(captured, out)
    dist.barrier()


def _damage(shards: str, config: str) -> None:
    """One rank of the hostile-data test: the real training loop; during step 3 rank 0 deletes shard
    00002.tar and overwrites the JPEG data of every sample of shard 00001 in place (same sizes, so the
    validated catalog still points at them), then both ranks go on."""
    import torch.distributed as dist

    from clipforge.train.distributed import init_distributed
    from clipforge.train import train
    from clipforge.train.config import TrainConfig

    init_distributed()

    def hook(trainer):
        if trainer.step == 2:
            if dist.get_rank() == 0:
                os.remove(os.path.join(shards, "00002.tar"))
                shard = trainer.data.loader.catalog.shard(1)
                with open(os.path.join(shards, "00001.tar"), "r+b") as f:
                    for row in shard.table:
                        f.seek(int(row["img_off"]) + 2)
                        f.write(b"\x00" * (int(row["img_size"]) - 2))
            dist.barrier()

    assert train(TrainConfig.load(config), grad_hook=hook) == 0


@pytest.mark.parametrize("loader", ["pytorch", "dali"])
def test_corrupt_images_and_a_deleted_shard_mid_run_do_not_stop_two_ranks(tmp_path, loader):
    """A bad sample never stops a run: images that break and a shard that vanishes mid-run are
    replaced (the batches stay full, every rank in step), warned about and counted in data_stats.json."""
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    shards = tmp_path / "shards"
    _write_shards(shards, n_shards=3, per_shard=12)
    config = write_config(tmp_path, "hostile", data={"kind": "webdataset", "path": str(shards), "loader": loader,
                                                     "num_workers": 0 if loader == "pytorch" else 1,
                                                     "cache_dir": str(tmp_path / "cache")},
                          batch={"global_size": 8, "micro_size": 4}, max_steps=10,
                          schedule={"warmup_steps": 1, "total_steps": 10})
    outputs = run_two_ranks(config, script=[os.path.abspath(__file__), "damage"], extra=[str(shards)])
    metrics = read_metrics(tmp_path / "hostile")
    assert [r["step"] for r in metrics] == list(range(1, 11)) and all(math.isfinite(r["loss"]) for r in metrics)
    report = json.loads((tmp_path / "hostile" / "data_stats.json").read_text())["runtime"]
    assert report["vanished_shards"] >= 1 and report["decode_error"] >= 1, report
    assert report["replaced"] >= report["decode_error"], report
    assert "00002.tar is gone from disk" in "".join(outputs)
    assert "clipforge train: data:" in outputs[0] and "vanished_shards" in outputs[0]


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "probe":
    _probe(sys.argv[2], sys.argv[4])  # probe OUT --config CONFIG
if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "damage":
    _damage(sys.argv[2], sys.argv[4])  # damage SHARDS --config CONFIG
