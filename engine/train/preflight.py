"""Preflight: resolve a whole training run before anything starts, and refuse it with one sentence.

`clipforge train` calls `preflight(cfg, resume)` right after building the config, before the process
group, DeepSpeed (which also compiles CPU ops), the model or any data loading, and before anything is
written into the output folder. It reads files and imports packages, never writes. What it resolves:

- the config's own ranges (`TrainConfig.check`, which runs `DataConfig.check`) and the ones that need
  the number of ranks (`TrainConfig.validate`, the DeepSpeed JSON of `deepspeed.config_file`);
- the output and checkpoint folders (not empty, not an existing file, creatable; a used one only with
  --resume or --force, and none that another live run holds: engine/train/rundir.py);
- the model: `model.name` is a preset and `model.overrides` build a valid `CLIPConfig` (no module built),
  and synthetic captions fit its context length and vocabulary;
- webdataset shards: `data.path` / `data.eval_path` expand to existing tars, each readable, and at least
  one holding a sample (an image and a .txt caption of one key: headers only, nothing decoded; the full
  per-sample validation is the catalog's, at start-up);
- `evaluation.zeroshot`: its path a labelled folder with images (or labelled shards), its templates and
  class names what `clipforge eval --task zeroshot` accepts (`check_zeroshot`);
- the packages the config turns on: tensorboard, matplotlib, tqdm, DALI (and DeepSpeed itself);
- `--resume` (a checkpoint that exists), and fp16 asking for a GPU on a machine without one.

Every rank runs it on the same config and refuses with the same sentence (`ConfigError`).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor

from .config import ConfigError, TrainConfig

# what the run imports when a key turns it on: (key, modules imported, pip package, how to turn it off)
OPTIONAL_PACKAGES = (
    ("logging.tensorboard", ("tensorboard", "torch.utils.tensorboard"), "tensorboard", "--set logging.tensorboard=false"),
    ("logging.plot", ("matplotlib", "matplotlib.pyplot"), "matplotlib", "--set logging.plot=false"),
    ("logging.progress_bar", ("tqdm",), "tqdm", "--set logging.progress_bar=false"),
)
DALI = ("data.loader", ("nvidia.dali",), "nvidia-dali-cuda120", "--set data.loader=pytorch (or auto)")


def preflight(cfg: TrainConfig, resume: str | None = None, world_size: int | None = None,
              force: bool = False) -> None:
    """Refuse, with one sentence naming the key, file or package and the fix (ConfigError), a run
    that would fail after start-up, or clobber an earlier run's folder (engine/train/rundir.py). Writes nothing."""
    from .rundir import check_free

    cfg.check()
    world = world_size if world_size is not None else _world_size()
    cfg.deepspeed_config(world)  # validate(world), and deepspeed.config_file read and checked
    check_output(cfg)
    check_free(cfg, resume, force)
    model_config = check_model(cfg)
    from .finetune import check_locks, check_pretrained_paths

    check_pretrained_paths(cfg)
    check_locks(cfg, model_config)
    check_data(cfg, model_config)
    check_zeroshot(cfg)
    check_packages(cfg)
    check_device(cfg)
    if resume:
        from .checkpoint import CheckpointError, resolve_resume

        try:
            # the run-id check reads the output folder, which may be node-local: rank 0's to make
            resolve_resume(resume, cfg.checkpoint_dir, cfg.output_dir if os.environ.get("RANK", "0") == "0" else None)
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from None


def _world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    value = os.environ.get("WORLD_SIZE", "1")
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"environment variable WORLD_SIZE is {value!r}, not a number of ranks: launch with "
                          "`deepspeed` (or torchrun), or unset it for one process")
    return int(value)


# ------------------------------------------------------------------------------------ folders
def check_output(cfg: TrainConfig) -> None:
    if not str(cfg.output_dir).strip():
        raise ConfigError("config key 'output_dir' is empty: give the run a folder with --output-dir DIR "
                          "(or output_dir: in the config)")
    _check_folder("output_dir", cfg.output_dir, "choose another --output-dir")
    if cfg.checkpointing.dir:
        _check_folder("checkpointing.dir", cfg.checkpointing.dir, "set checkpointing.dir to a folder")
    else:
        _check_folder("output_dir", cfg.checkpoint_dir, "remove that file or choose another --output-dir")
    if cfg.data.kind == "webdataset" and cfg.data.cache_dir:
        _check_folder("data.cache_dir", cfg.data.cache_dir, "set data.cache_dir to a folder")


