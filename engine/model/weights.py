"""Load released CLIP weights (OpenAI, OpenCLIP) and clipforge checkpoints without executing code.

Accepted: a state dict, or a file or folder holding one: OpenAI's TorchScript archives (a restricted
unpickler rebuilds the tensors, never importing or running archived code), `torch.save` state dicts
(weights_only=True), safetensors (clipforge's, with the model config in the metadata) and clipforge's
training checkpoints. The architecture is never guessed from shapes a file does not fix: see `load`.
"""
from __future__ import annotations

import collections
import io
import json
import os
import pickle
import re
import zipfile
from typing import Any, Mapping

import torch

from .config import CLIPConfig, TextConfig, VisionConfig, get_preset
from .clip import CLIP
from .families import LOADS, other_family


class CheckpointError(ValueError):
    """A checkpoint cannot be used: a weights file or state dict that cannot be read or does not fit the
    model, or a training checkpoint to resume from that is missing, incomplete or unreadable (raised by
    train/checkpoint.py too: one error for both)."""


def cause(exc: BaseException, path: str | None = None) -> str:
    """"Type: first line of the message" of a failed read or write (an empty one: the file's size)."""
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    size = f"; the file holds {os.path.getsize(path):,} bytes" if path and os.path.isfile(path) else ""
    return f"{type(exc).__name__}: {text or 'no message' + size}"


# ----------------------------------------------------------------------------- TorchScript archives
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stands in for any `__torch__.*` class of an archive: keeps its pickled state, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.state = None

    def __setstate__(self, state):
        self.state = state


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, read_record):
        super().__init__(io.BytesIO(data))
        self._read_record = read_record

    def find_class(self, module, name):
        if module.startswith("__torch__"):
            return type(name, (_ScriptObject,), {})
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_parameter"):
            return getattr(torch._utils, name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name == "device":
            return torch.device
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint (not a tensor or module)")

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel)
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        storage_type, key = pid[1], pid[2]
        dtype = storage_type.dtype
        raw = self._read_record(f"data/{key}")
        untyped = torch.frombuffer(bytearray(raw), dtype=torch.uint8).untyped_storage() if raw else torch.UntypedStorage(0)
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


# Bounds of a TorchScript archive's module tree: far above any CLIP's (ViT-bigG: ~2,000 tensors,
# depth ~6), far below what a hostile archive can make of shared references (a 2 KB pickle of dicts
# nested 40 deep, each referring twice to the next, is 2^40 paths: walking it hung `load`).
_MAX_DEPTH = 64
_MAX_TENSORS = 200_000


def _flatten_script_state(obj: Any, prefix: str, out: dict[str, torch.Tensor], seen: set | None = None,
                          depth: int = 0) -> None:
    seen = set() if seen is None else seen
    if id(obj) in seen:  # a shared (or cyclic) submodule is walked once: linear in the archive's size
        return
    if depth > _MAX_DEPTH:
        raise CheckpointError(f"the archive's module tree is nested deeper than {_MAX_DEPTH} levels; refusing it")
    seen.add(id(obj))
    state = obj.state if isinstance(obj, _ScriptObject) else obj
    if isinstance(state, tuple) and state and isinstance(state[0], dict):
        state = state[0]
    if not isinstance(state, dict):
        return
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            out[name] = value
            if len(out) > _MAX_TENSORS:
                raise CheckpointError(f"the archive holds more than {_MAX_TENSORS} tensors; refusing it")
        elif isinstance(value, (_ScriptObject, dict)):
            _flatten_script_state(value, name + ".", out, seen, depth + 1)


