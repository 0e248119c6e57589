"""Run configuration: strict loading, --set overrides, impossible combinations, the DeepSpeed section,
the optimizer's parameter groups and the LR schedule. No DeepSpeed engine is started here."""
import glob
import json
import math
import os

import pytest
import torch
import yaml

from clipforge.train.config import ConfigError, TrainConfig
from clipforge.config import apply_override

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize(
    "data, key",
    [
        ({"optimizer": {"lrr": 1e-3}}, "optimizer.lrr"),
        ({"deepspeed": {"zero_stage": 3, "stage3_prefetch": 1}}, "deepspeed.stage3_prefetch"),
        ({"batchsize": 4}, "batchsize"),
        ({"precision": {"dtype": "fp8"}}, "precision.dtype"),
        ({"batch": {"micro_size": "four"}}, "batch.micro_size"),
        ({"optimizer": {"betas": [0.9]}}, "optimizer.betas"),
        ({"schedule": {"warmup_steps": 50, "total_steps": 10}}, "schedule.warmup_steps"),
        # ZeRO stage 3 with options it cannot serve, and offloads without the stage that holds them
        ({"deepspeed": {"zero_stage": 3, "round_robin_gradients": True}}, "deepspeed.round_robin_gradients"),
        ({"deepspeed": {"zero_stage": 2, "offload_param": "cpu"}}, "deepspeed.offload_param"),
        ({"deepspeed": {"zero_stage": 0, "offload_optimizer": "cpu"}}, "deepspeed.offload_optimizer"),
        ({"deepspeed": {"zero_stage": 3, "offload_optimizer": "cpu"}, "optimizer": {"impl": "torch"}},
         "deepspeed.offload_optimizer"),
        ({"deepspeed": {"zero_stage": 5}}, "deepspeed.zero_stage"),
        ({"data": {"kind": "webdataset"}}, "data.path"),
        ({"model": {"overrides": {"grad_checkpointing": True}}}, "model.overrides.grad_checkpointing"),
    ],
)
def test_bad_configs_are_refused_naming_the_key(tmp_path, data, key):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError, match=f"'{key}'") as info:
        TrainConfig.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("world, micro", [(3, 4), (2, 5), (32, 1), (7, 1)])
def test_global_batch_must_divide_by_world_times_micro(world, micro):
    cfg = TrainConfig.from_dict({"batch": {"global_size": 16, "micro_size": micro}})
    with pytest.raises(ConfigError, match="'batch.global_size'"):
        cfg.validate(world)


@pytest.mark.parametrize("world, micro, gas", [(1, 16, 1), (1, 4, 4), (2, 4, 2), (4, 1, 4), (16, 1, 1)])
def test_gradient_accumulation_steps(world, micro, gas):
    cfg = TrainConfig.from_dict({"batch": {"global_size": 16, "micro_size": micro}})
    assert cfg.validate(world) == gas
    ds = cfg.deepspeed_config(world)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        16, micro, gas)
    assert ds["train_batch_size"] == micro * gas * world