def _check_folder(key: str, path: str, fix: str) -> None:
    """`path` is a folder, or can be made one: its first existing ancestor is a writable folder."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"config key '{key}': {path} is an existing file, not a folder; {fix}")
    ancestor = path
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ConfigError(f"config key '{key}': {path} cannot be created, {ancestor} is a file; {fix}")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"config key '{key}': {path} cannot be written (no write permission on {ancestor}); {fix}")


# -------------------------------------------------------------------------------------- model
def check_model(cfg: TrainConfig):
    """The run's CLIPConfig (preset + overrides, validated; no module built)."""
    from ..model.config import get_preset, list_models
    from ..ops import ATTENTION_BACKENDS

    name = cfg.model.name
    try:
        base = get_preset(name)
    except ValueError:
        raise ConfigError(f"config key 'model.name' is {name!r}, which is no model preset; use one of "
                          f"{', '.join(list_models())} (or NAME-quickgelu)") from None
    try:
        model_config = base.replace(**cfg.model_overrides(), grad_checkpointing=cfg.model.grad_checkpointing)
    except (ConfigError, TypeError, ValueError) as exc:
        # the model config names its keys relative to itself: name them in the run config
        message = re.sub(r"key '([^']+)'", r"key 'model.overrides.\1'", str(exc))
        if cfg.model.patch_dropout:  # then vision.patch_dropout came from model.patch_dropout (check() refuses both)
            message = message.replace("model.overrides.vision.patch_dropout", "model.patch_dropout")
        raise ConfigError(message) from None
    backend = str(model_config.attention_backend).lower()
    if backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"config key 'model.overrides.attention_backend' must be one of "
                          f"{', '.join(ATTENTION_BACKENDS)}, got {model_config.attention_backend!r}")
    return model_config


# --------------------------------------------------------------------------------------- data
def check_data(cfg: TrainConfig, model_config) -> None:
    from ..data.config import split_sources

    data = cfg.data
    if data.kind == "synthetic":
        from ..data.synthetic import CLASS_TOKEN

        limit = model_config.text.context_length
        if not 3 <= data.context_length <= limit:
            raise ConfigError(f"config key 'data.context_length' must be between 3 and the model's context length "
                              f"{limit}, got {data.context_length}")
        if model_config.text.vocab_size <= CLASS_TOKEN + data.num_classes + 2:
            raise ConfigError(f"config key 'data.num_classes' ({data.num_classes}) needs a vocabulary of more than "
                              f"{CLASS_TOKEN + data.num_classes + 2} tokens, the model has {model_config.text.vocab_size}")
        return
    if data.sources is not None:  # several sources: each must exist and hold samples, named by its key
        for i, source in enumerate(data.sources):
            check_shards(f"data.sources[{i}].path", source["path"])
    else:  # OpenCLIP's "a::b": the same for each of its sources
        for spec in split_sources(data.path) or [data.path]:
            check_shards("data.path", spec)
    if data.eval_path:
        for spec in split_sources(data.eval_path) or [data.eval_path]:
            check_shards("data.eval_path", spec)
    elif cfg.evaluation.every_steps:
        raise ConfigError(f"config key 'evaluation.every_steps' is {cfg.evaluation.every_steps}, but webdataset "
                          "evaluation reads held-out shards: set data.eval_path, or evaluation.every_steps=0")


def check_shards(key: str, spec) -> list[str]:
    """The shard files of `spec` (clipforge.data's expansion), each a readable tar, one at least holding a
    sample; returns their paths."""
    from ..data.config import DataError
    from ..data.webdataset import expand_shards

    try:
        paths = expand_shards(spec)
    except DataError as exc:
        raise ConfigError(f"{str(exc).replace('data.path', key)}; fix {key}, or write shards with "
                          "`clipforge make-shards`") from None
    with ThreadPoolExecutor(min(8, len(paths))) as pool:  # one header or a few per shard: I/O bound
        states = list(pool.map(_shard_state, paths))
    for path, state in zip(paths, states):
        if state not in ("sample", "empty"):
            raise ConfigError(f"shard {path} is not a readable tar file ({state}); remove it from {key}")
    if "sample" not in states:
        what = f"shard {paths[0]} holds no" if len(paths) == 1 else f"none of the {len(paths)} shards of {spec!r} holds a"
        raise ConfigError(f"config key '{key}': {what} sample (an image and a .txt caption of one key); point "
                          f"{key} at webdataset shards, e.g. written by `clipforge make-shards`")
    return paths


def _shard_state(path: str) -> str:
    """"sample" once a member pair (image, caption) of one key is found, "empty" if none is, else the
    reason the tar cannot be read. Reads member headers only, and stops at the first sample."""
    from ..data.webdataset import CAPTION_EXT, IMAGE_EXTS, split_name

    try:
        with tarfile.open(path, "r:") as tar:
            key, exts = None, set()
            for member in tar:
                if not member.isreg():
                    continue
                name, ext = split_name(member.name)
                if not name or os.path.basename(name).startswith("."):
                    continue
                if name != key:
                    key, exts = name, set()
                exts.add(ext.lower())
                if CAPTION_EXT in exts and exts & set(IMAGE_EXTS):
                    return "sample"
    except (tarfile.TarError, OSError, EOFError) as exc:
        return str(exc) or type(exc).__name__
    return "empty"