def _read_torchscript(path: str, zf: zipfile.ZipFile) -> dict[str, torch.Tensor]:
    names = zf.namelist()
    data_pkl = next((n for n in names if n.endswith("/data.pkl") and n.count("/") == 1), None)
    if data_pkl is None:
        raise CheckpointError(f"{path}: a zip archive without data.pkl is not a TorchScript or torch checkpoint")
    root = data_pkl.rsplit("/", 1)[0]
    module = _RestrictedUnpickler(zf.read(data_pkl), lambda rec: zf.read(f"{root}/{rec}")).load()
    out: dict[str, torch.Tensor] = {}
    _flatten_script_state(module, "", out)
    return out


def _is_torchscript(zf: zipfile.ZipFile) -> bool:
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def _check_zip(path: str, zf: zipfile.ZipFile) -> None:
    """Refuse, before reading any record, an archive whose records would inflate far beyond the file:
    torch.save and TorchScript store their records uncompressed, so their total is about the file's
    size; a 3 MB zip of deflated zeros made torch.load allocate 3 GB."""
    size = os.path.getsize(path)
    total = sum(info.file_size for info in zf.infolist())
    if total > 2 * size + (64 << 20):
        raise CheckpointError(
            f"{path}: its zip records would inflate to {total / 2**30:.1f} GiB from a {size / 2**20:.1f} MiB file; "
            "torch and TorchScript checkpoints store tensors uncompressed, so this is not one (a zip bomb?)")


