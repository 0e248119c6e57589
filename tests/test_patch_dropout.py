"""FLIP patch dropout (model.patch_dropout / vision.patch_dropout): what the vision transformer keeps in
training, that evaluation keeps everything, that the dropped patches of a sample do not depend on the
micro-batch or the number of ranks (nor on gradient caching's replay or a resume), and the refusals."""
import pytest
import torch

import clipforge
from clipforge.config import ConfigError
from clipforge.model.clip import kept_patches, keyed_patch_dropout
from test_train import (BASE, _merge, assert_gradients_close, assert_losses_close, assert_weights_close,  # noqa: F401
                        capture_first_gradients, one_rank, read_metrics, read_weights, run_main, run_two_ranks,
                        write_config)

P = 0.5
GRID = 16  # tiny-vit: 32 px images, 8 px patches


def _models(p=P):
    """tiny-vit with patch dropout p and its p = 0 twin holding the same weights."""
    torch.manual_seed(0)
    dropping = clipforge.create_model("tiny-vit", vision={"patch_dropout": p})
    plain = clipforge.create_model("tiny-vit")
    plain.load_state_dict(dropping.state_dict())
    return dropping, plain


def _transformer_inputs(model, images):
    """The vision transformer's input sequences (after ln_pre) of one forward of `images`."""
    seen = []
    handle = model.visual.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        model.encode_image(images)
    finally:
        handle.remove()
    return seen[0]


def _all_tokens(model, images):
    """Every token (class + patches, positional embedding added, after ln_pre) without dropout: (N, 1+L, W)."""
    v = model.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    cls = v.class_embedding.expand(x.shape[0], 1, -1)
    return v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding).detach()


def test_training_keeps_the_class_token_and_a_different_half_of_the_patches_per_sample():
    model, _ = _models()
    model.train()
    images = torch.randn(6, 3, 32, 32)
    seq = _transformer_inputs(model, images)
    keep = int(GRID * (1 - P))
    assert seq.shape == (6, 1 + keep, 64)
    full = _all_tokens(model, images)
    # the first token is the class token with its positional embedding
    torch.testing.assert_close(seq[:, 0], full[:, 0])
    kept = []
    for i in range(6):  # every other token is one of this sample's patch tokens (position added), no repeats
        dist = (seq[i, 1:, None, :] - full[i, None, 1:, :]).abs().amax(-1)  # (keep, L)
        assert bool((dist.min(dim=1).values < 1e-5).all())
        idx = dist.argmin(dim=1)
        assert len(set(idx.tolist())) == keep
        kept.append(tuple(sorted(idx.tolist())))
    assert len(set(kept)) > 1  # samples drop different patches


def test_evaluation_uses_every_patch_and_equals_the_model_without_dropout():
    model, plain = _models()
    images = torch.randn(4, 3, 32, 32)
    model.eval(), plain.eval()
    assert _transformer_inputs(model, images).shape[1] == 1 + GRID
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), plain.encode_image(images), rtol=0, atol=0)
    # and training really differs
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model.encode_image(images), plain.encode_image(images))


@pytest.mark.parametrize("p, keep", [(0.75, 4), (0.3, 11), (0.99, 1), (0.0, GRID)])
def test_kept_count_is_int_of_the_kept_fraction_at_least_one(p, keep):
    model, _ = _models(p)
    model.train()
    assert _transformer_inputs(model, torch.randn(2, 3, 32, 32)).shape[1] == 1 + keep


