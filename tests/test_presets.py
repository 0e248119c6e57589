"""OpenCLIP's plain-ViT family and OpenAI's nine layouts as clipforge presets: OpenCLIP's shapes,
parameter counts and outputs.

Every preset is checked against `open_clip.create_model(name)` (GELU, the names' OpenCLIP meaning):
parameter count, tensor names and shapes, and head count on the meta device; image and text embeddings
within 1e-5 relative at random init on CPU in fp32, the small models at full size and the large ones
(L-16, H-14, H-16, g-14, bigG-14) at 2 vision and 2 text layers but full width, heads and MLP width.
The large ones at full size run in `test_full_size_parity_of_the_large_models` (marked slow, and
skipped unless CLIPFORGE_FULL_PARITY=1: scripts/test.sh runs slow tests, and ViT-bigG-14 needs two
fp32 copies of 2.5 B parameters, ~21 GB, and minutes of CPU).

OpenAI's nine layouts (RN50, RN101, RN50x4, RN50x16, RN50x64, ViT-B-32, ViT-B-16, ViT-L-14,
ViT-L-14-336), each under its GELU name and its `-quickgelu` twin, as OpenCLIP builds them: saved with
torch.save and read back with `clipforge.load(path, model_name=NAME)`, the four cheap on CPU at full
size; the five wide ones at reduced depth (ResNet stages [1, 1, 1, 1], 2 vision and 2 text layers for
the ViTs) but full width, heads and resolution, loaded with the preset's config at that depth. All 18
at full size by name: `test_full_size_parity_of_the_openai_layouts` (slow, CLIPFORGE_FULL_PARITY=1).
"""
import contextlib
import os
from unittest import mock

import pytest
import torch

import clipforge
from clipforge.model import get_preset, list_models, num_parameters
from clipforge.model.clip import CLIP
from test_model import RELEASED_PARAMS, _assert_close, _inputs  # the OpenAI presets' tests' helpers

open_clip = pytest.importorskip("open_clip")

SMALL = ["ViT-S-32", "ViT-S-16", "ViT-M-32", "ViT-M-16", "ViT-B-32-256", "ViT-B-16-plus-240"]
LARGE = ["ViT-L-16", "ViT-H-14", "ViT-H-16", "ViT-g-14", "ViT-bigG-14"]
NEW = SMALL + LARGE

# OpenAI's layouts, under OpenCLIP's names (GELU) and their -quickgelu twins (QuickGELU)
OPENAI_CHEAP = ["RN50", "RN101", "ViT-B-32", "ViT-B-16"]  # full size by name in CI (4-7 s a test, 1 thread)
OPENAI_WIDE = ["RN50x4", "RN50x16", "RN50x64", "ViT-L-14", "ViT-L-14-336"]  # reduced depth in CI (2-11 s)
OPENAI = OPENAI_CHEAP + OPENAI_WIDE


def _twins(names):
    return [n + suffix for n in names for suffix in ("", "-quickgelu")]

# OpenCLIP's parameter counts of these architectures (open_clip 3.3.0, computed on the meta device)
OPENCLIP_PARAMS = {
    "ViT-S-32": 63_085_825,
    "ViT-S-16": 62_257_537,
    "ViT-M-32": 103_119_873,
    "ViT-M-16": 102_015_489,
    "ViT-B-32-256": 151_288_833,
    "ViT-B-16-plus-240": 208_377_345,
    "ViT-L-16": 427_739_393,
    "ViT-H-14": 986_109_441,
    "ViT-H-16": 986_263_041,
    "ViT-g-14": 1_366_678_273,
    "ViT-bigG-14": 2_539_567_105,
}


def _vision_depth(name: str, depth: int | None):
    """The vision layers at reduced `depth`: `depth` blocks for a ViT, one block per stage for a ResNet."""
    if depth is None:
        return None
    return [1, 1, 1, 1] if get_preset(name).vision.is_resnet else depth


def _openclip(name: str, depth: int | None = None, meta: bool = False):
    """OpenCLIP's model of `name` (its own JSON config), optionally at `depth` text layers and
    `_vision_depth(name, depth)` vision layers."""
    kwargs = {}
    if depth is not None:
        cfg = open_clip.get_model_config(name)
        kwargs = dict(vision_cfg={**cfg["vision_cfg"], "layers": _vision_depth(name, depth)},
                      text_cfg={**cfg["text_cfg"], "layers": depth})
    if meta:  # built on the meta device directly (create_model(device="meta") alone builds on CPU, then moves)
        with torch.device("meta"):
            return open_clip.create_model(name, device="meta", **kwargs)
    return open_clip.create_model(name, **kwargs)


