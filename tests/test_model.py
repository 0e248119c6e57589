"""The model family against an independent implementation (OpenCLIP), released parameter counts, and
clear errors on bad input."""
import os
import pickle

import pytest
import torch

import clipforge
from clipforge.config import ConfigError
from clipforge.model.config import PRESETS
from clipforge.model.weights import CheckpointError
from clipforge.model import num_parameters

open_clip = pytest.importorskip("open_clip")

# Parameter counts of the released OpenAI models.
RELEASED_PARAMS = {
    "RN50": 102_007_137,
    "RN101": 119_688_033,
    "RN50x4": 178_300_601,
    "RN50x16": 290_979_217,
    "RN50x64": 623_258_305,
    "ViT-B-32": 151_277_313,
    "ViT-B-16": 149_620_737,
    "ViT-L-14": 427_616_513,
    "ViT-L-14-336": 427_944_193,
}

# Small OpenCLIP models (heads of width 64 so the architecture can be inferred from shapes).
TINY_OPENCLIP = {
    "tiny-vit": dict(
        embed_dim=48,
        vision_cfg=dict(image_size=32, layers=2, width=128, patch_size=8),
        text_cfg=dict(context_length=77, vocab_size=49408, width=128, heads=2, layers=2),
    ),
    "tiny-rn": dict(
        embed_dim=48,
        vision_cfg=dict(image_size=64, layers=[1, 2, 1, 1], width=16),
        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=1, layers=1),
    ),
}


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere, including biases, norms and BatchNorm statistics (not just init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or name == "attn_mask":
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name == "logit_scale":
                t.fill_(4.0)
            elif t.dim() == 1 and ("ln" in name or "bn" in name or name.endswith(".1.weight")) and name.endswith("weight"):
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))  # norm gains
            elif t.dim() <= 1:
                t.copy_(0.1 * torch.randn(t.shape, generator=g))  # biases, running means, class token
            else:
                fan_in = t[0].numel() if t.dim() > 2 else t.shape[-1]
                t.copy_(torch.randn(t.shape, generator=g) / fan_in**0.5)


