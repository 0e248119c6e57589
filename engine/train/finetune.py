"""Starting from weights and locking towers: fine-tuning and LiT (`model.pretrained*`, `model.lock_*`).

`prepare_model(model, cfg)` runs on every rank on the freshly built model, before DeepSpeed wraps it, so
ZeRO partitions and the optimizer's fp32 master copies start from the loaded weights, and locked
parameters (requires_grad False) never reach the optimizer: no optimizer state, no gradient, no
gradient all-reduce or reduce-scatter (`trainer.param_groups` takes trainable parameters only).

Weights (`model.pretrained`: the whole model; `model.pretrained_image` / `pretrained_text`: one tower
from a file of any CLIP whose tower has this run's shapes) are read by clipforge's loader
(model/weights.py: no code executed, OpenCLIP's other families refused, NaN refused) with `model.name` as
the architecture, as `clipforge.load(path, model_name=model.name)` would, and copied strictly: a missing,
extra or mis-shaped key of what is loaded is refused by name. What a file says of its activation is
checked against the run's model (clipforge files carry their config; OpenAI's archives are QuickGELU), and
so are a clipforge file's attention heads: GELU weights in a QuickGELU model (or back), or weights split
into other heads, would run and be silently wrong (a plain state dict says neither: model.name does). A SigLIP run starting from
CLIP weights takes their logit scale and keeps its initial bias (-10; the file has none). Resuming wins:
a run that resumes from a checkpoint loads the pretrained file too (every rank builds its model the same
way, so the file must stay readable) and then DeepSpeed's checkpoint replaces every weight and optimizer
state; a checkpoint written while other parameters were trained is refused (`check_resumed_parameters`).

Locking (LiT, Zhai et al. 2022; OpenCLIP's --lock-image / --lock-text): a tower's parameters are split
into OpenCLIP's groups, from the input: [stem: patch / token embedding, positional embedding (ViT: class
embedding, ln_pre)], one group per residual block but the last, [last block, final norm], [projection].
`lock_*_unlocked_groups: K` leaves the last K groups trainable (1: the projection only). With
`lock_*_freeze_norm` the norm layers stay frozen inside the unlocked groups too, and a ResNet tower's
BatchNorm layers keep their running statistics (evaluation mode in training; OpenCLIP's
--lock-image-freeze-bn-stats). A ResNet image tower locks whole or not at all (OpenCLIP's rule).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..config import ConfigError
from ..model.weights import CheckpointError, load_state_dict_strict, read_checked

IMAGE, TEXT = "image", "text"


def _is_image(name: str) -> bool:
    return name.startswith("visual.")


def _is_text(name: str) -> bool:
    return not _is_image(name) and name not in ("logit_scale", "logit_bias")


# ------------------------------------------------------------------------------------------ weights
def pretrained_files(cfg) -> list[tuple[str, str]]:
    """(config key, path) of the weights files the run starts from, in the order they are loaded."""
    m = cfg.model
    keys = ("pretrained", "pretrained_image", "pretrained_text")
    return [(f"model.{k}", getattr(m, k)) for k in keys if getattr(m, k)]


def check_pretrained_paths(cfg) -> None:
    """Every named weights file exists (preflight: before any process group; reading them is the trainer's)."""
    for key, path in pretrained_files(cfg):
        if not os.path.exists(path):
            raise ConfigError(f"config key '{key}' names {path}, which does not exist; give a weights file "
                              "(.pt, .safetensors), a run folder or a complete checkpoint folder (step_N/)")


def _check_heads(model, stored_cfg, key: str, where: str) -> None:
    """The attention heads a clipforge file was trained with (its config; no tensor shape says them) against
    the run's model, for the towers `key` loads: weights split into other heads run and are silently wrong."""
    if not stored_cfg:
        return
    from ..model.config import CLIPConfig

    theirs, ours = CLIPConfig.from_dict(stored_cfg), model.config
    towers = {"model.pretrained_image": ("vision",), "model.pretrained_text": ("text",)}.get(key, ("vision", "text"))
    for tower in towers:
        a = getattr(theirs, tower)
        b = getattr(ours, tower)
        got, want = (a.num_heads, b.num_heads) if tower == "vision" else (a.heads, b.heads)
        if got != want:
            raise CheckpointError(f"config key '{key}': {where} holds a model whose {tower} tower has {got} attention "
                                  f"heads, but the run's model has {want}; name the weights' model in model.name or "
                                  f"set model.overrides.{tower}.heads: {got}")


def _check_activation(model, stored_cfg, kind: str, key: str, where: str, name: str) -> None:
    said = stored_cfg.get("quick_gelu") if stored_cfg else (True if kind == "openai-archive" else None)
    if said is not None and bool(said) != bool(model.config.quick_gelu):
        act = {True: "QuickGELU", False: "GELU"}
        raise CheckpointError(f"config key '{key}': {where} holds a {act[bool(said)]} model, but model.name "
                              f"{name!r} is {act[bool(model.config.quick_gelu)]}; name the weights' model "
                              f"(OpenCLIP's names: ViT-B-32 is GELU, ViT-B-32-quickgelu QuickGELU) or set "
                              f"model.overrides.quick_gelu: {str(bool(said)).lower()}")


def load_pretrained(model: nn.Module, cfg) -> list[str]:
    """Copy the run's pretrained weights into `model` (see the module docstring) -> what was loaded."""
    loaded = []
    for key, path in pretrained_files(cfg):
        sd, stored_cfg, kind, where = read_checked(path, named=True)
        _check_activation(model, stored_cfg, kind, key, where, cfg.model.name)
        _check_heads(model, stored_cfg, key, where)
        what = f"{where} ({key})"
        if key == "model.pretrained_image":
            load_state_dict_strict(model, sd, what, keep=_is_image)
        elif key == "model.pretrained_text":
            load_state_dict_strict(model, sd, what, keep=_is_text)
        else:
            bias_only_here = getattr(model, "logit_bias", None) is not None and "logit_bias" not in sd
            load_state_dict_strict(model, sd, what, keep=(lambda k: k != "logit_bias") if bias_only_here else None)
        loaded.append(f"{key}: {where}")
    return loaded


# ------------------------------------------------------------------------------------------ locking
def _vit_groups(v) -> list[list]:
    blocks = list(v.transformer.resblocks)
    return [[v.conv1, v.class_embedding, v.positional_embedding, v.ln_pre], *([b] for b in blocks[:-1]),
            [blocks[-1], v.ln_post], [v.proj]]


def _text_groups(m) -> list[list]:
    blocks = list(m.transformer.resblocks)
    return [[m.token_embedding, m.positional_embedding], *([b] for b in blocks[:-1]), [blocks[-1], m.ln_final],
            [m.text_projection]]


def _params(items) -> list[nn.Parameter]:
    out = []
    for x in items:
        out += [x] if isinstance(x, nn.Parameter) else list(x.parameters())
    return out


def tower_groups(model: nn.Module, tower: str) -> list[list] | None:
    """OpenCLIP's lock groups of a tower, from the input; None for a ResNet image tower (locked whole)."""
    if tower == TEXT:
        return _text_groups(model)
    return _vit_groups(model.visual) if hasattr(model.visual, "transformer") else None


def group_count(model_config, tower: str) -> int | None:
    """How many lock groups the tower of `model_config` has (layers + 2), None for a ResNet image tower."""
    if tower == IMAGE and model_config.vision.is_resnet:
        return None
    return (model_config.vision.layers if tower == IMAGE else model_config.text.layers) + 2


def check_locks(cfg, model_config) -> None:
    """The lock keys against the model's towers (preflight, and the trainer before it locks)."""
    for tower in (IMAGE, TEXT):
        if not getattr(cfg.model, f"lock_{tower}"):
            continue
        key, k = f"model.lock_{tower}_unlocked_groups", getattr(cfg.model, f"lock_{tower}_unlocked_groups")
        groups = group_count(model_config, tower)
        if groups is None and k:
            raise ConfigError(f"config key '{key}' is {k}, but a ResNet image tower locks whole (OpenCLIP's rule): "
                              "set it to 0, or use a ViT")
        if groups is not None and k > groups:
            raise ConfigError(f"config key '{key}' is {k}, but {cfg.model.name}'s {tower} tower has {groups} lock "
                              f"groups (stem, {groups - 3} blocks, last block + norm, projection)")


def _freeze_batchnorm_statistics(module: nn.Module) -> None:
    for bn in module.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.register_forward_pre_hook(lambda m, _: setattr(m, "training", False))  # train() cannot undo it


def lock_towers(model: nn.Module, cfg) -> dict[str, int]:
    """Freeze the towers the run config locks -> {"frozen": parameters, "trainable": parameters}."""
    check_locks(cfg, model.config)
    for tower in (IMAGE, TEXT):
        if not getattr(cfg.model, f"lock_{tower}"):
            continue
        k = getattr(cfg.model, f"lock_{tower}_unlocked_groups")
        freeze_norm = getattr(cfg.model, f"lock_{tower}_freeze_norm")
        keep = _is_image if tower == IMAGE else _is_text
        members = [p for n, p in model.named_parameters() if keep(n)]
        for p in members:
            p.requires_grad_(False)
        groups = tower_groups(model, tower)
        if groups is not None and k:
            for p in _params([x for g in groups[-k:] for x in g]):
                p.requires_grad_(True)
        if freeze_norm:
            root = model.visual if tower == IMAGE else model
            norms = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
            for name, m in root.named_modules():
                if isinstance(m, norms) and (tower == IMAGE or _is_text(name)):
                    for p in m.parameters():
                        p.requires_grad_(False)
            if tower == IMAGE:
                _freeze_batchnorm_statistics(model.visual)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"frozen": frozen, "trainable": sum(p.numel() for p in model.parameters()) - frozen}