def test_default_draw_follows_torch_rng_and_the_keyed_draw_is_per_sample():
    # outside the trainer's context: torch's RNG, so a replay under the same RNG state draws the same
    torch.manual_seed(7)
    a = kept_patches(5, GRID, 8, "cpu")
    torch.manual_seed(7)
    assert torch.equal(a, kept_patches(5, GRID, 8, "cpu"))
    # keyed by (seed, step, sample row): any split of the rows gives each row the same patches
    with keyed_patch_dropout(3, 2, 0):
        whole = kept_patches(16, GRID, 8, "cpu")
    parts = []
    for first in range(0, 16, 4):
        with keyed_patch_dropout(3, 2, first):
            parts.append(kept_patches(4, GRID, 8, "cpu"))
    assert torch.equal(whole, torch.cat(parts))
    assert len({tuple(r) for r in whole.tolist()}) > 8
    with keyed_patch_dropout(3, 3, 0):  # another step, other patches
        assert not torch.equal(whole, kept_patches(16, GRID, 8, "cpu"))
    with keyed_patch_dropout(4, 2, 0):  # another seed, other patches
        assert not torch.equal(whole, kept_patches(16, GRID, 8, "cpu"))
    # every patch is kept about equally often (1 - p of the time)
    with keyed_patch_dropout(0, 0, 0):
        counts = torch.bincount(kept_patches(4000, 196, 49, "cpu").flatten(), minlength=196).float()
    assert counts.sum() == 4000 * 49 and (counts - 1000).abs().max() < 200  # ~7 binomial sd


def test_the_step_gradient_is_the_plain_gradient_with_the_keyed_patches(tmp_path, one_rank):
    """Micro-batch 4 (cached, replayed): DeepSpeed's gradient equals autograd over the global batch with
    each sample's patches drawn for (seed, step 0, its row)."""
    from clipforge import reference
    from clipforge.data.synthetic import SyntheticPairs
    from clipforge.train.config import TrainConfig
    from clipforge.train.trainer import Trainer

    cfg = TrainConfig.from_dict(_merge(BASE, {"batch": {"micro_size": 4}, "output_dir": str(tmp_path),
                                              "model": {"patch_dropout": P}}))
    trainer = Trainer(cfg)
    assert trainer.module.visual.patch_dropout == P
    got = capture_first_gradients(trainer)
    torch.manual_seed(cfg.seed)
    model = clipforge.create_model(cfg.model.name, **cfg.model_overrides())
    text = model.config.text
    data = SyntheticPairs(cfg.data, image_size=32, vocab_size=text.vocab_size, context_length=text.context_length,
                          global_batch=cfg.batch.global_size)
    images, tokens = data.next_batch()
    with keyed_patch_dropout(cfg.seed, 0, 0):
        reference.contrastive_loss(*model(images, tokens)).backward()
    assert_gradients_close(got, {n: p.grad for n, p in model.named_parameters()})


@pytest.fixture(scope="module")
def full_batch_run(tmp_path_factory, one_rank):
    """One process, model.patch_dropout 0.5, the global batch of 16 in one forward, 3 steps."""
    tmp = tmp_path_factory.mktemp("pd")
    assert run_main(write_config(tmp, "full", model={"patch_dropout": P})) == 0
    return tmp / "full"


def test_same_patches_on_one_process_with_and_without_caching_and_on_two_ranks(full_batch_run, tmp_path, one_rank):
    ref = read_metrics(full_batch_run)
    # the same model with every patch trains differently: the dropout is on
    assert run_main(write_config(tmp_path, "nodrop")) == 0
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(ref, read_metrics(tmp_path / "nodrop"))) > 1e-3
    # one process, micro-batch 4: four cached forwards, replayed
    assert run_main(write_config(tmp_path, "cached", model={"patch_dropout": P}, batch={"micro_size": 4})) == 0
    assert_losses_close(read_metrics(tmp_path / "cached"), ref)
    assert_weights_close(read_weights(tmp_path / "cached"), read_weights(full_batch_run))
    # two gloo ranks, ZeRO 2, micro-batch 4 (gradient caching on each rank)
    config = write_config(tmp_path, "zero2", model={"patch_dropout": P}, batch={"micro_size": 4},
                          deepspeed={"zero_stage": 2})
    run_two_ranks(config)
    assert_losses_close(read_metrics(tmp_path / "zero2"), ref)
    assert_weights_close(read_weights(tmp_path / "zero2"), read_weights(full_batch_run))


