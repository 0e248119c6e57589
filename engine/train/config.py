"""Run configuration for training: nested dataclasses loaded strictly from YAML, plus `--set` overrides.

A run config has one section per concern (model, data, batch, optimizer, schedule, precision, loss,
deepspeed, checkpointing, logging, evaluation, distributed) and a few top-level keys (seed, max_steps, output_dir).
Unknown keys are refused with their dotted name (through `clipforge.config.dataclass_from_dict`), and
`TrainConfig.validate(world_size)` refuses impossible combinations, again naming the key.

The DeepSpeed JSON is generated from the config (`deepspeed_config`) or, when `deepspeed.config_file`
points to one, taken from that file with the batch sizes checked against this config.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError, apply_override, dataclass_from_dict
from ..config import load_yaml as _load_yaml
from ..data.config import DataConfig, DataError
from ..ops import CONTRASTIVE_BACKENDS
from .schedule import KINDS as SCHEDULE_KINDS


# betas / eps of the paper per model family (docs/DESIGN.md): ViTs use a lower beta2 and a larger eps.
ADAM_DEFAULTS = {"vit": ((0.9, 0.98), 1e-6), "resnet": ((0.9, 0.999), 1e-8)}


@dataclass
class ModelSection:
    name: str = "tiny-vit"  # a preset (clipforge.list_models())
    # top-level or nested CLIPConfig fields passed to create_model (e.g. {quick_gelu: false})
    overrides: dict[str, Any] = field(default_factory=dict)
    grad_checkpointing: bool = False  # activation checkpointing: each residual block recomputed in backward
    # start from weights (fine-tuning; train/finetune.py): any file or folder clipforge.load takes, read
    # with model.name as its architecture; a resumed run continues its checkpoint instead
    pretrained: str | None = None
    pretrained_image: str | None = None  # the image tower (visual.*) only, from any CLIP file with its shapes
    pretrained_text: str | None = None  # the text tower only (all but visual.*, logit_scale, logit_bias)
    # LiT: a locked tower gets no gradient and no optimizer state (OpenCLIP's --lock-image)
    lock_image: bool = False
    # the last K of the tower's groups stay trainable (stem, blocks, last block + norm, projection;
    # 1: the projection only); OpenCLIP's --lock-image-unlocked-groups
    lock_image_unlocked_groups: int = 0
    lock_image_freeze_norm: bool = False  # norms stay frozen in the unlocked groups; a ResNet's BatchNorm statistics stay fixed
    lock_text: bool = False  # the same for the text tower (OpenCLIP's --lock-text)
    lock_text_unlocked_groups: int = 0  # OpenCLIP's --lock-text-unlocked-layers (the same groups)
    lock_text_freeze_norm: bool = False  # norms stay frozen in the unlocked groups
    # FLIP patch dropout (OpenCLIP's patch_dropout): the fraction of image patches each training sample
    # drops, in [0, 1); ViT only; becomes the model's vision.patch_dropout (model_overrides)
    patch_dropout: float = 0.0


@dataclass
class BatchSection:
    global_size: int = 16  # the contrastive batch: one optimizer step per global batch
    micro_size: int = 16  # per rank and forward pass; smaller than global / world => gradient caching


@dataclass
class OptimizerSection:
    # torch: torch.optim.AdamW handed to DeepSpeed as a client optimizer (no compiled ops);
    # deepspeed: DeepSpeed's FusedAdam on GPU / DeepSpeedCPUAdam with offload (compiled on first use).
    impl: str = "torch"
    lr: float = 5e-4  # the peak rate, reached after schedule.warmup_steps
    weight_decay: float = 0.2  # decoupled; never on gains, biases, embeddings' norms or the logit scale
    betas: tuple[float, ...] | None = None  # None: per model family (ViT 0.9/0.98, ResNet 0.9/0.999)
    eps: float | None = None  # None: per model family (ViT 1e-6, ResNet 1e-8)
    grad_clip: float = 1.0  # global norm; 0 turns clipping off
    # impl torch: torch's fused AdamW kernel (CPU and CUDA; same update, one kernel per tensor list)
    # instead of its per-tensor loop, which took 8% of a small-vit CPU step (measured)
    fused: bool = True


@dataclass
class ScheduleSection:
    # after the warm-up: cosine (decay to min_lr_ratio) | const | const-cooldown (OpenCLIP's meanings)
    kind: str = "cosine"
    warmup_steps: int = 10  # linear from 0 to optimizer.lr (the paper: 2000); every kind
    total_steps: int | None = None  # schedule length (cosine decay, cool-down end); None: max_steps
    min_lr_ratio: float = 0.0  # where cosine and cool-down end, as a fraction of optimizer.lr
    cooldown_steps: int = 0  # const-cooldown: the last this many steps of total_steps decay to min_lr_ratio
    cooldown_power: float = 1.0  # const-cooldown: (1 - progress) ** power; 1 = linear


@dataclass
class PrecisionSection:
    dtype: str = "fp32"  # fp32 (CPU) | bf16 (A100/H100) | fp16 (V100, dynamic loss scaling)
    initial_scale_power: int = 16  # fp16: the loss scale starts at 2**power
    loss_scale_window: int = 1000  # fp16: steps without overflow before the scale doubles
    hysteresis: int = 2  # fp16: overflows tolerated before the scale drops
    min_loss_scale: float = 1.0  # fp16: the scale never goes below this


@dataclass
class LossSection:
    # clip: CLIP's softmax loss (clipforge.contrastive_loss); siglip: SigLIP's sigmoid loss
    # (clipforge.siglip_loss), whose model gets a learnable logit bias (TrainConfig.model_overrides)
    kind: str = "clip"
    backend: str = "auto"  # see clipforge.ops: auto | triton | chunked | cpp | torch
    chunk_size: int | None = None  # image rows per chunk of logits; None: the backend's own (within 256 MiB)


# SigLIP's initialisation (Zhai et al. 2023, as OpenCLIP's --siglip): t = exp(log 10) = 10, b = -10
SIGLIP_INIT = {"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0}


@dataclass
class DeepSpeedSection:
    zero_stage: int = 0  # ZeRO: 0 off, 1 optimizer states, 2 + gradients, 3 + weights partitioned over ranks
    config_file: str | None = None  # a DeepSpeed JSON to use instead of the generated one
    offload_optimizer: str = "none"  # none | cpu   (ZeRO 1-3, needs optimizer.impl: deepspeed)
    offload_param: str = "none"  # none | cpu     (ZeRO 3 only)
    overlap_comm: bool = False  # overlap gradient reduction with backward (more memory for buckets)
    contiguous_gradients: bool = True  # copy gradients into one buffer as they are made (less fragmentation)
    round_robin_gradients: bool = False  # ZeRO 1/2 only
    reduce_bucket_size: int = 500_000_000  # elements per gradient reduction bucket
    allgather_bucket_size: int = 500_000_000  # ZeRO 1/2: elements per weight all-gather bucket
    stage3_prefetch_bucket_size: int = 50_000_000  # ZeRO 3: elements of weights fetched ahead
    stage3_param_persistence_threshold: int = 100_000  # ZeRO 3: smaller weights stay whole on every rank


@dataclass
class CheckpointSection:
    every_steps: int = 1000  # 0: only the final checkpoint
    keep_last: int = 3  # complete checkpoints of this run kept (older ones pruned)
    dir: str | None = None  # None: <output_dir>/checkpoints
    save_final: bool = True  # a checkpoint after the last step too (model.safetensors is written anyway)


@dataclass
class LoggingSection:
    tensorboard: bool = True  # TensorBoard event files in <output_dir>/tensorboard
    progress_bar: bool = True  # a tqdm bar on rank 0 (metrics.jsonl is written either way)
    plot: bool = True  # loss curve PNG at the end of the run


@dataclass
class ZeroShotSection:
    """Zero-shot classification during training (engine/train/zeroshot.py): what `clipforge eval --task
    zeroshot --data PATH --classes CLASSES --templates TEMPLATES --batch-size N` reports, on the run's model."""

    path: str | None = None  # a labelled folder (one sub-folder per class) or shards with .cls labels; null: off
    # class names in label order: a file (one a line, or a JSON list), "a,b,c" or a list; null: the class
    # folders' names ("_" read as spaces); labelled shards need them
    classes: str | list[str] | None = None
    templates: str | list[str] = "imagenet"  # a template set of clipforge.serve.prompts, a JSON file, or a list
    every_steps: int = 0  # evaluate every N steps and after the last one; 0: after the last step only
    batch_size: int = 64  # images per forward pass (each rank encodes whole batches of the one-process pass)