# ----------------------------------------------------------------------------- files
def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Read tensors from a checkpoint file without executing code -> (state_dict, clipforge config or None)."""
    sd, cfg, _ = _read(path)
    return sd, cfg


def _read(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None, str]:
    """(state dict, stored clipforge config or None, kind): kind "openai-archive" for OpenAI's TorchScript
    files, "safetensors" or "torch" otherwise."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    try:
        if path.endswith(".safetensors") or (len(head) >= 9 and head[8:9] == b"{"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                sd = {k: f.get_tensor(k) for k in f.keys()}
            cfg = json.loads(meta["clipforge_config"]) if "clipforge_config" in meta else None
            return sd, cfg, "safetensors"
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                _check_zip(path, zf)
                if _is_torchscript(zf):
                    return _read_torchscript(path, zf), None, "openai-archive"
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (CheckpointError, FileNotFoundError):
        raise
    except Exception as exc:  # corrupt, truncated, or a pickle that needs code to load
        raise CheckpointError(f"{path} could not be read as a CLIP checkpoint ({cause(exc, path)}); "
                              "expected an OpenAI .pt archive, an OpenCLIP state dict, or a .safetensors file") from None
    return (*_unwrap(obj, path), "torch")


def _unwrap(obj: Any, where: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where} holds a {type(obj).__name__}, not a state dict")
    cfg = obj.get("clipforge_config") if isinstance(obj.get("clipforge_config"), dict) else None
    for key in ("state_dict", "model", "module"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{where} holds no tensors")
    if all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, cfg


# ----------------------------------------------------------------------------- training checkpoints
# The files of a training checkpoint `step_000123/` (train/checkpoint.py writes them; its docstring has the layout)
COMPLETE, MODEL_FILE, DS_TAG = "COMPLETE", "model.safetensors", "ds"
# DeepSpeed's module state in ds/: ZeRO 0-2's, then ZeRO 3's (rank 0's, which holds empty placeholders)
DS_MODULE_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
STEP_NAME = re.compile(r"^step_(\d+)$")


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def list_complete(directory: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints in `directory`, oldest first."""
    names = os.listdir(directory) if os.path.isdir(directory) else []
    found = [(int(m.group(1)), os.path.join(directory, n)) for n in names if (m := STEP_NAME.match(n))]
    return sorted((step, p) for step, p in found if os.path.isdir(p) and is_complete(p))


def _resolve_path(path: str) -> tuple[str, str | None]:
    """The file `load` reads for `path`, and the checkpoint directory when that file is a checkpoint's
    DeepSpeed module state (which stores no config), else None."""
    if not os.path.isdir(path):  # a file: DeepSpeed's module state is known by its place in a checkpoint
        ds = os.path.dirname(os.path.abspath(path))
        known = os.path.basename(ds) == DS_TAG and os.path.basename(path).endswith("_model_states.pt")
        return path, os.path.dirname(ds) if known else None
    model = os.path.join(path, MODEL_FILE)
    states = [f for n in DS_MODULE_STATES if os.path.isfile(f := os.path.join(path, DS_TAG, n))]
    name = os.path.basename(os.path.normpath(path)).removeprefix(".tmp-")
    if is_complete(path) or STEP_NAME.match(name) or os.path.isdir(os.path.join(path, DS_TAG)):
        if not is_complete(path):
            why = f"has no {COMPLETE} marker: its write was interrupted"
        elif os.path.isfile(model) or states:
            return (model, None) if os.path.isfile(model) else (states[0], path)
        else:
            why = f"holds neither {MODEL_FILE} nor DeepSpeed's module state ({DS_TAG}/{DS_MODULE_STATES[0]})"
        raise CheckpointError(f"{path} is a training checkpoint that {why}; load another checkpoint or the "
                              f"run's {MODEL_FILE}")
    if os.path.isfile(model):
        return model, None
    if done := list_complete(path) or list_complete(os.path.join(path, "checkpoints")):
        raise CheckpointError(f"{path} is a directory of training checkpoints, not one; pass one of them, e.g. "
                              f"the newest complete one, {done[-1][1]}")
    raise CheckpointError(f"{path} is a directory holding no {MODEL_FILE} and no complete training checkpoint "
                          f"(step_N/ with {COMPLETE}); pass a weights file or a checkpoint directory")


def _no_config(where: str, ckpt: str) -> str:
    """The refusal of a checkpoint's DeepSpeed module state given without model_name / config."""
    run_cfg = os.path.normpath(os.path.join(ckpt, os.pardir, os.pardir, "config.yaml"))
    hint = f" (the run's {run_cfg} names it under model.name)" if os.path.isfile(run_cfg) else ""
    return (f"{where} is DeepSpeed's module state of a training checkpoint, which stores no model config: pass "
            f"model_name= (--model-name on the CLI) or config={hint}")


# ----------------------------------------------------------------------------- families
def refuse_other_families(sd: Mapping[str, Any], where: str) -> None:
    """One sentence for a checkpoint of a family clipforge does not implement (before any guess)."""
    family = other_family(sd)
    if family is not None:
        raise CheckpointError(f"{where} is an OpenCLIP model of a family clipforge does not load: {family}; "
                              f"{LOADS}")


# ----------------------------------------------------------------------------- architecture
def _count(sd: Mapping[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def _mlp_ratio(sd: Mapping[str, torch.Tensor], key: str, width: int) -> float:
    """The MLP ratio the shapes fix (hidden width / width; 4 when the tower has no blocks)."""
    return sd[key].shape[0] / width if key in sd else 4.0


def _mlp_width(width: int, ratio: float) -> int:
    return round(width * ratio)  # int(width * ratio) in the model; round() here, so inferred ratios compare equal


def infer_config(sd: Mapping[str, torch.Tensor], quick_gelu: bool = True) -> CLIPConfig:
    """The architecture of a released-format state dict, from its tensor shapes (heads = width / 64)."""
    try:
        embed_dim = sd["text_projection"].shape[1]
        t_width = sd["ln_final.weight"].shape[0]
        text = TextConfig(
            context_length=sd["positional_embedding"].shape[0],
            vocab_size=sd["token_embedding.weight"].shape[0],
            width=t_width,
            heads=max(1, t_width // 64),
            layers=_count(sd, r"transformer\.resblocks\.(\d+)\."),
            mlp_ratio=_mlp_ratio(sd, "transformer.resblocks.0.mlp.c_fc.weight", t_width),
        )
        if "visual.proj" in sd:
            width = sd["visual.conv1.weight"].shape[0]
            patch = sd["visual.conv1.weight"].shape[-1]
            grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = VisionConfig(
                image_size=patch * grid,
                layers=_count(sd, r"visual\.transformer\.resblocks\.(\d+)\."),
                width=width,
                patch_size=patch,
                heads=max(1, width // 64),
                mlp_ratio=_mlp_ratio(sd, "visual.transformer.resblocks.0.mlp.c_fc.weight", width),
            )
        else:
            layers = tuple(_count(sd, rf"visual\.layer{b}\.(\d+)\.") for b in (1, 2, 3, 4))
            width = sd["visual.layer1.0.conv1.weight"].shape[0]
            grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = VisionConfig(image_size=grid * 32, layers=layers, width=width, patch_size=None)
    except KeyError as exc:
        raise CheckpointError(
            f"cannot infer the CLIP architecture: key {exc.args[0]!r} is missing; {LOADS}"
        ) from None
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text, quick_gelu=quick_gelu)


def _shape_key(cfg: CLIPConfig) -> dict:
    """What tensor shapes fix of a config: everything but the activation and the attention heads (the MLP
    ratio as the hidden width it gives)."""
    d = cfg.to_dict()
    d.pop("quick_gelu", None)
    for tower in ("vision", "text"):
        d[tower].pop("heads", None)
        d[tower]["mlp_ratio"] = _mlp_width(d[tower]["width"], d[tower]["mlp_ratio"])
    return d


def _ambiguous(sd: Mapping[str, torch.Tensor], where: str) -> str:
    """The refusal of a plain state dict without a name, naming the presets its shapes match."""
    from .config import PRESETS

    inferred = _shape_key(infer_config(sd))
    matches = [n for n in sorted(PRESETS) if _shape_key(PRESETS[n]) == inferred]
    if matches:
        names = ", ".join(f"{n!r} (GELU) or '{n}-quickgelu' (QuickGELU)" for n in matches)
        how = f"its shapes are those of {names}: pass model_name= (--model-name on the CLI)"
    else:
        how = ("no preset has its shapes: pass config= (a CLIPConfig with the activation and both towers' "
               "heads)")
    return (f"{where} is a plain state dict, which does not say its activation (QuickGELU in OpenAI's weights, "
            f"GELU in OpenCLIP's LAION / DataComp ones) nor its attention heads; clipforge does not guess them: "
            f"{how}")


# Non-tensor-state entries of OpenAI's archives that are not model weights.
_IGNORED_KEYS = {"input_resolution", "context_length", "vocab_size", "attn_mask"}


def load_state_dict_strict(model: CLIP, sd: Mapping[str, torch.Tensor], where: str = "state dict", keep=None) -> None:
    """Copy `sd` into `model`, refusing with the names of missing, unexpected or mis-shaped keys (a tensor of
    one element for a 0-dim parameter is reshaped). keep(name): only the keys it accepts, on both sides."""
    own = {k: v for k, v in model.state_dict().items() if keep is None or keep(k)}
    sd = {k: v for k, v in sd.items() if keep is None or keep(k)}
    # a one-element tensor for a 0-dim parameter (DeepSpeed's module state holds logit_scale as (1,))
    sd = {k: v.reshape(()) if k in own and own[k].dim() == 0 and v.dim() and v.numel() == 1 else v
          for k, v in sd.items() if k.rsplit(".", 1)[-1] not in _IGNORED_KEYS}
    own = {k: v for k, v in own.items() if not k.endswith("num_batches_tracked") or k in sd}
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shaped = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if shaped:
        problems.append(
            "mis-shaped keys: " + _names([f"{k} (checkpoint {tuple(sd[k].shape)}, model {tuple(own[k].shape)})" for k in shaped])
        )
    if problems:
        raise CheckpointError(f"{where} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(sd, strict=False)


def _names(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load(
    path_or_state_dict,
    *,
    model_name: str | None = None,
    quick_gelu: bool | None = None,
    config: CLIPConfig | dict | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    allow_nonfinite: bool = False,
) -> CLIP:
    """Build a CLIP model from released weights or a clipforge checkpoint; returns it in eval mode.

    path_or_state_dict: a file path, a state dict, or a directory: a complete training checkpoint (`step_N/`:
    its model.safetensors, or in one written without it DeepSpeed's module state, which needs `model_name` or
    `config`) or a run's output directory (its model.safetensors). The architecture comes from, in order:
    `config`, `model_name` (a preset, with OpenCLIP's names and meanings: "ViT-B-32" is GELU,
    "ViT-B-32-quickgelu" QuickGELU; see `list_models()`), the config stored in a clipforge file (safetensors,
    `clipforge.save`, training checkpoints), or, for OpenAI's own .pt archives only, the tensor shapes
    (QuickGELU and a head width of 64 by definition). Nothing is guessed: a plain state dict without a name
    does not say its activation or its heads, and is refused with one sentence naming the presets its shapes
    match; shapes that contradict the named config are refused naming the tensor and both shapes.
    `quick_gelu` overrides the activation of the resolved config. Weights holding NaN or infinity are refused
    (a model that would embed everything as NaN) unless `allow_nonfinite=True`, to inspect such a file.
    """
    sd, stored_cfg, kind, where = read_checked(path_or_state_dict, config is not None or model_name is not None,
                                               allow_nonfinite)
    if config is not None:
        cfg = config if isinstance(config, CLIPConfig) else CLIPConfig.from_dict(config)
    elif model_name is not None:
        cfg = get_preset(model_name)
    elif stored_cfg is not None:
        cfg = CLIPConfig.from_dict(stored_cfg)
    elif kind == "openai-archive":
        cfg = infer_config(sd, quick_gelu=True)
    else:
        raise CheckpointError(_ambiguous(sd, where))
    if quick_gelu is not None:
        cfg.quick_gelu = quick_gelu
    if "logit_bias" in sd and cfg.init_logit_bias is None:  # SigLIP-trained (OpenCLIP --siglip): a bias parameter
        cfg = cfg.replace(init_logit_bias=float(sd["logit_bias"].reshape(-1)[0]))
    _check_layers(cfg, sd, where)  # before any module is built: a config can declare millions of layers
    with torch.device("meta"):
        model = CLIP(cfg)
    _check_size(model, sd, where)  # before any memory is allocated
    model = model.to_empty(device="cpu")
    _reset_buffers(model)
    load_state_dict_strict(model, sd, where)
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()


def read_checked(path_or_state_dict, named: bool, allow_nonfinite: bool = False):
    """What `load` reads, refused as `load` refuses it, before any model is built -> (state dict, stored config
    or None, kind, where). named: a model name or config comes with it (a module state needs one)."""
    if isinstance(path_or_state_dict, Mapping):
        sd, stored_cfg = _unwrap(path_or_state_dict, "the state dict")
        where, kind = "the state dict", "state dict"
    else:
        where, ckpt = _resolve_path(os.fspath(path_or_state_dict))
        sd, stored_cfg, kind = _read(where)
        if empty := sorted(k for k, v in sd.items() if v.numel() == 0):
            raise CheckpointError(f"{where} holds empty placeholders for {len(empty)} of its {len(sd)} tensors "
                                  f"(e.g. {empty[0]}): the module state of a ZeRO stage 3 checkpoint, whose weights "
                                  f"DeepSpeed partitions across ranks; load the {MODEL_FILE} of the checkpoint or of "
                                  "the run, or consolidate the partitions with the checkpoint's zero_to_fp32.py")
        if ckpt is not None and not named:
            raise CheckpointError(_no_config(where, ckpt))
    refuse_other_families(sd, where)
    if not allow_nonfinite:
        _check_finite(sd, where)
    return sd, stored_cfg, kind, where


def _check_finite(sd: Mapping[str, torch.Tensor], where: str) -> None:
    # (OpenAI's archives carry the causal attn_mask, -inf above the diagonal by construction: not a weight)
    bad = [k for k, t in sd.items() if k.rsplit(".", 1)[-1] not in _IGNORED_KEYS and t.is_floating_point()
           and not bool(torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"{where} holds non-finite weights (NaN or infinity) in {_names(sorted(bad))}: "
                              "a run that diverged? Load an earlier checkpoint, or pass allow_nonfinite=True "
                              "to inspect this one")


def _layer_counts(sd: Mapping[str, Any]) -> dict[str, int]:
    counts = {"text": _count(sd, r"transformer\.resblocks\.(\d+)\."),
              "vision": _count(sd, r"visual\.transformer\.resblocks\.(\d+)\.")}
    for b in (1, 2, 3, 4):
        counts[f"layer{b}"] = _count(sd, rf"visual\.layer{b}\.(\d+)\.")
    return counts


def _check_layers(cfg: CLIPConfig, sd: Mapping[str, Any], where: str) -> None:
    """The layers the config declares must be among the tensors' (a 500-byte safetensors file whose
    stored config declared 10 million layers took minutes and gigabytes to build before the key check)."""
    have = _layer_counts(sd)
    declared = {"text": cfg.text.layers}
    if cfg.vision.is_resnet:
        declared.update({f"layer{b}": n for b, n in zip((1, 2, 3, 4), cfg.vision.layers)})
    else:
        declared["vision"] = cfg.vision.layers
    over = {k: (n, have[k]) for k, n in declared.items() if n > have[k]}
    if over:
        detail = ", ".join(f"{n} {k} layers, the tensors {h}" for k, (n, h) in over.items())
        raise CheckpointError(f"{where}: the model config declares {detail}; the config does not fit these "
                              "weights (check model_name / config, or the stored config)")
    # a lower bound of the parameters (attention + MLP of every block, the token embedding): a width of
    # millions is refused here, before even the meta-device model is built
    t, v = cfg.text, cfg.vision
    least = t.layers * (4 + 2 * t.mlp_ratio) * t.width ** 2 + t.vocab_size * t.width
    least += sum(v.layers) * v.width ** 2 if v.is_resnet else v.layers * (4 + 2 * v.mlp_ratio) * v.width ** 2
    have_values = sum(x.numel() for x in sd.values())
    if least > 2 * have_values + (1 << 20):
        raise CheckpointError(f"{where}: the model config needs at least {int(least):,} parameters, the file holds "
                              f"{have_values:,} values; the config does not fit these weights")


def _check_size(model: CLIP, sd: Mapping[str, torch.Tensor], where: str) -> None:
    """The model (on the meta device: no memory yet) cannot need many more parameters than the file
    holds (a near miss goes on to the key check, which names the keys)."""
    need = sum(p.numel() for p in model.parameters())
    have = sum(t.numel() for t in sd.values())
    if need > 2 * have + (1 << 20):
        raise CheckpointError(f"{where}: the model config needs {need:,} parameters, the file holds {have:,} values; "
                              "the config does not fit these weights")


def _reset_buffers(model: CLIP) -> None:
    # to_empty leaves buffers uninitialised; released checkpoints may omit num_batches_tracked
    for name, buf in model.named_buffers():
        if name.endswith("num_batches_tracked"):
            buf.zero_()


def save(model: CLIP, path: str | os.PathLike) -> None:
    """Write `model` as safetensors with its config in the metadata (what `load` reads back)."""
    save_state_dict(model.state_dict(), model.config, path)


def save_state_dict(state: dict, config: CLIPConfig, path: str | os.PathLike) -> None:
    """Write CLIP weights as safetensors with `config` in the metadata, atomically (tmp file + rename)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    tmp = f"{os.fspath(path)}.tmp"
    save_file(sd, tmp, metadata={"clipforge_config": json.dumps(config.to_dict())})
    os.replace(tmp, path)