def test_resume_draws_the_same_patches(tmp_path, one_rank):
    sections = dict(model={"patch_dropout": P}, batch={"micro_size": 4}, max_steps=4,
                    checkpointing={"every_steps": 2, "keep_last": 1, "save_final": False})
    assert run_main(write_config(tmp_path, "straight", **sections)) == 0
    resumed = write_config(tmp_path, "resumed", **sections)
    assert run_main(resumed, "--max-steps", "2") == 0
    assert run_main(resumed, "--resume", "auto") == 0
    b = read_metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert_losses_close(read_metrics(tmp_path / "straight"), b)


def test_a_trained_model_loads_and_evaluates_with_every_patch(full_batch_run):
    model = clipforge.load(str(full_batch_run))
    assert model.config.vision.patch_dropout == P and not model.training  # saved with the model config
    plain = clipforge.create_model("tiny-vit").eval()
    plain.load_state_dict(read_weights(full_batch_run))
    images = torch.randn(4, 3, 32, 32)
    assert _transformer_inputs(model, images).shape[1] == 1 + GRID
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), plain.encode_image(images), rtol=0, atol=0)


# ------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("p", [1, 1.5, -0.1, True, "half"])
def test_run_config_refuses_patch_dropout_outside_zero_one(p):
    from clipforge.train.config import TrainConfig

    with pytest.raises(ConfigError, match=r"model\.patch_dropout"):
        TrainConfig.from_dict(_merge(BASE, {"model": {"patch_dropout": p}}))


@pytest.mark.parametrize("p", [1.0, -0.5, float("nan"), True])
def test_model_config_refuses_patch_dropout_outside_zero_one(p):
    with pytest.raises(ConfigError, match=r"vision\.patch_dropout"):
        clipforge.get_preset("tiny-vit").replace(vision={"patch_dropout": p})


def test_resnet_refuses_patch_dropout(tmp_path):
    from clipforge.train.config import TrainConfig
    from clipforge.train.preflight import check_model

    with pytest.raises(ConfigError, match=r"'vision\.patch_dropout'.*ResNet"):
        clipforge.create_model("tiny-rn", vision={"patch_dropout": 0.5})
    cfg = TrainConfig.from_dict(_merge(BASE, {"model": {"name": "tiny-rn", "patch_dropout": 0.5}}))
    with pytest.raises(ConfigError, match=r"'model\.patch_dropout'.*ResNet"):
        check_model(cfg)
    cfg = TrainConfig.from_dict(_merge(BASE, {"model": {"name": "RN50", "overrides": {"vision": {"patch_dropout": .5}}}}))
    with pytest.raises(ConfigError, match=r"'model\.overrides\.vision\.patch_dropout'.*ResNet"):
        check_model(cfg)
    # the run refuses it before anything starts
    assert run_main(write_config(tmp_path, "rn", model={"name": "tiny-rn", "patch_dropout": 0.5})) == 2
    assert not (tmp_path / "rn" / "metrics.jsonl").exists()


def test_run_key_merges_into_the_vision_overrides_and_both_keys_are_refused():
    from clipforge.train.config import TrainConfig
    from clipforge.train.preflight import check_model

    cfg = TrainConfig.from_dict(_merge(BASE, {"model": {"patch_dropout": 0.75,
                                                        "overrides": {"vision": {"image_size": 64}}}}))
    assert cfg.model_overrides()["vision"] == {"image_size": 64, "patch_dropout": 0.75}
    assert cfg.model.overrides == {"vision": {"image_size": 64}}  # the user's dict is left as it was
    vision = check_model(cfg).vision
    assert vision.patch_dropout == 0.75 and vision.image_size == 64
    assert "vision" not in TrainConfig.from_dict(BASE).model_overrides()  # p = 0: nothing added
    with pytest.raises(ConfigError, match=r"'model\.patch_dropout' and 'model\.overrides\.vision\.patch_dropout'"):
        TrainConfig.from_dict(_merge(BASE, {"model": {"patch_dropout": 0.5,
                                                      "overrides": {"vision": {"patch_dropout": 0.5}}}}))