def test_set_overrides_reach_every_level(tmp_path):
    path = write(tmp_path, {"optimizer": {"lr": 1e-3}, "deepspeed": {"zero_stage": 1}})
    cfg = TrainConfig.load(path, ["optimizer.lr=5e-4", "deepspeed.zero_stage=3", "optimizer.betas=[0.9, 0.95]",
                                  "model.overrides.quick_gelu=false", "max_steps=17", "checkpointing.dir=/x/y"])
    assert cfg.optimizer.lr == pytest.approx(5e-4) and isinstance(cfg.optimizer.lr, float)
    assert cfg.deepspeed.zero_stage == 3
    assert cfg.optimizer.betas == (0.9, 0.95)
    assert cfg.model.overrides == {"quick_gelu": False}
    assert cfg.max_steps == 17 and cfg.checkpoint_dir == "/x/y"
    with pytest.raises(ConfigError, match="'optimizer.learning_rate'"):
        TrainConfig.load(path, ["optimizer.learning_rate=1"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_override({}, "optimizer.lr")


def test_yaml_reads_exponent_floats(tmp_path):
    # PyYAML's YAML 1.1 would read 5e-4 as a string
    cfg = TrainConfig.load(write(tmp_path, {}), ["optimizer.lr=5e-4"])
    assert cfg.optimizer.lr == 5e-4
    path = tmp_path / "raw.yaml"
    path.write_text("optimizer:\n  lr: 4e-4\n  eps: 1e-8\n")
    cfg = TrainConfig.load(str(path))
    assert (cfg.optimizer.lr, cfg.optimizer.eps) == (4e-4, 1e-8)


def test_deepspeed_section_generated_from_config():
    cfg = TrainConfig.from_dict({
        "batch": {"global_size": 64, "micro_size": 8},
        "precision": {"dtype": "fp16", "initial_scale_power": 12},
        "deepspeed": {"zero_stage": 3, "offload_param": "cpu"},
        "optimizer": {"grad_clip": 0.5},
    })
    ds = cfg.deepspeed_config(2)
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and ds["fp16"]["initial_scale_power"] == 12
    assert not ds["bf16"]["enabled"]
    assert ds["gradient_clipping"] == 0.5
    json.dumps(ds)  # serialisable as DeepSpeed JSON


def test_deepspeed_json_file_is_used_and_checked(tmp_path):
    ds = {"train_batch_size": 16, "zero_optimization": {"stage": 2, "overlap_comm": True}, "bf16": {"enabled": True}}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    path = write(tmp_path, {"deepspeed": {"config_file": "ds.json", "zero_stage": 2}, "precision": {"dtype": "bf16"},
                            "batch": {"global_size": 16, "micro_size": 4}})
    cfg = TrainConfig.load(path)
    out = cfg.deepspeed_config(2)
    assert out["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert out["gradient_accumulation_steps"] == 2 and out["train_micro_batch_size_per_gpu"] == 4
    # the file disagrees with the run config: refused with the file's key named
    (tmp_path / "ds.json").write_text(json.dumps({**ds, "train_batch_size": 32}))
    with pytest.raises(ConfigError, match="'train_batch_size'"):
        TrainConfig.load(path).deepspeed_config(2)
    (tmp_path / "ds.json").write_text(json.dumps({**ds, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="'zero_optimization.stage'"):
        TrainConfig.load(path).deepspeed_config(2)
    (tmp_path / "ds.json").write_text(json.dumps({**ds, "bf16": {"enabled": False}}))
    with pytest.raises(ConfigError, match="'bf16.enabled'"):
        TrainConfig.load(path).deepspeed_config(2)


# example configs and the world size each is written for
EXAMPLES = {
    "tiny-cpu.yaml": 2,
    "demo.yaml": 2,
    "vit-b-32-32k-8xa100.yaml": 8,
    "vit-b-32-32k-128xa100.yaml": 128,
    "vit-l-14-v100-fp16.yaml": 64,
    "vit-bigg-14-32k-64xa100.yaml": 64,
    "tiny-vit-siglip-digits.yaml": 2,
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_configs_load_and_validate(name):
    path = os.path.join(ROOT, "engine", "assets", name) if name == "demo.yaml" else os.path.join(ROOT, "configs", name)
    cfg = TrainConfig.load(path)
    ds = cfg.deepspeed_config(EXAMPLES[name])
    assert ds["train_batch_size"] == cfg.batch.global_size
    if "32k" in name:
        assert cfg.batch.global_size == 32768
    if "v100" in name:
        assert cfg.precision.dtype == "fp16"
        assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # from configs/deepspeed-zero2-fp16.json
        assert ds["zero_optimization"]["overlap_comm"] and ds["gradient_accumulation_steps"] == 8


def test_the_siglip_demo_config_is_the_demo_with_the_sigmoid_loss():
    """configs/tiny-vit-siglip-digits.yaml (README, "Choosing the loss") is the demo's job but for the loss:
    the same model, data, batch, optimizer and schedule, so the two runs compare the losses alone."""
    demo = TrainConfig.load(os.path.join(ROOT, "engine", "assets", "demo.yaml")).to_dict()
    siglip = TrainConfig.load(os.path.join(ROOT, "configs", "tiny-vit-siglip-digits.yaml")).to_dict()
    assert siglip["loss"] == {**demo["loss"], "kind": "siglip"} and demo["loss"]["kind"] == "clip"
    for key in ("loss", "output_dir"):
        siglip.pop(key), demo.pop(key)
    assert siglip == demo


@pytest.mark.parametrize("sections, key", [
    ({"data": {"kind": "synthetic", "resampled": True}}, "data.resampled"),
    ({"data": {"kind": "synthetic", "sources": [{"path": "a"}]}}, "data.sources"),
    ({"evaluation": {"zeroshot": {"every_steps": 10}}}, "evaluation.zeroshot.every_steps"),
])
def test_keys_that_would_be_ignored_are_refused(sections, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        TrainConfig.from_dict(sections)


def test_every_run_config_is_listed():
    names = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))}
    run_configs = {n for n in names if "max_steps" in open(os.path.join(ROOT, "configs", n)).read()}
    assert run_configs <= set(EXAMPLES)


def test_adam_hyperparameters_follow_the_model_family():
    cfg = TrainConfig()
    assert cfg.adam_hyperparameters(is_resnet=False) == ((0.9, 0.98), 1e-6)
    assert cfg.adam_hyperparameters(is_resnet=True) == ((0.9, 0.999), 1e-8)
    cfg = TrainConfig.from_dict({"optimizer": {"betas": [0.8, 0.9], "eps": 1e-5}})
    assert cfg.adam_hyperparameters(is_resnet=True) == ((0.8, 0.9), 1e-5)


@pytest.mark.parametrize("preset", ["tiny-vit", "tiny-rn"])
def test_no_weight_decay_on_gains_biases_norms_and_scale(preset):
    import clipforge
    from clipforge.train.trainer import param_groups

    model = clipforge.create_model(preset)
    decay, no_decay = param_groups(model, 0.2)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed.isdisjoint(kept) and decayed | kept == set(names.values())
    assert "logit_scale" in kept
    assert {"token_embedding.weight", "positional_embedding", "text_projection"} <= decayed
    if preset == "tiny-vit":
        assert "visual.class_embedding" in kept and {"visual.proj", "visual.conv1.weight"} <= decayed
    norm_params = {f"{m}.{n}" for m, mod in model.named_modules()
                   if isinstance(mod, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)) for n, _ in mod.named_parameters()}
    assert norm_params and norm_params <= kept
    params = dict(model.named_parameters())
    for name in kept:
        assert name in norm_params or name.endswith("bias") or params[name].ndim < 2, name
    for name in decayed:
        assert params[name].ndim >= 2 and name not in norm_params, name


def test_lr_schedule_warmup_then_cosine():
    from clipforge.train.schedule import lr_factor

    warm, total = 4, 20
    values = [lr_factor(s, warm, total, 0.1) for s in range(total + 3)]
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert values[4] == pytest.approx(1.0)
    mid = warm + (total - warm) // 2
    assert values[mid] == pytest.approx(0.1 + 0.9 * 0.5)
    assert values[total] == pytest.approx(0.1) and values[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))
    assert lr_factor(0, 0, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(5, 0, 10, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


@pytest.mark.parametrize("kind, cooldown, power, floor", [
    ("cosine", 0, 1.0, 0.0), ("const", 0, 1.0, 0.0), ("const-cooldown", 7, 1.0, 0.0), ("const-cooldown", 7, 2.0, 0.1),
    ("const-cooldown", 16, 0.5, 0.0),
])
def test_lr_schedules_equal_open_clip_trains(kind, cooldown, power, floor):
    """schedule.kind cosine / const / const-cooldown give open_clip_train's rates step for step (its
    --lr-cooldown-end is min_lr_ratio x lr here; its cosine ends at 0, min_lr_ratio's default)."""
    scheduler = pytest.importorskip("open_clip_train.scheduler")
    from clipforge.train.schedule import lr_factor

    class Opt:
        param_groups = [{"lr": 0.0}]

    base, warm, total = 5e-4, 4, 20
    if kind == "cosine":
        theirs = scheduler.cosine_lr(Opt, base, warm, total)
    elif kind == "const":
        theirs = scheduler.const_lr(Opt, base, warm, total)
    else:
        theirs = scheduler.const_lr_cooldown(Opt, base, warm, total, cooldown, power, floor * base)
    ours = [base * lr_factor(s, warm, total, floor, kind, cooldown, power) for s in range(total)]
    assert ours == pytest.approx([theirs(s) for s in range(total)], rel=1e-12, abs=1e-15)
    if kind == "const-cooldown":
        assert ours[total - cooldown - 1] == base and ours[-1] < base


@pytest.mark.parametrize("schedule, key", [
    ({"kind": "linear"}, "schedule.kind"),
    ({"kind": "const-cooldown"}, "schedule.cooldown_steps"),
    ({"kind": "const-cooldown", "cooldown_steps": 8, "warmup_steps": 5}, "schedule.cooldown_steps"),
    ({"kind": "const-cooldown", "cooldown_steps": 3, "cooldown_power": 0}, "schedule.cooldown_power"),
    ({"kind": "cosine", "cooldown_steps": 3}, "schedule.cooldown_steps"),
    ({"kind": "const", "min_lr_ratio": 0.5}, "schedule.min_lr_ratio"),
])
def test_schedule_keys_are_checked(schedule, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        TrainConfig.from_dict({"schedule": schedule, "max_steps": 10})


def test_main_refuses_a_bad_config_with_the_key(tmp_path, capsys):
    from clipforge.train import main

    path = write(tmp_path, {"optimizer": {"weight_dacay": 0.1}})
    assert main(["--config", path]) == 2
    err = capsys.readouterr().err
    assert "'optimizer.weight_dacay'" in err and "known keys" in err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_clipforge_cli_train_subcommand(tmp_path, capsys):
    from clipforge.cli import main

    path = write(tmp_path, {"batch": {"global_size": 0}})
    assert main(["train", "--config", path, "--max-steps", "2"]) == 2
    assert "'batch.global_size'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--resume" in out and "--set" in out and "--max-steps" in out and "--output-dir" in out


@pytest.mark.parametrize("key, value", [("optimizer.lr", ".inf"), ("optimizer.lr", ".nan"), ("optimizer.eps", "-.inf"),
                                        ("schedule.min_lr_ratio", ".nan")])
def test_non_finite_numbers_are_refused_by_key(tmp_path, key, value):
    from clipforge.config import ConfigError
    from clipforge.train.config import TrainConfig

    path = tmp_path / "c.yaml"
    path.write_text("model: {name: tiny-vit}\n")
    with pytest.raises(ConfigError, match=rf"'{key}' must be a finite number"):
        TrainConfig.load(str(path), [f"{key}={value}"])


def test_every_data_field_reaches_the_loader(tmp_path):
    """The run config's data section IS the loaders' DataConfig: each field set in YAML arrives there."""
    import dataclasses

    from clipforge.data.config import DataConfig
    from clipforge.model import get_preset
    from clipforge.train.trainer import build_data_source

    values = {"kind": "webdataset", "path": f"{tmp_path / 'shards'}::{tmp_path / 'more'}", "sources": None,
              "upsampling_factors": [3, 1], "resampled": True, "eval_path": str(tmp_path / "held-out"),
              "loader": "synthetic", "num_workers": 3, "token_workers": 1, "cache_dir": str(tmp_path / "cache"),
              "seed": 7, "shuffle": False, "batch_size": 4, "drop_last": True, "random_area": [0.5, 0.8],
              "random_aspect_ratio": [0.5, 2.0], "max_pixels": 123456, "prefetch": 3, "device": "cpu",
              "num_samples": 40, "num_classes": 5, "context_length": 9, "interpolation": "bilinear",
              "mean": [0.5, 0.25, 0.75], "std": [0.2, 0.3, 0.4]}
    assert set(values) == {f.name for f in dataclasses.fields(DataConfig)}, "a DataConfig field is not covered"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"data": values, "batch": {"global_size": 8, "micro_size": 2}}))
    cfg = TrainConfig.load(str(path))
    cfg.validate(world_size=2)
    source = build_data_source(cfg, get_preset("tiny-vit"), rank=1, world_size=2)
    reached = source.loader.cfg
    for name, value in values.items():
        want = tuple(value) if isinstance(value, list) else value
        assert getattr(reached, name) == want, name
    assert source.eval_cfg.path == values["eval_path"] and source.eval_cfg.seed == 7
    # the synthetic source takes the same section
    cfg.data.kind = "synthetic"
    pairs = build_data_source(cfg, get_preset("tiny-vit"), rank=0, world_size=2)
    assert pairs.cfg is cfg.data and pairs.next_batch()[1].shape == (4, 9)


def test_data_batch_size_and_drop_last_must_agree_with_the_run(tmp_path):
    cfg = TrainConfig.from_dict({"data": {"batch_size": 3}, "batch": {"global_size": 8, "micro_size": 2}})
    with pytest.raises(ConfigError, match=r"data.batch_size.*\(4\)"):
        cfg.validate(world_size=2)
    cfg = TrainConfig.from_dict({"data": {"drop_last": False}, "batch": {"global_size": 8, "micro_size": 2}})
    with pytest.raises(ConfigError, match="data.drop_last"):
        cfg.validate(world_size=2)
    with pytest.raises(ConfigError, match="data.num_workers"):
        TrainConfig.from_dict({"data": {"num_workers": -1}})
