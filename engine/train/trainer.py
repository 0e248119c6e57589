"""The CLIP trainer: a DeepSpeed engine (ZeRO 0-3) driven with gradient caching.

The contrastive batch is the global batch, whatever the micro-batch. One `train_step` consumes one
global batch (this rank's share of it, `batch.global_size / world` pairs) and makes one optimizer step:

1. forward every micro-batch without a graph, keeping only the features (and the RNG state before
   each micro-batch);
2. compute the loss over the global batch and its gradients with respect to this rank's features, the
   logit scale and (SigLIP) the logit bias: `clipforge.contrastive_loss` or, under `loss.kind: siglip`,
   `clipforge.siglip_loss`, with the data-parallel group;
3. replay each micro-batch forward with a graph and the same RNG state (so dropout / drop-path draw
   the same masks) and back-propagate its slice of the cached feature gradients through
   `engine.backward`, then `engine.step()`: DeepSpeed accumulates over the `gradient_accumulation_steps`
   micro-batches, averages over ranks and steps once at the boundary.

Gradient bookkeeping (why the result equals the single-process gradient of the global-batch loss):
- `engine.backward(x)` divides by the accumulation steps unless `scale_wrt_gas=False`; the cached
  gradients are already those of the whole local batch, so we pass `scale_wrt_gas=False`.
- DeepSpeed averages gradients over the W ranks. The loss's distributed convention (see
  `clipforge.loss`) is that each rank's feature gradients are W times its share of the true gradient
  and the logit-scale gradient is the full one on every rank, so the average is the true gradient.
- The logit scale (and bias) enters every micro-batch forward but its cached gradient is
  back-propagated once (micro-batch 0); the others back-propagate a zero for it, so its gradient hooks
  fire on every micro-step (ZeRO 2/3 expect that) without counting it twice. Both losses follow the
  same convention for it (full gradient on every rank), so the bias needs nothing of its own.

With one micro-batch per rank (no caching) the step is the plain forward-loss-backward, which the
tests use as the reference for the cached path.
"""
from __future__ import annotations

