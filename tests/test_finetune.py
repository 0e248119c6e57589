"""Fine-tuning and LiT (issue 19, points 1-2): `model.pretrained*` starts a run from weights, `model.lock_*`
freezes towers (train/finetune.py)."""
import os

import pytest
import torch

import clipforge
from clipforge.model.weights import CheckpointError
from clipforge.train.config import ConfigError, TrainConfig

from test_train import (BASE, _merge, assert_losses_close, one_rank, read_metrics, read_weights,  # noqa: F401
                        run_main, run_two_ranks, straight_run, write_config)

pytest.importorskip("deepspeed")

PRETRAIN = dict(max_steps=12, schedule={"warmup_steps": 1, "total_steps": 12})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, one_rank):
    """tiny-vit trained 12 steps on the tests' synthetic pairs: (its metrics, its model.safetensors)."""
    tmp = tmp_path_factory.mktemp("pretrain")
    rows = straight_run(tmp, PRETRAIN)
    return rows, str(tmp / "straight" / "model.safetensors")


def test_fine_tuning_continues_from_the_trained_loss(pretrained, tmp_path, one_rank):
    """A run started from the trained file begins at the trained loss (the first fine-tune loss is within
    the batches' noise of the last training losses, far below a fresh start's); 2 ranks (ZeRO 2, cached)
    begin exactly where 1 process does; a resumed fine-tune continues its own checkpoint, not the file."""
    rows, path = pretrained
    first = [r["loss"] for r in rows]
    sections = dict(model={"pretrained": path}, max_steps=3, schedule={"warmup_steps": 1, "total_steps": 3},
                    checkpointing={"every_steps": 2, "keep_last": 1})
    tuned = straight_run(tmp_path, sections)
    trained_tail = sum(first[-4:]) / 4
    assert first[0] - trained_tail > 0.5  # the pre-training moved the loss (a test that can fail)
    assert abs(tuned[0]["loss"] - trained_tail) < 0.25 * (first[0] - trained_tail), (tuned[0]["loss"], first)
    # the same first loss on 2 ranks, ZeRO 2 with gradient caching
    two = write_config(tmp_path, "two", batch={"micro_size": 4}, deepspeed={"zero_stage": 2}, **sections)
    run_two_ranks(two)
    assert read_metrics(tmp_path / "two")[0]["loss"] == pytest.approx(tuned[0]["loss"], abs=1e-5)
    # resume wins over model.pretrained: 2 steps, then --resume auto for the third equals the straight run
    resumed = write_config(tmp_path, "resumed", **sections)
    assert run_main(resumed, "--max-steps", "2") == 0
    assert run_main(resumed, "--resume", "auto") == 0
    assert_losses_close(read_metrics(tmp_path / "resumed"), tuned)


def test_one_tower_loads_from_its_file(pretrained, tmp_path):
    """pretrained_image takes visual.* from the file and leaves the text tower at its initial weights
    (and pretrained_text the other way round)."""
    from clipforge.train.finetune import load_pretrained

    _, path = pretrained
    trained = clipforge.load(path).state_dict()
    for key, tower in (("pretrained_image", "visual."), ("pretrained_text", "transformer.")):
        torch.manual_seed(0)
        model = clipforge.create_model("tiny-vit")
        init = {k: v.clone() for k, v in model.state_dict().items()}
        cfg = TrainConfig.from_dict({"model": {key: path}})
        assert load_pretrained(model, cfg) == [f"model.{key}: {path}"]
        for name, value in model.state_dict().items():
            mine = name.startswith(tower) or (tower == "transformer." and not name.startswith("visual.")
                                               and name != "logit_scale")
            assert torch.equal(value, trained[name] if mine else init[name]), name


def test_weights_that_do_not_fit_are_refused_by_key(pretrained, tmp_path):
    from clipforge.train.finetune import load_pretrained

    _, path = pretrained
    gelu = clipforge.create_model("tiny-vit", quick_gelu=False)
    clipforge.save(gelu, tmp_path / "gelu.safetensors")
    model = clipforge.create_model("tiny-vit")
    with pytest.raises(CheckpointError, match=r"'model.pretrained'.*GELU model.*quick_gelu: false"):
        load_pretrained(model, TrainConfig.from_dict({"model": {"pretrained": str(tmp_path / "gelu.safetensors")}}))
    wide = clipforge.create_model("tiny-vit", embed_dim=32)
    torch.save(wide.state_dict(), tmp_path / "wide.pt")
    with pytest.raises(CheckpointError, match=r"model.pretrained_text.*mis-shaped keys: text_projection"):
        load_pretrained(model, TrainConfig.from_dict({"model": {"pretrained_text": str(tmp_path / "wide.pt")}}))
    with pytest.raises(ConfigError, match="'model.pretrained' loads the whole model"):
        TrainConfig.from_dict({"model": {"pretrained": path, "pretrained_text": path}})


def test_a_file_with_other_attention_heads_is_refused(tmp_path):
    """No tensor shape says the heads: a clipforge file's config does, and it is checked (a model with the
    other split would run and embed wrongly)."""
    from clipforge.train.finetune import load_pretrained

    clipforge.save(clipforge.create_model("tiny-vit", text={"heads": 4}), tmp_path / "heads4.safetensors")
    for key in ("pretrained", "pretrained_text"):
        cfg = TrainConfig.from_dict({"model": {key: str(tmp_path / "heads4.safetensors")}})
        with pytest.raises(CheckpointError, match=rf"'model.{key}'.*text tower has 4 attention heads.*has 2"):
            load_pretrained(clipforge.create_model("tiny-vit"), cfg)
    cfg = TrainConfig.from_dict({"model": {"pretrained_image": str(tmp_path / "heads4.safetensors")}})
    assert load_pretrained(clipforge.create_model("tiny-vit"), cfg)  # the image tower's heads agree