def _config_of(name: str, quick_gelu: bool):
    """clipforge's config of an OpenCLIP model of the tests (a plain state dict does not say it)."""
    if name not in TINY_OPENCLIP:
        return clipforge.get_preset(name + ("-quickgelu" if quick_gelu else ""))
    kw = TINY_OPENCLIP[name]
    v, t = kw["vision_cfg"], kw["text_cfg"]
    resnet = isinstance(v["layers"], list)
    vision = clipforge.VisionConfig(image_size=v["image_size"], layers=tuple(v["layers"]) if resnet else v["layers"],
                                    width=v["width"], patch_size=None if resnet else v["patch_size"],
                                    heads=v["width"] * 32 // 64 if resnet else v["width"] // 64)
    return clipforge.CLIPConfig(embed_dim=kw["embed_dim"], vision=vision, text=clipforge.TextConfig(**t),
                                quick_gelu=quick_gelu)


def _openclip_model(name: str, quick_gelu: bool):
    if name in TINY_OPENCLIP:
        from open_clip.model import CLIP as OpenCLIPModel

        model = OpenCLIPModel(**TINY_OPENCLIP[name], quick_gelu=quick_gelu)
    else:
        model = open_clip.create_model(name + ("-quickgelu" if quick_gelu else ""))
    _randomize(model)
    return model.eval()


def _inputs(resolution: int, n: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, resolution, resolution, generator=g)
    tokens = torch.zeros(n, 77, dtype=torch.long)
    for i in range(n):
        length = 5 + 13 * i
        tokens[i, 0] = 49406
        tokens[i, 1:length] = torch.randint(1, 49406, (length - 1,), generator=g)
        tokens[i, length] = 49407
    return images, tokens


def _assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= 1e-5 * scale, f"{what}: max abs diff {err:.3g} > 1e-5 x output scale {scale:.3g}"


@pytest.mark.parametrize(
    "name,quick_gelu",
    [("ViT-B-32", True), ("RN50", True), ("tiny-vit", False), ("tiny-rn", True), ("tiny-vit", True)],
)
def test_parity_with_openclip(name, quick_gelu, tmp_path):
    ref = _openclip_model(name, quick_gelu)
    sd = ref.state_dict()
    # through a file, as users load released weights (torch.save -> weights_only read)
    path = tmp_path / "weights.pt"
    torch.save(sd, path)
    ours = clipforge.load(str(path), config=_config_of(name, quick_gelu))
    assert not ours.training
    res = ours.image_size
    images, tokens = _inputs(res)
    with torch.no_grad():
        _assert_close(ours.encode_image(images), ref.encode_image(images), f"{name} encode_image")
        _assert_close(ours.encode_text(tokens), ref.encode_text(tokens), f"{name} encode_text")
        assert torch.allclose(ours.logit_scale, ref.logit_scale)


def test_wrong_activation_changes_output():
    """The parity test would catch a wrong activation: GELU weights run with QuickGELU differ."""
    ref = _openclip_model("tiny-vit", quick_gelu=False)
    ours = clipforge.load(ref.state_dict(), config=_config_of("tiny-vit", quick_gelu=True))
    images, _ = _inputs(32)
    with torch.no_grad():
        diff = (ours.encode_image(images) - ref.encode_image(images)).abs().max().item()
    assert diff > 1e-3


def test_openclip_quickgelu_name_and_formats(tmp_path):
    ref = _openclip_model("tiny-vit", quick_gelu=True)
    images, tokens = _inputs(32)
    with torch.no_grad():
        want = ref.encode_text(tokens)
    # an OpenCLIP training checkpoint: {"state_dict": {"module.*": ...}, "epoch": ...}
    ckpt = {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}
    torch.save(ckpt, tmp_path / "epoch_3.pt")
    m = clipforge.load(str(tmp_path / "epoch_3.pt"), config=_config_of("tiny-vit", quick_gelu=True))
    with torch.no_grad():
        _assert_close(m.encode_text(tokens), want, "openclip training checkpoint")
    # safetensors
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "w.safetensors"))
    m = clipforge.load(str(tmp_path / "w.safetensors"), config=_config_of("tiny-vit", quick_gelu=True))
    with torch.no_grad():
        _assert_close(m.encode_image(images), ref.encode_image(images), "safetensors")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torchscript_archive_is_read_without_running_it(tmp_path):
    """OpenAI releases TorchScript archives: read their tensors with the restricted unpickler."""
    model = clipforge.create_model("tiny-vit").eval()
    images, tokens = _inputs(32)
    traced = torch.jit.trace(model, (images, tokens), check_trace=False)
    traced.save(str(tmp_path / "tiny.pt"))
    loaded = clipforge.load(str(tmp_path / "tiny.pt"), model_name="tiny-vit")
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
        assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))


def test_clipforge_checkpoint_roundtrip(tmp_path):
    """clipforge.save keeps the config, so presets whose heads cannot be inferred load exactly."""
    model = clipforge.create_model("tiny-rn")
    _randomize(model, seed=3)
    clipforge.save(model, tmp_path / "m.safetensors")
    loaded = clipforge.load(str(tmp_path / "m.safetensors"))
    assert loaded.config == model.config
    images, tokens = _inputs(64)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))


@pytest.mark.parametrize("name", sorted(RELEASED_PARAMS))
def test_parameter_counts_match_released(name):
    with torch.device("meta"):
        ours = clipforge.create_model(name)
    assert num_parameters(ours) == RELEASED_PARAMS[name]


@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-L-14", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-L-14-336"])
def test_parameter_shapes_match_openclip(name):
    """Same tensor names and shapes as OpenCLIP's build of the same architecture (on the meta device)."""
    with torch.device("meta"):
        ours = clipforge.create_model(name)
        theirs = open_clip.create_model(name + "-quickgelu", device="meta")
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in theirs.state_dict().items() if k != "attn_mask"}
    assert a == b