@contextlib.contextmanager
def _no_init():
    """torch.nn.init's initialisers as no-ops: OpenCLIP's init of a reference that `_randomize` then
    overwrites entirely took 3 s of RN50x64's ~13 s parity test (its reference's build)."""
    with contextlib.ExitStack() as stack:
        for fn in ("constant_", "dirac_", "eye_", "kaiming_normal_", "kaiming_uniform_", "normal_", "ones_",
                   "orthogonal_", "sparse_", "trunc_normal_", "uniform_", "xavier_normal_", "xavier_uniform_",
                   "zeros_"):
            stack.enter_context(mock.patch.object(torch.nn.init, fn, lambda t, *args, **kwargs: t))
        yield


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere, biases and norm gains included (OpenCLIP's init leaves them 0 / 1), and
    the ResNets' BatchNorm statistics (after the parameters: the ViTs' draws do not depend on them)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or name.endswith("attn_mask"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name == "logit_scale":
                t.fill_(4.0)
            elif t.dim() == 1 and ("ln" in name or "bn" in name or "downsample.1" in name) and name.endswith("weight"):
                t.normal_(1.0, 0.2, generator=g)
            elif t.dim() <= 1:
                t.normal_(0.0, 0.1, generator=g)
            else:
                fan_in = t[0].numel() if t.dim() > 2 else t.shape[-1]
                t.normal_(0.0, fan_in**-0.5, generator=g)


# An OpenAI layout's weights, kept from its GELU test for its -quickgelu twin, which runs next and uses
# them once: [(name, depth), state dict, the file they were saved to]. At most one model's weights held.
_TWIN: list = [None, None, None]


def _check_parity(name: str, depth: int | None, path=None) -> None:
    # One thread: on the busy 2-core CI machine two OpenMP threads made these tests 2x slower, not faster
    # (the same finding as tests/conftest.py's digits_clip fixture).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _compare(name, depth, path)
    finally:
        torch.set_num_threads(threads)


def _compare(name: str, depth: int | None, path=None) -> None:
    """OpenCLIP's `name` at random weights against clipforge's load of its state dict (through the file
    `path` with torch.save when given, as users load released weights): by name at full size, by the
    preset's config at the same reduced depth otherwise."""
    quick = name.endswith("-quickgelu")
    key = (name.removesuffix("-quickgelu"), depth)
    twin = list(_TWIN) if quick and _TWIN[0] == key else None
    _TWIN[:] = [None, None, None]  # released before this model is built
    with _no_init():  # every parameter and float buffer is drawn below (or is the twin's)
        ref = _openclip(name, depth)
    if twin:
        ref.load_state_dict(twin[1])  # what _randomize would draw again (1-2 s for the large ones)
        twin[1] = None
    else:
        _randomize(ref)
    ref.eval()
    # the reference really runs the activation its name says (QuickGELU is a module of open_clip's own)
    assert (type(ref.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU") == quick, name
    cfg = get_preset(name)
    if depth is not None:
        cfg = cfg.replace(vision={"layers": _vision_depth(name, depth)}, text={"layers": depth})
    sd = ref.state_dict()
    if path is not None:
        if not (twin and twin[2] and os.path.exists(twin[2])):
            torch.save(sd, path)
        else:
            path = twin[2]
    if not quick and key[0] in OPENAI:
        _TWIN[:] = [key, sd, path]
    if path is not None:
        sd = str(path)
    ours = clipforge.load(sd, model_name=name) if depth is None else clipforge.load(sd, config=cfg)
    assert ours.config == cfg and ours.config.quick_gelu == quick
    images, tokens = _inputs(cfg.vision.image_size)
    with torch.no_grad():
        _assert_close(ours.encode_image(images), ref.encode_image(images), f"{name} encode_image")
        _assert_close(ours.encode_text(tokens), ref.encode_text(tokens), f"{name} encode_text")


def test_list_models():
    names = list_models()
    assert names == sorted(names) == sorted(clipforge.model.PRESETS)
    assert set(NEW) <= set(names)
    assert not any("/" in n or n.endswith("-quickgelu") for n in names)  # OpenAI spellings, twins: not listed


@pytest.mark.parametrize("name", NEW)
def test_shapes_and_parameter_count_match_openclip(name):
    """Tensor names, shapes, head counts and parameter count of OpenCLIP's build (both on the meta device)."""
    cfg = get_preset(name)
    assert not cfg.quick_gelu  # OpenCLIP's names mean GELU
    assert get_preset(name + "-quickgelu").quick_gelu
    with torch.device("meta"):
        ours = CLIP(cfg)
    theirs = _openclip(name, meta=True)
    assert num_parameters(ours) == num_parameters(theirs) == OPENCLIP_PARAMS[name]
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in theirs.state_dict().items() if k != "attn_mask"}
    assert a == b
    # heads do not show in the shapes: compare them directly
    assert ours.visual.transformer.resblocks[0].attn.heads == theirs.visual.transformer.resblocks[0].attn.num_heads
    assert ours.transformer.resblocks[0].attn.heads == theirs.transformer.resblocks[0].attn.num_heads


def test_head_and_mlp_widths_of_the_large_models():
    """Head width 80 / 88 / 104 and OpenCLIP's rounding of the MLP width (int(width * mlp_ratio))."""
    want = {"ViT-L-16": (16, 4096), "ViT-H-14": (16, 5120), "ViT-g-14": (16, 6144), "ViT-bigG-14": (16, 8192)}
    for name, (heads, hidden) in want.items():
        v = get_preset(name).vision
        assert v.num_heads == heads and int(v.width * v.mlp_ratio) == hidden, name
    assert get_preset("ViT-H-14").vision.width // get_preset("ViT-H-14").vision.num_heads == 80
    assert get_preset("ViT-g-14").vision.width // get_preset("ViT-g-14").vision.num_heads == 88
    assert get_preset("ViT-bigG-14").vision.width // get_preset("ViT-bigG-14").vision.num_heads == 104


def test_mlp_ratio_is_checked():
    from clipforge.config import ConfigError
    from clipforge.model import CLIPConfig, VisionConfig

    for bad in (0.0, -4.0, 0.001, float("inf")):
        with pytest.raises(ConfigError, match="vision.mlp_ratio"):
            CLIPConfig(vision=VisionConfig(mlp_ratio=bad))
    with pytest.raises(ConfigError, match="text.mlp_ratio"):
        get_preset("tiny-vit").replace(text={"mlp_ratio": 0})


@pytest.mark.parametrize("name", SMALL)
def test_parity_full_size(name):
    """A plain OpenCLIP state dict, loaded with its name, embeds as OpenCLIP does."""
    _check_parity(name, depth=None)


@pytest.mark.parametrize("name", LARGE)
def test_parity_reduced_depth(name):
    """Full width, heads and MLP width, 2 vision and 2 text layers (the full depth: the slow test)."""
    _check_parity(name, depth=2)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CLIPFORGE_FULL_PARITY") != "1",
                    reason="full-size parity of the large ViTs: set CLIPFORGE_FULL_PARITY=1 (~21 GB RAM for bigG)")
@pytest.mark.parametrize("name", LARGE)
def test_full_size_parity_of_the_large_models(name):
    _check_parity(name, depth=None)


@pytest.mark.parametrize("name", _twins(OPENAI))
def test_openai_layouts_are_presets_with_openclip_shapes(name):
    """Each OpenAI layout under its GELU name and its -quickgelu twin: OpenCLIP's tensor names, shapes and
    parameter count (the released ones, tests/test_model.py) on the meta device."""
    cfg = get_preset(name)
    assert cfg.quick_gelu == name.endswith("-quickgelu")
    with torch.device("meta"):
        ours = CLIP(cfg)
    theirs = _openclip(name, meta=True)
    base = name.removesuffix("-quickgelu")
    assert num_parameters(ours) == num_parameters(theirs) == RELEASED_PARAMS[base]
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in theirs.state_dict().items() if k != "attn_mask"}
    assert a == b


@pytest.mark.parametrize("name", _twins(OPENAI_CHEAP))
def test_openai_layouts_parity_full_size_by_name(name, tmp_path):
    """torch.save(open_clip.create_model(NAME).state_dict()) read by clipforge.load(path, model_name=NAME)."""
    _check_parity(name, depth=None, path=tmp_path / "weights.pt")


@pytest.mark.parametrize("name", _twins(OPENAI_WIDE))
def test_openai_layouts_parity_reduced_depth(name, tmp_path):
    """Full width, heads and resolution; ResNet stages [1, 1, 1, 1], ViTs 2 vision layers; 2 text layers."""
    _check_parity(name, depth=2, path=tmp_path / "weights.pt")


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CLIPFORGE_FULL_PARITY") != "1",
                    reason="full-size parity of OpenAI's layouts by name: set CLIPFORGE_FULL_PARITY=1")
@pytest.mark.parametrize("name", _twins(OPENAI))
def test_full_size_parity_of_the_openai_layouts(name, tmp_path):
    _check_parity(name, depth=None, path=tmp_path / "weights.pt")