# ----------------------------------------------------------------------------------- zero-shot
def check_zeroshot(cfg: TrainConfig) -> None:
    """evaluation.zeroshot (when set) as `clipforge eval --task zeroshot` will read it: the path a labelled
    folder holding images in its class folders (or labelled shards, which need `classes`), the templates
    a template set, JSON file or list, and the class names one per class folder."""
    zs = cfg.evaluation.zeroshot
    if not zs.path:
        return
    from ..data.config import DataError
    from ..data.webdataset import expand_shards
    from ..serve.datasets import EvalDataError, _classnames_for, _is_webdataset, image_folder
    from ..serve.prompts import get_templates

    key = "evaluation.zeroshot.path"
    if not os.path.exists(zs.path) and not _is_webdataset(zs.path):
        raise ConfigError(f"config key '{key}': {zs.path} does not exist; give a labelled folder (one sub-folder "
                          "of images per class, as `clipforge eval --task zeroshot --data` takes)")
    folders = None
    try:
        if _is_webdataset(zs.path):
            if not any(_has_labelled_sample(shard) for shard in expand_shards(zs.path)):
                raise ConfigError(f"config key '{key}': no shard of {zs.path} holds a labelled sample (an image and "
                                  "a .cls integer label of one key); give a labelled folder or labelled shards")
        else:
            _, _, folders = image_folder(zs.path)
    except (DataError, EvalDataError) as exc:
        raise ConfigError(f"config key '{key}': {str(exc).replace('data.path', key)}") from None
    try:
        get_templates(zs.templates)
    except ValueError as exc:
        raise ConfigError(f"config key 'evaluation.zeroshot.templates': {exc}") from None
    try:
        names = _classnames_for(folders, zs.classes, None, zs.path)
    except (EvalDataError, ValueError, TypeError, OSError) as exc:  # FileNotFoundError: a classes file
        raise ConfigError(f"config key 'evaluation.zeroshot.classes': {exc}") from None
    if len(names) < 2:
        raise ConfigError(f"config key '{key}': {zs.path} has {len(names)} class; zero-shot classification needs "
                          "at least two classes")


def _has_labelled_sample(path: str) -> bool:
    """Whether the tar holds an image and a .cls label of one key (member headers only, up to the first)."""
    from ..data.webdataset import IMAGE_EXTS, split_name

    try:
        with tarfile.open(path, "r:") as tar:
            seen: dict[str, set] = {}
            for member in tar:
                if not member.isreg():
                    continue
                name, ext = split_name(member.name)
                exts = seen.setdefault(name, set())
                exts.add(ext.lower())
                if "cls" in exts and exts & set(IMAGE_EXTS):
                    return True
    except (tarfile.TarError, OSError, EOFError):
        return False
    return False


# ----------------------------------------------------------------------------------- packages
def check_packages(cfg: TrainConfig) -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("package deepspeed is not installed, and clipforge train runs on it: "
                          "pip install 'clipforge[train]' (or deepspeed)")
    needed = [entry for entry in OPTIONAL_PACKAGES if getattr(cfg.logging, entry[0].split(".")[1])]
    if cfg.data.kind == "webdataset" and cfg.data.loader == "dali":
        needed.append(DALI)
    for key, modules, package, off in needed:
        try:
            for module in modules:
                importlib.import_module(module)
        except Exception as exc:  # not installed (ImportError), or installed but broken
            raise ConfigError(f"config key '{key}' needs the package {package}, which cannot be imported "
                              f"({type(exc).__name__}: {exc}); pip install {package}, or turn it off with {off}") from None


# ------------------------------------------------------------------------------------- device
def check_device(cfg: TrainConfig) -> None:
    if cfg.precision.dtype == "fp16" and not _has_accelerator():
        raise ConfigError("config key 'precision.dtype' is fp16, which needs a GPU; use fp32 (or bf16) on CPU")


def _has_accelerator() -> bool:
    """Whether DeepSpeed will pick an accelerator other than the CPU (DS_ACCELERATOR, else detection)."""
    import torch

    chosen = os.environ.get("DS_ACCELERATOR")
    if chosen:
        return chosen != "cpu"
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    if (xpu is not None and xpu.is_available()) or (mps is not None and mps.is_available()):
        return True
    return any(importlib.util.find_spec(m) is not None for m in ("torch_npu", "habana_frameworks"))