SMALL_FORWARD = ["tiny-vit", "tiny-rn", "small-vit", "ViT-B-32", "ViT-B-16", "RN50", "RN101", "RN50x4"]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_runs_forward(name):
    """Real forward passes for the presets that fit the CI budget; shape-only (meta) for the largest."""
    meta = name not in SMALL_FORWARD
    ctx = torch.device("meta") if meta else torch.device("cpu")
    with ctx:
        model = clipforge.create_model(name).eval()
        images, tokens = _inputs(model.image_size, n=1)
        if meta:
            images, tokens = images.to("meta"), tokens.to("meta")
        with torch.no_grad():
            img, txt, scale = model(images, tokens)
    e = model.config.embed_dim
    assert img.shape == (1, e) and txt.shape == (1, e) and scale.shape == ()
    if not meta:
        assert torch.isfinite(img).all() and torch.isfinite(txt).all()
        assert torch.allclose(img.norm(dim=-1), torch.ones(1)) and torch.allclose(txt.norm(dim=-1), torch.ones(1))
        assert abs(scale.item() - 1 / 0.07) < 1e-3


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = clipforge.create_model("tiny-vit")
    b = clipforge.create_model("tiny-vit", grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    images, tokens = _inputs(32, n=3)
    for m in (a, b):
        i, t, s = m(images, tokens)
        (s * (i @ t.t())).logsumexp(dim=1).sum().backward()
    for (n1, p1), (_, p2) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(p1.grad, p2.grad, atol=1e-6, rtol=1e-5), n1


def test_config_from_yaml_and_unknown_key(tmp_path):
    good = tmp_path / "m.yaml"
    good.write_text("embed_dim: 32\nvision: {image_size: 32, layers: 1, width: 64, patch_size: 16}\n"
                    "text: {width: 64, heads: 1, layers: 1}\n")
    cfg = clipforge.CLIPConfig.from_yaml(good)
    model = clipforge.CLIP(cfg)
    assert model.visual.positional_embedding.shape == (5, 64)
    bad = tmp_path / "bad.yaml"
    bad.write_text("embed_dim: 32\nvision: {image_size: 32, patch_sise: 16}\n")
    with pytest.raises(ConfigError, match=r"vision\.patch_sise"):
        clipforge.CLIPConfig.from_yaml(bad)


# ----------------------------------------------------------------------------- bad input
def test_unknown_model_name_lists_known():
    with pytest.raises(ValueError, match="unknown model name 'ViT-X-99'; known models: RN50, .*ViT-B-32"):
        clipforge.create_model("ViT-X-99")


def test_wrong_image_size():
    model = clipforge.create_model("tiny-vit")
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 3, 32, 32\).*got \(2, 3, 48, 48\)"):
        model.encode_image(torch.randn(2, 3, 48, 48))


def test_tokens_longer_than_context():
    model = clipforge.create_model("tiny-vit")
    with pytest.raises(ValueError, match="length 80 exceed.*context length 77"):
        model.encode_text(torch.zeros(1, 80, dtype=torch.long))


def test_corrupted_checkpoint(tmp_path):
    model = clipforge.create_model("tiny-vit")
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(CheckpointError, match="model.pt could not be read"):
        clipforge.load(str(path))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        clipforge.load(str(tmp_path / "nope.pt"))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"visual.proj": Evil()}, f)
    with pytest.raises(CheckpointError):
        clipforge.load(str(path))
    assert not marker.exists()


def _hostile_checkpoint(kind: str, folder) -> str:
    """A small file built to hang `load` or blow up its memory, each of a kind once seen to."""
    import collections
    import io
    import json
    import zipfile

    path = str(folder / f"{kind}.{'safetensors' if kind.startswith('config') else 'pt'}")
    if kind == "shared-tree":  # a TorchScript-looking archive whose module tree is 2^40 paths of 2 KB
        tree = {"w": torch.zeros(1)}
        for _ in range(40):
            tree = collections.OrderedDict(a=tree, b=tree)
        buf = io.BytesIO()
        torch.save(tree, buf)
        src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
        with zipfile.ZipFile(path, "w") as out:
            for name in src.namelist():
                out.writestr(zipfile.ZipInfo(name), src.read(name))
            out.writestr(zipfile.ZipInfo(src.namelist()[0].split("/")[0] + "/code/__torch__.py"), "")
    elif kind == "zip-bomb":  # torch.save's layout with its one tensor record deflated: 1 MB -> 1 GiB
        buf = io.BytesIO()
        torch.save({"visual.proj": torch.zeros(1)}, buf)
        src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
        with zipfile.ZipFile(path, "w") as out:
            for name in src.namelist():
                if name.endswith("/data/0"):
                    info = zipfile.ZipInfo(name)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    with out.open(info, "w", force_zip64=True) as f:
                        zeros = bytes(1 << 24)
                        for _ in range(64):
                            f.write(zeros)
                else:
                    out.writestr(zipfile.ZipInfo(name), src.read(name))
    else:  # a stored config of 10 million layers, or of width 1 million, over one tensor
        from safetensors.torch import save_file

        cfg = clipforge.create_model("tiny-vit").config.to_dict()
        tensors = {"visual.proj": torch.zeros(1)}
        if kind == "config-layers":
            cfg["vision"]["layers"] = 10_000_000
        else:  # the layer keys are there, one element each; the width asks for ~10^13 parameters
            cfg["vision"]["width"] = cfg["text"]["width"] = 1_048_576
            for i in range(cfg["vision"]["layers"]):
                tensors[f"visual.transformer.resblocks.{i}.ln_1.weight"] = torch.zeros(1)
            for i in range(cfg["text"]["layers"]):
                tensors[f"transformer.resblocks.{i}.ln_1.weight"] = torch.zeros(1)
        save_file(tensors, path, metadata={"clipforge_config": json.dumps(cfg)})
    return path