def test_resuming_with_other_trained_parameters_is_refused_by_key(tmp_path, one_rank, capsys):
    """A checkpoint written without locks, resumed with lock_image (or with another loss.kind): one sentence
    naming what changed, not "damaged files"."""
    sections = dict(max_steps=2, checkpointing={"every_steps": 2, "keep_last": 1})
    config = write_config(tmp_path, "run", **sections)
    assert run_main(config) == 0
    for extra in ({"model": {"lock_image": True}}, {"loss": {"kind": "siglip"}}):
        changed = write_config(tmp_path, "run", **_merge(sections, {**extra, "max_steps": 3}))
        assert run_main(changed, "--resume", "auto") != 0
        err = capsys.readouterr().err
        assert "trained other parameters" in err and "damaged" not in err and "cannot be read" not in err, err


def _optimizer_numel(trainer) -> int:
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    return sum(s["exp_avg"].numel() for s in opt.state.values())


@pytest.mark.parametrize("stage", [0, 2])
def test_lit_locked_parameters_never_move(tmp_path, one_rank, stage):
    """lock_image with its last group (the projection) unlocked, lock_text with 2 groups and frozen norms:
    after 5 steps every locked parameter is bit-identical, the unlocked ones moved, and the optimizer holds
    state for the trainable parameters only."""
    from clipforge.train.trainer import Trainer

    model = {"lock_image": True, "lock_image_unlocked_groups": 1,
             "lock_text": True, "lock_text_unlocked_groups": 2, "lock_text_freeze_norm": True}
    cfg = TrainConfig.from_dict(_merge(BASE, {"model": model, "output_dir": str(tmp_path), "max_steps": 5,
                                              "deepspeed": {"zero_stage": stage}, "batch": {"micro_size": 8}}))
    trainer = Trainer(cfg)
    before = trainer.full_state_dict()
    for _ in range(5):
        trainer.train_step()
    after = trainer.full_state_dict()
    trainable = {"visual.proj", "text_projection", "logit_scale"} | {
        k for k in before if k.startswith("transformer.resblocks.1.") and ".ln_" not in k}
    for name in before:
        moved = not torch.equal(before[name], after[name])
        assert moved is (name in trainable), name
    count = sum(before[k].numel() for k in trainable)
    assert trainer.prepared["trainable"] == count and trainer.prepared["frozen"] == sum(
        v.numel() for v in before.values()) - count
    assert count <= _optimizer_numel(trainer) < count + 4096  # ZeRO 2 pads its flat partition


def test_lock_keys_are_checked_against_the_model(tmp_path):
    from clipforge.train.finetune import check_locks
    from clipforge.train.preflight import check_model

    cfg = TrainConfig.from_dict({"model": {"lock_image": True, "lock_image_unlocked_groups": 5}})
    with pytest.raises(ConfigError, match=r"'model.lock_image_unlocked_groups' is 5.*has 4 lock groups"):
        check_locks(cfg, check_model(cfg))
    cfg = TrainConfig.from_dict({"model": {"name": "tiny-rn", "lock_image": True, "lock_image_unlocked_groups": 1}})
    with pytest.raises(ConfigError, match="ResNet image tower locks whole"):
        check_locks(cfg, check_model(cfg))
    with pytest.raises(ConfigError, match="'model.lock_text_unlocked_groups' / 'model.lock_text_freeze_norm'"):
        TrainConfig.from_dict({"model": {"lock_text_unlocked_groups": 2}})


def test_a_resnet_locked_with_frozen_norms_keeps_its_batchnorm_statistics(one_rank, tmp_path):
    from clipforge.train.finetune import lock_towers

    model = clipforge.create_model("tiny-rn")
    lock_towers(model, TrainConfig.from_dict({"model": {"name": "tiny-rn", "lock_image": True,
                                                        "lock_image_freeze_norm": True}}))
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}
    model.train()
    model.encode_image(torch.randn(2, 3, model.image_size, model.image_size))
    assert stats and all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    assert not any(p.requires_grad for p in model.visual.parameters())


def test_a_missing_pretrained_file_stops_before_start(tmp_path, capsys):
    from clipforge.train import main

    config = write_config(tmp_path, "missing", model={"pretrained": str(tmp_path / "nowhere.pt")})
    assert main(["--config", config]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'model.pretrained'" in err[0] and "nowhere.pt" in err[0]
    assert not os.path.exists(tmp_path / "missing")


def test_lit_on_two_ranks_under_zero_3_equals_one_process(tmp_path, one_rank):
    """Locked towers under ZeRO 3 (weights partitioned, frozen ones too) on 2 ranks with gradient caching:
    only the unlocked parameters move, and the run equals one process's within 1e-5."""
    from test_train import assert_weights_close

    sections = dict(model={"lock_image": True, "lock_image_unlocked_groups": 1, "lock_text": True,
                           "lock_text_unlocked_groups": 1}, max_steps=3)
    one = straight_run(tmp_path, sections)
    two = write_config(tmp_path, "two", deepspeed={"zero_stage": 3}, batch={"micro_size": 4}, **sections)
    run_two_ranks(two)
    assert_losses_close(read_metrics(tmp_path / "two"), one)
    torch.manual_seed(BASE["seed"])
    init = clipforge.create_model("tiny-vit").state_dict()
    final = read_weights(tmp_path / "two")
    assert sorted(k for k in init if not torch.equal(init[k], final[k])) == ["logit_scale", "text_projection",
                                                                             "visual.proj"]
    assert_weights_close(final, read_weights(tmp_path / "straight"))