def trained_names(model: nn.Module) -> list[str]:
    """The names of the parameters a run trains (all but the locked ones), as its checkpoints record them."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def check_resumed_parameters(state: dict, trained: list[str], path: str) -> None:
    """Refuse resuming a checkpoint written while other parameters were trained (loss.kind, model.lock_* or
    the model's overrides changed since): DeepSpeed would fail on the optimizer's groups, or, were their
    sizes to agree, put Adam's moments on the wrong parameters. Checkpoints without the record pass."""
    saved = state.get("trained")
    if saved is None or list(saved) == list(trained):
        return
    new, gone = sorted(set(trained) - set(saved)), sorted(set(saved) - set(trained))
    what = "; ".join(x for x in (f"now trained: {', '.join(new[:4])}{' ...' if len(new) > 4 else ''}" if new else "",
                                 f"no longer trained: {', '.join(gone[:4])}{' ...' if len(gone) > 4 else ''}"
                                 if gone else "") if x) or "the same names in another order"
    raise CheckpointError(f"cannot resume from {path}: it was written by a run that trained other parameters "
                          f"({what}); loss.kind, model.lock_* or model.overrides changed since. Resume with the "
                          "run's own config (its config.yaml), or start a fresh run with --force")


def prepare_model(model: nn.Module, cfg) -> dict:
    """Load the pretrained weights, then lock -> {"loaded": [...], "frozen": n, "trainable": n}."""
    with torch.no_grad():
        loaded = load_pretrained(model, cfg)
    return {"loaded": loaded, **lock_towers(model, cfg)}