_LOAD_CHILD = """
import resource, sys, time, clipforge
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
t = time.perf_counter()
try:
    clipforge.load(sys.argv[1])
    print("LOADED")
except clipforge.model.weights.CheckpointError as exc:
    print("REFUSED", exc)
print(f"SECONDS {time.perf_counter() - t:.3f} EXTRA_MB {(status('VmHWM') - before) / 1024:.1f}")
"""


@pytest.mark.parametrize("kind", ["shared-tree", "zip-bomb", "config-layers", "config-width"])
def test_hostile_checkpoints_are_refused_within_a_second_and_100mb(tmp_path, kind):
    import subprocess
    import sys

    path = _hostile_checkpoint(kind, tmp_path)
    assert os.path.getsize(path) < 2 << 20
    run = subprocess.run([sys.executable, "-c", _LOAD_CHILD, path], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert "REFUSED" in out, out
    seconds = float(out.split("SECONDS ")[1].split()[0])
    extra = float(out.split("EXTRA_MB ")[1].split()[0])
    assert seconds < 1.0 and extra < 100, out


def test_missing_and_misshaped_keys_are_named():
    sd = clipforge.create_model("tiny-vit").state_dict()
    del sd["ln_final.bias"]
    sd["visual.ln_pre.weight"] = torch.ones(7)
    sd["extra.weight"] = torch.ones(1)
    with pytest.raises(CheckpointError, match=r"missing keys: ln_final.bias.*unexpected keys: extra.weight.*"
                                              r"mis-shaped keys: visual.ln_pre.weight \(checkpoint \(7,\), model \(64,\)\)"):
        clipforge.load(sd, model_name="tiny-vit")


def test_non_finite_weights_are_refused_unless_asked(tmp_path):
    model = clipforge.create_model("tiny-vit")
    sd = model.state_dict()
    sd["visual.proj"][0, 0] = float("nan")
    sd["ln_final.weight"][1] = float("inf")
    clipforge.save(model, tmp_path / "nan.safetensors")  # (save writes what it is given: the NaN too)
    with pytest.raises(CheckpointError, match=r"nan.safetensors holds non-finite weights .* ln_final.weight, "
                                              r"visual.proj.*allow_nonfinite=True"):
        clipforge.load(str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match="non-finite"):
        clipforge.load(sd, model_name="tiny-vit")
    loaded = clipforge.load(str(tmp_path / "nan.safetensors"), allow_nonfinite=True)
    assert torch.isnan(loaded.visual.proj[0, 0])


def test_encode_image_refuses_integers_and_non_finite_pixels():
    model = clipforge.create_model("tiny-vit").eval()
    r = model.image_size
    with pytest.raises(TypeError, match="float images, got torch.uint8"):
        model.encode_image(torch.zeros(1, 3, r, r, dtype=torch.uint8))
    bad = torch.zeros(2, 3, r, r)
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.encode_image(bad)
    model.train()  # training leaves non-finite inputs to the trainer's loss guard (no per-step sync)
    assert model.encode_image(bad).shape == (2, model.config.embed_dim)


def test_the_causal_mask_of_openai_archives_is_not_a_non_finite_weight():
    sd = clipforge.create_model("tiny-vit").state_dict()
    sd["attn_mask"] = torch.full((77, 77), float("-inf")).triu(1)  # as OpenAI's state dicts carry it
    clipforge.load(sd, model_name="tiny-vit")


# ---------------------------------------------------------------------------- families clipforge does not load
def _meta_state_dict(name: str) -> dict:
    return open_clip.create_model(name, device="meta").state_dict()


def _plain_keys() -> dict:
    return {k: torch.empty(v.shape, device="meta") for k, v in clipforge.create_model("tiny-vit").state_dict().items()}


@pytest.mark.parametrize("make,family", [
    (lambda: _meta_state_dict("ViT-M-16-alt"), "layer scale"),
    (lambda: _meta_state_dict("coca_ViT-B-32"), "CoCa"),
    # timm and Hugging Face towers need packages this environment does not have: their key layouts
    (lambda: {**_plain_keys(), "visual.trunk.stem.0.weight": torch.empty(1), "visual.trunk.stages.0.x": torch.empty(1)},
     "ConvNeXt"),
    (lambda: {"visual.trunk.blocks.0.attn.q_bias": torch.empty(1), "visual.trunk.rope.freqs": torch.empty(1)}, "EVA"),
    (lambda: {"visual.trunk.attn_pool.q": torch.empty(1), "logit_bias": torch.empty(1),
              "text.transformer.embeddings.word_embeddings.weight": torch.empty(1)}, "SigLIP"),
    (lambda: {"visual.trunk.patch_embed.proj.weight": torch.empty(1)}, "timm image tower"),
    (lambda: {"visual.conv1.weight": torch.empty(1), "text.transformer.embeddings.word_embeddings.weight": torch.empty(1),
              "text.proj.0.weight": torch.empty(1)}, "Hugging Face text tower"),
    (lambda: {"visual.conv1.weight": torch.empty(1), "text.token_embedding.weight": torch.empty(1)}, "custom text tower"),
])
@pytest.mark.parametrize("named", [False, True])
def test_other_families_are_refused_by_name(make, family, named):
    """An OpenCLIP checkpoint outside the plain-tower set is refused in one sentence that names its family
    and says what clipforge loads, with or without a model name (never a wrong guess or a key error)."""
    kwargs = {"model_name": "tiny-vit"} if named else {}
    with pytest.raises(CheckpointError, match=rf"family clipforge does not load: [^;]*{family}.*clipforge loads CLIP"):
        clipforge.load(make(), **kwargs)


@pytest.mark.parametrize("how", ["model_name", "config", "file"])
def test_a_siglip_trained_plain_vit_loads_with_its_bias(how, tmp_path):
    """OpenCLIP's plain ViT trained with --siglip (init_logit_bias set: a top-level logit_bias) loads with
    its bias: the model gets the parameter, its value and the towers' outputs match OpenCLIP's; a
    clipforge file written from it carries the bias back; a model without one has none."""
    from open_clip.model import CLIP as OpenCLIPModel

    # OpenCLIP's twin of clipforge's tiny-vit preset (QuickGELU, head width 32)
    ref = OpenCLIPModel(embed_dim=64, vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
                        text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
                        quick_gelu=True, init_logit_bias=-10.0)
    _randomize(ref)
    ref.eval()
    with torch.no_grad():
        ref.logit_bias.fill_(-7.25)  # a trained value, not the initial one
    sd = ref.state_dict()
    assert "logit_bias" in sd
    if how == "model_name":
        ours = clipforge.load(sd, model_name="tiny-vit")
    elif how == "config":
        ours = clipforge.load(sd, config=clipforge.get_preset("tiny-vit"))
    else:
        clipforge.save(clipforge.load(sd, model_name="tiny-vit"), tmp_path / "siglip.safetensors")
        ours = clipforge.load(tmp_path / "siglip.safetensors")
    assert ours.config.init_logit_bias is not None and ours.logit_bias.item() == -7.25
    images, tokens = _inputs(32)
    with torch.no_grad():
        _assert_close(ours.encode_image(images), ref.encode_image(images), "siglip tiny-vit encode_image")
        _assert_close(ours.encode_text(tokens), ref.encode_text(tokens), "siglip tiny-vit encode_text")
        img, txt, scale, bias = ours(images, tokens)
        theirs = ref(images, tokens)  # OpenCLIP: (image, text, scale, bias) with a bias
        assert torch.allclose(scale, theirs[2]) and float(bias) == float(theirs[3])
    assert clipforge.create_model("tiny-vit").logit_bias is None
    assert len(clipforge.create_model("tiny-vit")(*_inputs(32))) == 3


def test_a_plain_state_dict_is_no_other_family():
    from clipforge.model.families import other_family

    assert other_family(_meta_state_dict("ViT-B-32")) is None and other_family(_plain_keys()) is None


# ---------------------------------------------------------------------------- no guess that can be wrong
def test_names_have_openclips_meanings():
    assert clipforge.get_preset("ViT-B-32").quick_gelu is False  # OpenCLIP: GELU (LAION / DataComp weights)
    assert clipforge.get_preset("RN50").quick_gelu is False
    assert clipforge.get_preset("ViT-B-32-quickgelu").quick_gelu is True
    assert clipforge.get_preset("ViT-B/32").quick_gelu is True  # OpenAI's spelling: OpenAI's model
    assert clipforge.get_preset("ViT-L/14@336px").vision.image_size == 336
    assert "ViT-bigG-14" in clipforge.list_models() and "ViT-B/32" not in clipforge.list_models()


@pytest.mark.parametrize("head_width", [32, 64, 80])
@pytest.mark.parametrize("quick_gelu", [False, True])
def test_a_plain_state_dict_without_a_name_is_refused(head_width, quick_gelu, tmp_path):
    """Neither the activation nor the heads are in the tensors: without a name or a config the file is
    refused (whatever the truth), and with the right config it loads exactly."""
    cfg = clipforge.CLIPConfig(embed_dim=32, quick_gelu=quick_gelu,
                               vision=clipforge.VisionConfig(image_size=32, layers=1, width=160, patch_size=16,
                                                             heads=160 // head_width),
                               text=clipforge.TextConfig(width=160, heads=160 // head_width, layers=1))
    model = clipforge.CLIP(cfg).eval()
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    for kwargs in ({}, {"quick_gelu": quick_gelu}):
        with pytest.raises(CheckpointError, match=r"plain.pt is a plain state dict, which does not say its "
                                                  r"activation .* nor its attention heads.*pass config="):
            clipforge.load(str(tmp_path / "plain.pt"), **kwargs)
    loaded = clipforge.load(str(tmp_path / "plain.pt"), config=cfg)
    images, tokens = _inputs(32)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(images), model.encode_image(images))
        assert torch.equal(loaded.encode_text(tokens), model.encode_text(tokens))


def test_a_plain_released_layout_is_refused_with_its_names():
    sd = {k: torch.zeros(v.shape) for k, v in open_clip.create_model("ViT-B-32", device="meta").state_dict().items()}
    with pytest.raises(CheckpointError, match=r"those of 'ViT-B-32' \(GELU\) or 'ViT-B-32-quickgelu' \(QuickGELU\)"):
        clipforge.load(sd)


def test_tiny_vit_state_dict_loads_bit_exact_with_its_name_only(tmp_path):
    model = clipforge.create_model("tiny-vit").eval()
    _randomize(model, seed=3)
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(CheckpointError, match="'tiny-vit' \\(GELU\\) or 'tiny-vit-quickgelu'"):
        clipforge.load(str(tmp_path / "tiny.pt"))
    loaded = clipforge.load(str(tmp_path / "tiny.pt"), model_name="tiny-vit")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    images, tokens = _inputs(32)
    with torch.no_grad():
        assert torch.equal(loaded(images, tokens)[0], model(images, tokens)[0])


def test_shapes_that_contradict_the_name_are_refused_naming_the_tensor():
    sd = clipforge.create_model("tiny-vit").state_dict()
    sd["text_projection"] = torch.zeros(64, 48)
    with pytest.raises(CheckpointError, match=r"text_projection \(checkpoint \(64, 48\), model \(64, 64\)\)"):
        clipforge.load(sd, model_name="tiny-vit")


def test_the_name_suggestion_compares_the_mlp_width_the_shapes_fix():
    # tiny-vit's layout with a narrower MLP is no tiny-vit: no preset is suggested for it
    cfg = clipforge.get_preset("tiny-vit").replace(vision={"mlp_ratio": 2.0})
    with pytest.raises(CheckpointError, match="no preset has its shapes: pass config="):
        clipforge.load(clipforge.CLIP(cfg).state_dict())
    with pytest.raises(CheckpointError, match="those of 'tiny-vit'"):
        clipforge.load(clipforge.create_model("tiny-vit").state_dict())