@dataclass
class EvaluationSection:
    every_steps: int = 0  # 0: never; else held-out contrastive loss and retrieval top-1
    batches: int = 2  # held-out global batches each of those evaluations averages over
    # zero-shot classification of a labelled folder, as `clipforge eval --task zeroshot` (off without a path)
    zeroshot: ZeroShotSection = field(default_factory=ZeroShotSection)


@dataclass
class DistributedSection:
    # seconds a collective (and the rendezvous) waits for a silent rank before the run stops with an error
    # (torch's gloo default: 30 min); a rank that raises stops the others within ~1 s anyway
    timeout_s: float = 600.0


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)  # the loaders' own config, nested as it is
    batch: BatchSection = field(default_factory=BatchSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    loss: LossSection = field(default_factory=LossSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpointing: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    seed: int = 0  # initial weights, dropout and patch-dropout draws (data order: data.seed)
    max_steps: int = 100  # optimizer steps (global batches) of the run
    output_dir: str = "runs/default"  # the run folder (a used one needs --resume auto or --force)
    max_nonfinite_steps: int = 5  # this many non-finite losses in a row stop the run

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, data: dict | None) -> "TrainConfig":
        cfg = dataclass_from_dict(cls, data or {})
        cfg.check()
        return cfg

    @classmethod
    def load(cls, path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> "TrainConfig":
        """Read a YAML run config (or start from the defaults when `path` is None), apply `key.sub=value`
        overrides, and build it strictly."""
        import yaml

        data = load_yaml(path) if path else {}
        for item in overrides:
            try:
                apply_override(data, item)
            except yaml.YAMLError as exc:  # e.g. --set optimizer.lr=[1,
                key, _, text = item.partition("=")
                why = getattr(exc, "problem", None) or type(exc).__name__
                raise ConfigError(f"--set {key}: the value {text!r} is not valid YAML ({why}); fix it, or quote it "
                                  "if it is a string") from None
        try:
            cfg = cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
        if path and cfg.deepspeed.config_file and not os.path.isabs(cfg.deepspeed.config_file):
            # a relative DeepSpeed JSON path is relative to the run config that names it
            cfg.deepspeed.config_file = os.path.join(os.path.dirname(os.path.abspath(path)), cfg.deepspeed.config_file)
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ checks
    def check(self) -> None:
        """Checks that do not depend on the number of ranks."""
        _one_of("precision.dtype", self.precision.dtype, ("fp32", "bf16", "fp16"))
        _one_of("optimizer.impl", self.optimizer.impl, ("torch", "deepspeed"))
        try:
            self.data.check()
        except DataError as exc:
            raise ConfigError(str(exc)) from None
        _one_of("deepspeed.offload_optimizer", self.deepspeed.offload_optimizer, ("none", "cpu"))
        _one_of("deepspeed.offload_param", self.deepspeed.offload_param, ("none", "cpu"))
        _one_of("loss.kind", self.loss.kind, ("clip", "siglip"))
        _one_of("loss.backend", self.loss.backend, CONTRASTIVE_BACKENDS)
        if self.loss.kind == "clip" and self.model.overrides.get("init_logit_bias") is not None:
            raise ConfigError("config key 'model.overrides.init_logit_bias' gives the model SigLIP's logit bias, "
                              "which CLIP's softmax loss does not train: set loss.kind: siglip, or drop the key")
        if self.loss.kind == "siglip" and "init_logit_bias" in self.model.overrides \
                and self.model.overrides["init_logit_bias"] is None:
            raise ConfigError("config key 'model.overrides.init_logit_bias' is null, but loss.kind: siglip trains a "
                              "logit bias: give its initial value (SigLIP's is -10) or drop the key")
        _positive("batch.global_size", self.batch.global_size)
        _positive("batch.micro_size", self.batch.micro_size)
        _positive("max_steps", self.max_steps)
        _positive("max_nonfinite_steps", self.max_nonfinite_steps)
        _positive("checkpointing.keep_last", self.checkpointing.keep_last)
        if "grad_checkpointing" in self.model.overrides:
            raise ConfigError("config key 'model.overrides.grad_checkpointing' is a run setting: set "
                              "model.grad_checkpointing instead")
        if not 0 <= self.model.patch_dropout < 1:  # a number (dataclass_from_dict); ResNets: preflight.check_model
            raise ConfigError(f"config key 'model.patch_dropout' is the fraction of image patches dropped in "
                              f"training and must lie in [0, 1) (FLIP: 0.5 to 0.75), got {self.model.patch_dropout}")
        if self.model.patch_dropout and isinstance(self.model.overrides.get("vision"), dict) \
                and "patch_dropout" in self.model.overrides["vision"]:
            raise ConfigError("config keys 'model.patch_dropout' and 'model.overrides.vision.patch_dropout' both set "
                              "the patch dropout: keep one (model.patch_dropout)")
        m = self.model
        if m.pretrained and (m.pretrained_image or m.pretrained_text):
            raise ConfigError("config key 'model.pretrained' loads the whole model: drop it, or drop "
                              "'model.pretrained_image' / 'model.pretrained_text' (one tower each)")
        for tower in ("image", "text"):
            key = f"model.lock_{tower}_unlocked_groups"
            _at_least(key, getattr(m, f"lock_{tower}_unlocked_groups"), 0, "(0: the whole tower locked)")
            if not getattr(m, f"lock_{tower}") and (getattr(m, f"lock_{tower}_unlocked_groups")
                                                     or getattr(m, f"lock_{tower}_freeze_norm")):
                raise ConfigError(f"config keys '{key}' / 'model.lock_{tower}_freeze_norm' apply to a locked "
                                  f"tower: set model.lock_{tower}: true, or drop them")
        _positive("optimizer.lr", self.optimizer.lr)
        if self.optimizer.eps is not None:
            _positive("optimizer.eps", self.optimizer.eps)
        _at_least("optimizer.weight_decay", self.optimizer.weight_decay, 0)
        if self.schedule.total_steps is not None:
            _positive("schedule.total_steps", self.schedule.total_steps)
        if self.loss.chunk_size is not None:
            _positive("loss.chunk_size", self.loss.chunk_size)
        _at_least("evaluation.every_steps", self.evaluation.every_steps, 0, "(0: never)")
        _positive("evaluation.batches", self.evaluation.batches)
        zs = self.evaluation.zeroshot
        if not zs.path and zs.every_steps:
            raise ConfigError("config key 'evaluation.zeroshot.every_steps' is set but evaluation.zeroshot.path is "
                              "not: give the labelled folder to evaluate, or drop every_steps")
        if zs.path is not None and not str(zs.path).strip():
            raise ConfigError("config key 'evaluation.zeroshot.path' is empty: give a labelled folder (one "
                              "sub-folder per class), or null to turn zero-shot evaluation off")
        _at_least("evaluation.zeroshot.every_steps", zs.every_steps, 0, "(0: only at the end of the run)")
        _positive("evaluation.zeroshot.batch_size", zs.batch_size)
        if isinstance(zs.templates, list) and not zs.templates:
            raise ConfigError("config key 'evaluation.zeroshot.templates' is an empty list: give a template set "
                              "name (e.g. imagenet) or templates such as \"a photo of a {}.\"")
        _positive("distributed.timeout_s", self.distributed.timeout_s)
        _at_least("checkpointing.every_steps", self.checkpointing.every_steps, 0, "(0: only the final checkpoint)")
        p = self.precision
        _at_least("precision.initial_scale_power", p.initial_scale_power, 0)
        for key in ("loss_scale_window", "hysteresis", "min_loss_scale"):
            _positive(f"precision.{key}", getattr(p, key))
        for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"):
            _positive(f"deepspeed.{key}", getattr(self.deepspeed, key))
        _at_least("deepspeed.stage3_param_persistence_threshold", self.deepspeed.stage3_param_persistence_threshold, 0)
        if self.optimizer.betas is not None and (
            len(self.optimizer.betas) != 2 or not all(0 <= b < 1 for b in self.optimizer.betas)
        ):
            raise ConfigError(f"config key 'optimizer.betas' must be two numbers in [0, 1), got {self.optimizer.betas}")
        _at_least("optimizer.grad_clip", self.optimizer.grad_clip, 0, "(0 turns clipping off)")
        if not 0 <= self.schedule.min_lr_ratio <= 1:
            raise ConfigError("config key 'schedule.min_lr_ratio' must lie in [0, 1]")
        if self.schedule.warmup_steps < 0:
            raise ConfigError("config key 'schedule.warmup_steps' must be >= 0")
        sched = self.schedule
        _one_of("schedule.kind", sched.kind, SCHEDULE_KINDS)
        if sched.kind == "const-cooldown":
            _positive("schedule.cooldown_steps", sched.cooldown_steps)
            _positive("schedule.cooldown_power", sched.cooldown_power)
            if sched.warmup_steps + sched.cooldown_steps > self.total_steps:
                raise ConfigError(f"config keys 'schedule.warmup_steps' + 'schedule.cooldown_steps' ({sched.warmup_steps}"
                                  f" + {sched.cooldown_steps}) exceed the schedule length ({self.total_steps}: "
                                  "schedule.total_steps, else max_steps)")
        elif sched.kind == "const" and sched.min_lr_ratio != 0:
            raise ConfigError("config key 'schedule.min_lr_ratio' is where cosine and const-cooldown end; "
                              "schedule.kind: const never decays: drop it, or choose one of those kinds")
        if sched.kind != "const-cooldown" and (sched.cooldown_steps != 0 or sched.cooldown_power != 1.0):
            raise ConfigError(f"config keys 'schedule.cooldown_steps' / 'schedule.cooldown_power' apply to "
                              f"schedule.kind: const-cooldown only, not {sched.kind!r}; set the kind or drop them")
        if self.schedule.warmup_steps > self.total_steps:
            raise ConfigError(
                f"config key 'schedule.warmup_steps' ({self.schedule.warmup_steps}) exceeds the schedule length "
                f"({self.total_steps}: schedule.total_steps, else max_steps); lower it or set schedule.total_steps"
            )
        ds = self.deepspeed
        if ds.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"config key 'deepspeed.zero_stage' must be 0, 1, 2 or 3, got {ds.zero_stage}")
        if ds.offload_param != "none" and ds.zero_stage != 3:
            raise ConfigError(
                f"config key 'deepspeed.offload_param' needs ZeRO stage 3 (parameters are only partitioned "
                f"there); deepspeed.zero_stage is {ds.zero_stage}"
            )
        if ds.round_robin_gradients and ds.zero_stage not in (1, 2):
            raise ConfigError(
                f"config key 'deepspeed.round_robin_gradients' is served by ZeRO stages 1 and 2 only; "
                f"deepspeed.zero_stage is {ds.zero_stage}"
            )
        if ds.offload_optimizer != "none":
            if ds.zero_stage == 0:
                raise ConfigError("config key 'deepspeed.offload_optimizer' needs ZeRO stage 1, 2 or 3")
            if self.optimizer.impl != "deepspeed":
                raise ConfigError(
                    "config key 'deepspeed.offload_optimizer' needs optimizer.impl: deepspeed "
                    "(DeepSpeedCPUAdam steps the offloaded states; torch.optim.AdamW would be slow there)"
                )
        if self.data.kind == "synthetic":
            for key in ("sources", "upsampling_factors", "resampled"):
                if getattr(self.data, key):
                    raise ConfigError(f"config key 'data.{key}' reads webdataset shards, but data.kind is "
                                      "synthetic (generated pairs): set data.kind: webdataset, or drop it")
        if self.data.kind == "webdataset" and not (self.data.path or self.data.sources):
            raise ConfigError("config key 'data.path' (or data.sources) is required when data.kind is webdataset")

    def validate(self, world_size: int) -> int:
        """Refuse combinations impossible on `world_size` ranks; returns the gradient-caching steps."""
        self.check()
        per_step = world_size * self.batch.micro_size
        if self.batch.global_size % per_step:
            raise ConfigError(
                f"config key 'batch.global_size' ({self.batch.global_size}) must be divisible by "
                f"world size x batch.micro_size ({world_size} x {self.batch.micro_size} = {per_step})"
            )
        local = self.batch.global_size // world_size
        if self.data.batch_size is not None and self.data.batch_size != local:
            raise ConfigError(
                f"config key 'data.batch_size' ({self.data.batch_size}) is the loader's per-rank batch, which a "
                f"run takes from batch.global_size / world size ({local}); remove it or make them agree"
            )
        if self.data.drop_last is False:
            raise ConfigError("config key 'data.drop_last' cannot be false in training: every rank steps on full "
                              "batches in lock-step (remove the key)")
        return self.batch.global_size // per_step

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps or self.max_steps

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpointing.dir or os.path.join(self.output_dir, "checkpoints")

    def model_overrides(self) -> dict:
        """model.overrides, plus SigLIP's initial scale and bias under loss.kind: siglip (unless given), plus
        model.patch_dropout as vision={..., "patch_dropout": p} (the user's other vision overrides kept)."""
        out = {**SIGLIP_INIT, **self.model.overrides} if self.loss.kind == "siglip" else dict(self.model.overrides)
        vision = out.get("vision", {})
        if self.model.patch_dropout and isinstance(vision, dict):
            out["vision"] = {**vision, "patch_dropout": self.model.patch_dropout}
        return out

    def adam_hyperparameters(self, is_resnet: bool) -> tuple[tuple[float, float], float]:
        betas, eps = ADAM_DEFAULTS["resnet" if is_resnet else "vit"]
        if self.optimizer.betas is not None:
            betas = tuple(self.optimizer.betas)
        if self.optimizer.eps is not None:
            eps = self.optimizer.eps
        return betas, eps

    # ------------------------------------------------------------------ DeepSpeed
    def deepspeed_config(self, world_size: int) -> dict:
        """The DeepSpeed config for `world_size` ranks (generated, or read from deepspeed.config_file)."""
        gas = self.validate(world_size)
        batch = {
            "train_batch_size": self.batch.global_size,
            "train_micro_batch_size_per_gpu": self.batch.micro_size,
            "gradient_accumulation_steps": gas,
        }
        if self.deepspeed.config_file:
            return self._checked_file_config(batch)
        ds, p = self.deepspeed, self.precision
        zero: dict[str, Any] = {"stage": ds.zero_stage}
        if ds.zero_stage > 0:
            zero.update(
                overlap_comm=ds.overlap_comm,
                contiguous_gradients=ds.contiguous_gradients,
                reduce_bucket_size=ds.reduce_bucket_size,
            )
        if ds.zero_stage in (1, 2):
            zero.update(allgather_bucket_size=ds.allgather_bucket_size, round_robin_gradients=ds.round_robin_gradients)
        if ds.zero_stage == 3:
            zero.update(
                stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
                stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
                stage3_gather_16bit_weights_on_model_save=False,
            )
        if ds.offload_optimizer != "none":
            zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": False}
        if ds.offload_param != "none":
            zero["offload_param"] = {"device": ds.offload_param, "pin_memory": False}
        config = {
            **batch,
            "gradient_clipping": self.optimizer.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": p.dtype == "bf16"},
            "fp16": {
                "enabled": p.dtype == "fp16",
                "loss_scale": 0,  # 0 = dynamic
                "initial_scale_power": p.initial_scale_power,
                "loss_scale_window": p.loss_scale_window,
                "hysteresis": p.hysteresis,
                "min_loss_scale": p.min_loss_scale,
            },
            # the trainer builds torch.optim.AdamW itself (param groups without decay on gains etc.)
            "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        return config

    def _checked_file_config(self, batch: dict) -> dict:
        path = self.deepspeed.config_file
        try:
            with open(path) as f:
                config = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config key 'deepspeed.config_file' points to a missing file: {path}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config key 'deepspeed.config_file': {path} is not valid JSON ({exc})") from None
        for key, value in batch.items():
            if key in config and config[key] != "auto" and config[key] != value:
                raise ConfigError(
                    f"key '{key}' in {path} is {config[key]} but the run config implies {value} "
                    "(batch.global_size, batch.micro_size and the world size); make them agree or remove it"
                )
            config[key] = value
        for key in ("optimizer", "scheduler"):
            if key in config:
                raise ConfigError(
                    f"key '{key}' in {path} is not supported: the trainer builds the optimizer and the schedule "
                    "from the run config's optimizer and schedule sections"
                )
        stage = config.get("zero_optimization", {}).get("stage", 0)
        if stage != self.deepspeed.zero_stage:
            raise ConfigError(
                f"key 'zero_optimization.stage' in {path} is {stage} but deepspeed.zero_stage is "
                f"{self.deepspeed.zero_stage}; make them agree"
            )
        for dtype in ("bf16", "fp16"):
            enabled = bool(config.get(dtype, {}).get("enabled", False))
            if enabled != (self.precision.dtype == dtype):
                raise ConfigError(
                    f"key '{dtype}.enabled' in {path} disagrees with precision.dtype={self.precision.dtype}"
                )
        config.setdefault("gradient_clipping", self.optimizer.grad_clip)
        config.setdefault("zero_allow_untested_optimizer", True)
        config.setdefault("zero_force_ds_cpu_optimizer", False)
        return config


def _one_of(key: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, allowed))}, got {value!r}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != math.inf


def _positive(key: str, value) -> None:
    if not _number(value) or value <= 0:  # also null, NaN and infinities (a config built in code)
        raise ConfigError(f"config key '{key}' must be positive, got {value}")


def _at_least(key: str, value, low, why: str = "") -> None:
    if not _number(value) or value < low:
        raise ConfigError(f"config key '{key}' must be >= {low}{' ' + why if why else ''}, got {value}")


def load_yaml(path: str) -> dict:
    return _load_yaml(path, what="run config")