import contextlib
import random
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import DS_TAG, load_trainer_state, save_trainer_state
from ..loss import _all_gather_rows
from ..data.loaders import ShardBatches
from ..data.synthetic import SyntheticPairs
from ..model.clip import MAX_LOGIT_SCALE, keyed_patch_dropout
from .config import ConfigError, TrainConfig
from .deepspeed_compat import _scalars_to_vectors, _weights_only_load
from .finetune import check_resumed_parameters, prepare_model, trained_names
from .schedule import lr_factor
from .distributed import check_same_config, failures_announced, set_collective_timeout, start_watchdog


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run is diverging."""


# ------------------------------------------------------------------------------- optimisation
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices, convolutions and embeddings; none on the gains and
    biases of norm layers, on any bias, on other 0/1-dim parameters (class embedding) or the scale."""
    norms = (torch.nn.LayerNorm, torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm)
    decay, no_decay = [], []
    for _, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            skip = isinstance(module, norms) or name == "bias" or p.ndim < 2 or name == "logit_scale"
            (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


# ------------------------------------------------------------------------------------ RNG state
def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _full_rng_state() -> dict:
    """Every RNG the run draws from, as tensors and lists (loadable with weights_only=True)."""
    state = _rng_state()
    version, internal, gauss = random.getstate()
    state["python"] = [version, list(internal), gauss]
    np_state = np.random.get_state()
    state["numpy"] = [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]
    return state


def _set_full_rng_state(state: dict) -> None:
    _set_rng_state(state)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


# ------------------------------------------------------------------------------------------ data
def build_data_source(cfg: TrainConfig, model_config, *, rank: int, world_size: int):
    """The run's data source: the `data` section goes to data/ as it is (no translation), with this
    rank's share of the global batch."""
    vision, text = model_config.vision, model_config.text
    if cfg.data.kind == "synthetic":
        return SyntheticPairs(cfg.data, image_size=vision.image_size, vocab_size=text.vocab_size,
                              context_length=text.context_length, global_batch=cfg.batch.global_size,
                              rank=rank, world_size=world_size)
    evaluated = cfg.evaluation.batches if cfg.evaluation.every_steps else 0  # no held-out loader otherwise
    return ShardBatches(cfg.data, global_batch=cfg.batch.global_size, eval_batches=evaluated,
                        image_size=vision.image_size, rank=rank, world_size=world_size)


# --------------------------------------------------------------------------------------- trainer
class Trainer:
    """Owns the model, the DeepSpeed engine, the data and the step counters of one run.

    `train_step()` runs one global batch; `state_dict()` / `load_state_dict()` carry the trainer's own
    state (step, samples seen, data position, RNG); `save_checkpoint(dir)` / `load_checkpoint(dir)`
    add DeepSpeed's model, optimizer and schedule state.
    """

    def __init__(self, cfg: TrainConfig, data=None):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        from ..model.clip import create_model

        if not dist.is_initialized():
            raise RuntimeError("Trainer needs torch.distributed initialised (clipforge.train.init_distributed)")
        self.cfg = cfg
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.group = dist.group.WORLD
        cfg.validate(self.world_size)
        # collectives give up after distributed.timeout_s (DeepSpeed's groups below too); a rank that
        # raises stops the others (distributed.py's watchdog); ranks started with different configs stop here
        set_collective_timeout(cfg.distributed.timeout_s)
        start_watchdog()
        check_same_config(cfg.to_dict())
        self.local_batch = cfg.batch.global_size // self.world_size
        accel = get_accelerator()
        self.device = torch.device(accel.current_device_name())
        if cfg.precision.dtype == "fp16" and self.device.type == "cpu":
            raise ConfigError("config key 'precision.dtype' is fp16, which needs a GPU; use fp32 (or bf16) on CPU")

        # identical initial weights on every rank (ZeRO partitions them after)
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model.name, **cfg.model_overrides(), grad_checkpointing=cfg.model.grad_checkpointing)
        self.model_config = model.config
        self.siglip = cfg.loss.kind == "siglip"  # the model has a logit bias exactly then (config.check)
        # pretrained weights and locked towers, before DeepSpeed copies and partitions anything (finetune.py)
        self.prepared = prepare_model(model, cfg)
        if self.rank == 0 and (self.prepared["loaded"] or self.prepared["frozen"]):
            print(f"clipforge train: {'; '.join(self.prepared['loaded']) or 'random initial weights'}; "
                  f"{self.prepared['trainable']:,} parameters trainable, {self.prepared['frozen']:,} locked", flush=True)
        betas, eps = cfg.adam_hyperparameters(model.config.vision.is_resnet)
        groups = param_groups(model, cfg.optimizer.weight_decay)
        ds_config = cfg.deepspeed_config(self.world_size)
        optimizer = None
        if cfg.optimizer.impl == "torch":
            optimizer = torch.optim.AdamW(groups, lr=cfg.optimizer.lr, betas=betas, eps=eps,
                                          fused=cfg.optimizer.fused)
        else:
            ds_config["optimizer"] = {
                "type": "AdamW",
                "params": {"lr": cfg.optimizer.lr, "betas": list(betas), "eps": eps,
                           "weight_decay": cfg.optimizer.weight_decay},
            }
        sched, total = cfg.schedule, cfg.total_steps

        def schedule(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(
                s, sched.warmup_steps, total, sched.min_lr_ratio, sched.kind, sched.cooldown_steps, sched.cooldown_power))

        self._declared_shapes = _scalars_to_vectors(model)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=groups, optimizer=optimizer, lr_scheduler=schedule, config=ds_config
        )
        set_collective_timeout(cfg.distributed.timeout_s)  # again: any group DeepSpeed made on its own
        self.module = self.engine.module
        # DeepSpeed reads its checkpoint files with torch.load(weights_only=False), which can run pickled
        # code; read them with weights_only=True instead, allowing only DeepSpeed's own plain records
        self.engine.checkpoint_engine.load = _weights_only_load
        self.zero_stage = self.engine.zero_optimization_stage()
        if self.world_size == 1 and self.zero_stage == 0:
            # One process without ZeRO: DeepSpeed would still flatten every gradient, all-reduce it over a
            # group of one and copy it back (~12% of a CPU train step, measured); there is nothing to reduce.
            self.engine.enable_backward_allreduce = False
        self.data = data if data is not None else self._build_data()
        # a different RNG stream per rank (dropout masks), replayed exactly by the cached forward
        torch.manual_seed(cfg.seed * 1000 + 1 + self.rank)
        self.step = 0  # global batches consumed (including skipped non-finite ones)
        self.samples_seen = 0
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        # called as grad_hook(trainer) once per step, after the last backward and before the optimizer
        # step: the gradients are complete (reduced over ranks, unclipped); see `full_gradients`
        self.grad_hook = None

    def _build_data(self):
        return build_data_source(self.cfg, self.model_config, rank=self.rank, world_size=self.world_size)

    def forward(self, images, tokens, first: int = 0):
        """The engine's forward -> (image features, text features, scalars): scalars is the 0-dim
        exponentiated scale, and under SigLIP the 0-dim logit bias after it. `first`: the images' first
        row in this rank's batch; patch dropout keys each sample on (seed, step, row in the global batch)."""
        with keyed_patch_dropout(self.cfg.seed, self.step, self.rank * self.local_batch + first):
            img, txt, *scalars = self.engine(images, tokens)
        return img, txt, tuple(x.reshape(()) for x in scalars)

    # ------------------------------------------------------------------------------- the loss
    def _loss_options(self) -> dict:
        return dict(group=self.group if self.world_size > 1 else None, backend=self.cfg.loss.backend,
                    chunk_size=self.cfg.loss.chunk_size)

    def contrastive_loss(self, image_features, text_features, scalars):
        """The loss over the global batch (`clipforge.contrastive_loss`, or `clipforge.siglip_loss` under
        loss.kind: siglip, with the data-parallel group); scalars as `forward` returns them, in fp32."""
        from ..loss import contrastive_loss
        from ..siglip_loss import siglip_loss

        loss = siglip_loss if self.siglip else contrastive_loss
        return loss(image_features, text_features, *scalars, **self._loss_options())

    def contrastive_loss_and_grads(self, image_features, text_features, scalars):
        """The same loss with its gradients, without autograd -> (loss, d_image, d_text, d_scalars): the
        feature gradients in fp32 whatever the features' precision (what gradient caching stores),
        d_scalars one 0-dim gradient per scalar."""
        from ..loss import contrastive_loss_and_grads
        from ..siglip_loss import siglip_loss_and_grads

        grads = siglip_loss_and_grads if self.siglip else contrastive_loss_and_grads
        loss, d_image, d_text, *d_scalars = grads(image_features, text_features, *scalars, **self._loss_options())
        return loss, d_image, d_text, d_scalars

    def _all_finite(self, value: torch.Tensor) -> bool:
        flag = torch.tensor([1.0 if bool(torch.isfinite(value).all()) else 0.0], device=self.device)
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item() == 1.0)

    # ------------------------------------------------------------------------------- one step
    def train_step(self, batch=None) -> dict:
        """One optimizer step over one global batch. Returns this step's metrics (loss None if skipped).
        An exception on this rank (but NonFiniteLossError, raised on every rank alike) is announced to
        the others first, which then stop within a second instead of waiting in a collective."""
        with failures_announced(ignore=(NonFiniteLossError,)):
            return self._train_step(batch)

    def _train_step(self, batch=None) -> dict:
        self.engine.train()
        t0 = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]  # the rate this step uses (the schedule advances in step())
        images, tokens = batch if batch is not None else self.data.next_batch()
        if images.shape[0] != self.local_batch or tokens.shape[0] != self.local_batch:
            # DeepSpeed steps after exactly gradient_accumulation_steps micro-batches: sizes must agree
            raise ValueError(
                f"a training batch on this rank must hold batch.global_size / world size = {self.local_batch} "
                f"pairs, got {images.shape[0]} images and {tokens.shape[0]} token rows"
            )
        images, tokens = images.to(self.device), tokens.to(self.device)
        micro = self.cfg.batch.micro_size
        slices = [slice(i, i + micro) for i in range(0, images.shape[0], micro)]
        if len(slices) == 1:
            loss = self._plain_step(images, tokens)
        else:
            loss = self._cached_step(images, tokens, slices)
        self.step += 1
        self.samples_seen += self.cfg.batch.global_size
        skipped = loss is None
        if skipped:
            self.nonfinite_total += 1
            self.nonfinite_in_row += 1
            if self.nonfinite_in_row >= self.cfg.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"the loss was not finite for {self.nonfinite_in_row} steps in a row (last at step {self.step}); "
                    "try a lower optimizer.lr, a longer schedule.warmup_steps, a smaller optimizer.grad_clip, "
                    "or precision.dtype: bf16 instead of fp16, and check the data for NaNs"
                )
        else:
            self.nonfinite_in_row = 0
            self._clamp_logit_scale()
        elapsed = time.perf_counter() - t0
        return {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "logit_scale": self.logit_scale(),
            **({"logit_bias": self.logit_bias()} if self.siglip else {}),
            "samples_per_s": self.cfg.batch.global_size / elapsed,
            "samples_seen": self.samples_seen,
            "skipped": skipped,
            "nonfinite_total": self.nonfinite_total,
            "grad_norm": _float_or_none(self.engine.get_global_grad_norm()) if not skipped else None,
            "loss_scale": self._loss_scale(),
            # False when DeepSpeed skipped the update (fp16 gradient overflow: the loss scale drops)
            "step_applied": bool(self.engine.was_step_applied()) if not skipped else False,
            "step_time_s": elapsed,
        }

    def _plain_step(self, images, tokens) -> float | None:
        img, txt, scalars = self.forward(images, tokens)
        # features in the model's precision (bf16 / fp16 under precision.dtype bf16 / fp16, as OpenCLIP's
        # autocast hands its loss): on a GPU the Triton loss then runs on the tensor cores, with fp32
        # accumulation and statistics (clipforge.ops' table); only the scale (and bias) go to fp32
        loss = self.contrastive_loss(img, txt, [x.float() for x in scalars])
        if not self._all_finite(loss.detach()):
            return None
        self.engine.backward(loss, scale_wrt_gas=False)
        if self.grad_hook is not None:
            self.grad_hook(self)
        self.engine.step()
        return float(loss.detach())

    def _cached_step(self, images, tokens, slices) -> float | None:
        # 1. features of every micro-batch, without a graph; remember the RNG before each one
        states, img_parts, txt_parts = [], [], []
        with torch.no_grad():
            for sl in slices:
                states.append(_rng_state())
                img, txt, scalars = self.forward(images[sl], tokens[sl], sl.start)
                img_parts.append(img)  # the model's precision, as in _plain_step (half the cache in bf16)
                txt_parts.append(txt)
        after = _rng_state()
        # 2. loss over the global batch and its gradients w.r.t. this rank's features, the scale and the
        # bias, the feature gradients in fp32 (in fp16 each, ~ s / 2N, would be subnormal at N = 32k)
        img_all = torch.cat(img_parts)  # (B_local, E)
        txt_all = torch.cat(txt_parts)  # (B_local, E)
        loss, g_img, g_txt, g_scalars = self.contrastive_loss_and_grads(
            img_all, txt_all, [x.detach().float() for x in scalars])
        if not self._all_finite(loss.detach()):
            _set_rng_state(after)
            return None
        # 3. replay each micro-batch with a graph and push its slice of the cached gradients through
        for i, sl in enumerate(slices):
            _set_rng_state(states[i])
            img, txt, scalars = self.forward(images[sl], tokens[sl], sl.start)
            surrogate = (img.float() * g_img[sl]).sum() + (txt.float() * g_txt[sl]).sum()
            for x, g in zip(scalars, g_scalars):  # once (micro-batch 0), a zero on the others
                surrogate = surrogate + x.float() * (g.to(x.device) if i == 0 else torch.zeros_like(g, device=x.device))
            self.engine.backward(surrogate, scale_wrt_gas=False)
            if i == len(slices) - 1 and self.grad_hook is not None:
                self.grad_hook(self)
            self.engine.step()
        _set_rng_state(after)
        return float(loss.detach())

    # --------------------------------------------------------------------------- logit scale
    def _gathered(self, params, modifier_rank=None):
        if self.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)
        return contextlib.nullcontext()

    def logit_scale(self) -> float:
        """The exponentiated logit scale (what multiplies the cosine similarities)."""
        p = self.module.logit_scale
        with self._gathered([p]):
            return float(p.detach().float().exp().reshape(()))

    def logit_bias(self) -> float:
        """SigLIP's logit bias (loss.kind: siglip only)."""
        p = self.module.logit_bias
        with self._gathered([p]):
            return float(p.detach().float().reshape(()))

    def _clamp_logit_scale(self) -> None:
        """Clamp the scale parameter to ln(100) in the model and in the optimizer's fp32 master copy.

        ZeRO 1-3 and the bf16/fp16 optimizers step an fp32 copy and write it back into the model, so
        clamping only the model's parameter would be undone by the next step.
        """
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        p = self.module.logit_scale
        master = safe_get_full_fp32_param(p)  # collective under ZeRO; None without a master copy
        # ZeRO 3 pads the 1-element scale to one element per rank: ranks past the first hold only
        # padding, and DeepSpeed's setter would index past the value there
        owns = self.zero_stage != 3 or self.rank * p.ds_tensor.numel() < p.ds_numel
        if master is not None and owns and float(master.reshape(())) > MAX_LOGIT_SCALE:
            safe_set_full_fp32_param(p, master.clamp(max=MAX_LOGIT_SCALE))
        with self._gathered([p], modifier_rank=0), torch.no_grad():
            p.clamp_(max=MAX_LOGIT_SCALE)

    def _loss_scale(self) -> float | None:
        if self.cfg.precision.dtype != "fp16":
            return None
        scale = getattr(self.optimizer, "cur_scale", None) or getattr(self.optimizer, "loss_scale", None)
        return _float_or_none(scale)

    def data_report(self) -> dict | None:
        """The data's skip counts (data-set wide, from validation) and its run-time counters summed
        over ranks (a collective: every rank calls it); None for in-memory data."""
        stats = getattr(self.data, "stats", None)
        if stats is None:
            return None
        from ..data.loaders import RUNTIME_COUNTERS

        counters = [k for k in RUNTIME_COUNTERS if k != "vanished_shards"]
        runtime = torch.tensor([float(stats["runtime"].get(k, 0)) for k in counters], device=self.device)
        vanished = [stats["vanished"]]
        if self.world_size > 1:
            dist.all_reduce(runtime, group=self.group)
            vanished = [None] * self.world_size
            dist.all_gather_object(vanished, stats["vanished"], group=self.group)
        report = {k: v for k, v in stats.items() if k not in ("runtime", "delivered", "vanished")}
        report["runtime"] = {k: int(v) for k, v in zip(counters, runtime.tolist()) if v}
        report["vanished"] = sorted({path for paths in vanished for path in paths})
        if report["vanished"]:
            report["runtime"]["vanished_shards"] = len(report["vanished"])
        return report

    # ----------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss (the run's loss.kind) and image->text / text->image top-1 over global batches."""
        from .. import reference

        self.engine.eval()
        losses, i2t, t2i = [], [], []
        for b in range(self.cfg.evaluation.batches):
            images, tokens = self.data.eval_batch(b)
            img_parts, txt_parts = [], []
            micro = self.cfg.batch.micro_size
            for i in range(0, images.shape[0], micro):
                img, txt, scalars = self.forward(images[i:i + micro].to(self.device), tokens[i:i + micro].to(self.device))
                img_parts.append(img.float())
                txt_parts.append(txt.float())
            img, txt = torch.cat(img_parts), torch.cat(txt_parts)
            if self.world_size > 1:
                img = _all_gather_rows(img, self.group, self.world_size)
                txt = _all_gather_rows(txt, self.group, self.world_size)
            scale, *bias = (x.float() for x in scalars)
            logits = scale * img @ txt.t()  # (N, N)
            labels = torch.arange(logits.shape[0], device=logits.device)
            if self.siglip:
                losses.append(float(reference.siglip_loss(img, txt, scale, bias[0])))
            else:
                losses.append(float(0.5 * (torch.nn.functional.cross_entropy(logits, labels)
                                           + torch.nn.functional.cross_entropy(logits.t(), labels))))
            i2t.append(float((logits.argmax(1) == labels).float().mean()))
            t2i.append(float((logits.argmax(0) == labels).float().mean()))
        self.engine.train()
        return {"eval_loss": sum(losses) / len(losses), "eval_i2t_top1": sum(i2t) / len(i2t),
                "eval_t2i_top1": sum(t2i) / len(t2i)}

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """This rank's trainer state: counters, data position and RNG states (tensors, numbers, lists)."""
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_in_row": self.nonfinite_in_row,
            "world_size": self.world_size,
            "trained": trained_names(self.module),  # what a resume must train alike (finetune.py)
            "data": self.data.state_dict(),
            "rng": _full_rng_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("world_size", self.world_size) != self.world_size:
            warnings.warn(
                f"resuming a run saved on {state['world_size']} ranks on {self.world_size}: the data order "
                "continues, but the RNG streams of the ranks differ from an uninterrupted run",
                RuntimeWarning,
                stacklevel=2,
            )
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        self.nonfinite_total = int(state["nonfinite_total"])
        self.nonfinite_in_row = int(state["nonfinite_in_row"])
        self.data.load_state_dict(state["data"])
        _set_full_rng_state(state["rng"])

    def save_checkpoint(self, path: str) -> None:
        """Write DeepSpeed's state under `path`/ds and this rank's trainer state (every rank calls this)."""
        self.engine.save_checkpoint(path, tag=DS_TAG, save_latest=False)
        save_trainer_state(path, self.rank, self.state_dict())

    def load_checkpoint(self, path: str) -> None:
        from .checkpoint import CheckpointError

        state = load_trainer_state(path, self.rank)  # first: a changed parameter set is named, not "damaged"
        check_resumed_parameters(state, trained_names(self.module), path)
        try:
            load_path, _ = self.engine.load_checkpoint(path, tag=DS_TAG, load_optimizer_states=True,
                                                       load_lr_scheduler_states=True)
        except Exception as exc:  # damaged after it was written (its sizes still match): one sentence
            from ..model.weights import cause

            raise CheckpointError(f"cannot resume from {path}: DeepSpeed's files there cannot be read "
                                  f"({cause(exc)}); resume from an earlier checkpoint "
                                  "(pass its path to --resume)") from None
        if load_path is None:
            raise CheckpointError(f"{path} holds no readable DeepSpeed checkpoint (tag '{DS_TAG}')")
        self.load_state_dict(state)

    def full_gradients(self) -> dict:
        """{name: full fp32 gradient on CPU} of every parameter, from inside `grad_hook` (collective
        under ZeRO: every rank must call it)."""
        from deepspeed.utils import safe_get_full_grad

        grads = {}
        for name, p in self.module.named_parameters():
            g = safe_get_full_grad(p)
            grads[name] = None if g is None else g.detach().float().cpu().clone().reshape(
                self._declared_shapes.get(name, g.shape))
        return grads

    def full_state_dict(self, rank0_only: bool = False) -> dict:
        """The full model weights (gathered under ZeRO 3) in fp32 on CPU, with the model's declared
        shapes; every rank must call this (collective under ZeRO 3). `rank0_only`: {} on other ranks."""
        params = list(self.module.parameters())
        with self._gathered(params):
            if rank0_only and self.rank != 0:
                return {}
            state = {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}
        for name, shape in self._declared_shapes.items():
            state[name] = state[name].reshape(shape)
        return state


def _float_or_none(x) -> float | None:
    if x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None
