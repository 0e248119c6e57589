"""The CLIP model family: vision transformer, modified ResNet, causal text transformer.

Parameter names follow the released OpenAI checkpoints (and OpenCLIP, which uses the same keys), so a
released state dict loads with no renaming. Activations are batch-first: (N, L, D). Every attention
call goes through `clipforge.ops.attention`, so the backend (Triton, SDPA, xformers) is one switch.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from .config import CLIPConfig, TextConfig, VisionConfig

# The paper's ceiling on the learned temperature: the logits' scale exp(logit_scale) never exceeds 100
# (the trainer clamps the parameter at MAX_LOGIT_SCALE after each step; inference clamps the scale at MAX_SCALE).
MAX_SCALE = 100.0
MAX_LOGIT_SCALE = math.log(MAX_SCALE)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (as the released fp16 models do)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig = x.dtype
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(orig)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation of the OpenAI-released models."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class MultiheadSelfAttention(nn.Module):
    """Self-attention with nn.MultiheadAttention's parameter names (in_proj_weight, out_proj)."""

    def __init__(self, width: int, heads: int, causal: bool, backend: str = "auto"):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by heads {heads}")
        self.heads, self.causal, self.backend = heads, causal, backend
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, l, d = x.shape  # (N, L, D)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (N, L, 3D)
        qkv = qkv.view(n, l, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (3, N, H, L, hd)
        out = ops.attention(qkv[0], qkv[1], qkv[2], causal=self.causal, backend=self.backend)  # (N, H, L, hd)
        return self.out_proj(out.transpose(1, 2).reshape(n, l, d))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, act: type[nn.Module], causal: bool, backend: str):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = MultiheadSelfAttention(width, heads, causal, backend)
        self.ln_2 = LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", act()), ("c_proj", nn.Linear(hidden, width))])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_ratio, act, causal, backend):
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, act, causal, backend) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


# ------------------------------------------------------------------------------ FLIP patch dropout
# Which patches a training sample keeps. By default they come from torch's RNG on the tokens' device
# (one uniform draw per patch, the lowest-ranked kept), so code that replays a forward under a saved RNG
# state (the trainer's gradient caching) draws them again. Torch's stream, though, depends on how a
# global batch is cut into micro-batches and ranks. Inside `keyed_patch_dropout(seed, step, first)` sample
# i of the forward instead ranks its patches by a counter-based hash of (seed, step, first + i): the
# trainer passes the sample's row in the global batch, so a sample keeps the same patches on 1 process
# or W ranks, with or without gradient caching, on replay and after resume (which restores the step).
_PATCH_KEYS: contextvars.ContextVar = contextvars.ContextVar("clipforge_patch_keys", default=None)
_M32 = 0xFFFFFFFF


def _mix32(x):
    """A bijection of 32-bit values (xor-shift-multiply, constant 0x45d9f3b), on Python ints or int64
    tensors; the products stay below 2**59, so int64 never overflows."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


@contextlib.contextmanager
def keyed_patch_dropout(seed: int, step: int, first_index: int = 0):
    """Patch dropout inside this block: row i of an image batch keeps the patches of sample
    `first_index + i` of (seed, step), whatever the batch's size or device; torch's RNG is not used."""
    key = _mix32((_mix32(_mix32(int(seed) & _M32) ^ ((int(seed) >> 32) & _M32)) + int(step)) & _M32)
    token = _PATCH_KEYS.set((key, int(first_index)))
    try:
        yield
    finally:
        _PATCH_KEYS.reset(token)


def kept_patches(n: int, num_patches: int, keep: int, device) -> torch.Tensor:
    """(n, keep) int64: the patch indices (0-based, ascending) each of n samples keeps."""
    keyed = _PATCH_KEYS.get()
    if keyed is None:
        scores = torch.rand(n, num_patches, device=device)
    else:
        key, first = keyed
        rows = _mix32(_mix32((torch.arange(n, device=device) + first) & _M32) ^ key)  # (n,)
        # a bijection of the patch index for each row: no ties, the same order on any device
        scores = _mix32(rows[:, None] ^ torch.arange(num_patches, device=device))  # (n, L)
    return scores.argsort(dim=1)[:, :keep].sort(dim=1).values


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, act, backend: str):
        super().__init__()
        width, patch = cfg.width, cfg.patch_size
        self.image_size, self.patch_size = cfg.image_size, patch
        self.patch_dropout = float(cfg.patch_dropout)  # FLIP: fraction of patches dropped in train mode
        grid = cfg.image_size // patch
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.num_heads, cfg.mlp_ratio, act, False, backend)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (N, W, g, g)
        x = x.flatten(2).transpose(1, 2)  # (N, g*g, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (N, g*g+1, W)
        if self.training and self.patch_dropout > 0:  # after the positional embedding, as OpenCLIP
            x = self._drop_patches(x)  # (N, 1 + keep, W)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # (N, E)

    def _drop_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Keep the class token and int(L * (1 - p)) (at least 1) of the L patch tokens per sample; the
        transformer (same attention kernels) just runs on the shorter sequence."""
        n, length, width = x.shape[0], x.shape[1] - 1, x.shape[2]
        keep = max(1, int(length * (1 - self.patch_dropout)))
        idx = kept_patches(n, length, keep, x.device)  # (N, keep)
        patches = torch.gather(x[:, 1:], 1, idx.unsqueeze(-1).expand(n, keep, width))
        return torch.cat([x[:, :1], patches], dim=1)


class Bottleneck(nn.Module):
    """ResNet bottleneck with anti-aliased striding: an average pool before the stride-1 3rd conv."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            # keys "-1", "0", "1" as in the released checkpoints (the pool has no parameters)
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """QKV attention pooling over the spatial grid, the mean token being the only query."""

    def __init__(self, spatial: int, width: int, heads: int, out_dim: int, backend: str):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.positional_embedding = nn.Parameter(torch.randn(spatial * spatial + 1, width) / width**0.5)
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # (N, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)  # (N, HW+1, C)
        hd = c // self.heads
        q = self.q_proj(x[:, :1]).view(n, 1, self.heads, hd).transpose(1, 2)  # (N, H, 1, hd)
        k = self.k_proj(x).view(n, -1, self.heads, hd).transpose(1, 2)  # (N, H, HW+1, hd)
        v = self.v_proj(x).view(n, -1, self.heads, hd).transpose(1, 2)
        out = ops.attention(q, k, v, causal=False, backend=self.backend)  # (N, H, 1, hd)
        return self.c_proj(out.transpose(1, 2).reshape(n, c))  # (N, E)


class ModifiedResNet(nn.Module):
    """ResNet with a 3-conv stem, average-pool downsampling and attention pooling (CLIP's RN models)."""

    def __init__(self, cfg: VisionConfig, embed_dim: int, backend: str):
        super().__init__()
        width, layers = cfg.width, cfg.layers
        self.image_size = cfg.image_size
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        feat = width * 32  # channels after layer4
        self.attnpool = AttentionPool2d(cfg.image_size // 32, feat, cfg.num_heads, embed_dim, backend)
        self.grad_checkpointing = False

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))  # (N, W, R/4, R/4)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.attnpool(x)  # (N, E)


class _EmbeddingMethods:
    """The embedding API as methods of the model: `model.embed_images(...)` is
    `clipforge.serve.embed.embed_images(model, ...)`, and so on. The code lives in serve/ and is imported
    on first use, so that model/ imports nothing of serve/ (docs/DESIGN.md, the import rule)."""

    def embed_images(self, images, batch_size: int = 64, **kwargs):
        """Images -> (N, E) float32 L2-normalised embeddings; see clipforge.serve.embed.embed_images."""
        from ..serve import embed

        return embed.embed_images(self, images, batch_size, **kwargs)

    def embed_texts(self, texts, batch_size: int = 256, **kwargs):
        """Texts -> (N, E) float32 L2-normalised embeddings; see clipforge.serve.embed.embed_texts."""
        from ..serve import embed

        return embed.embed_texts(self, texts, batch_size, **kwargs)

    def zero_shot_classifier(self, classnames, templates="imagenet", **kwargs):
        """Class names x templates -> (C, E) classifier; see clipforge.serve.embed.zero_shot_classifier."""
        from ..serve import embed

        return embed.zero_shot_classifier(self, classnames, templates, **kwargs)

    def classify(self, images, classifier, batch_size: int = 64, **kwargs):
        """Images x classifier -> (N, C) probabilities; see clipforge.serve.embed.classify."""
        from ..serve import embed

        return embed.classify(self, images, classifier, batch_size, **kwargs)


class CLIP(_EmbeddingMethods, nn.Module):
    """Image and text encoders into one embedding space, with a learned logit scale (log-space)."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        act = QuickGELU if cfg.quick_gelu else nn.GELU
        backend = cfg.attention_backend
        v, t = cfg.vision, cfg.text
        if v.is_resnet:
            self.visual = ModifiedResNet(v, cfg.embed_dim, backend)
        else:
            self.visual = VisionTransformer(v, cfg.embed_dim, act, backend)
        self.context_length, self.vocab_size = t.context_length, t.vocab_size
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, act, True, backend)
        self.ln_final = LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        # SigLIP's logit bias, a parameter only when the config has one (OpenCLIP's init_logit_bias)
        bias = cfg.init_logit_bias
        self.logit_bias = nn.Parameter(torch.tensor(float(bias))) if bias is not None else None
        self.init_parameters()
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    def init_parameters(self) -> None:
        """The initialisation of the reference code (std scaled by width and depth)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for tr in [self.transformer] + ([self.visual.transformer] if hasattr(self.visual, "transformer") else []):
            proj_std = (tr.width**-0.5) * ((2 * tr.layers) ** -0.5)
            attn_std, fc_std = tr.width**-0.5, (2 * tr.width) ** -0.5
            for block in tr.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            std = pool.c_proj.in_features**-0.5
            for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(lin.weight, std=std)
            for name, p in self.visual.named_parameters():
                if name.endswith("bn3.weight"):
                    nn.init.zeros_(p)
        nn.init.normal_(self.text_projection, std=self.transformer.width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable
        if hasattr(self.visual, "transformer"):
            self.visual.transformer.grad_checkpointing = enable
        else:
            self.visual.grad_checkpointing = enable

    def _check_images(self, images: torch.Tensor) -> None:
        r = self.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != r or images.shape[3] != r:
            raise ValueError(
                f"expected images of shape (N, 3, {r}, {r}) for this model, got {tuple(images.shape)}; "
                f"resize and centre-crop to {r}x{r} (see clipforge.data's evaluation transform)"
            )
        if not images.is_floating_point():
            raise TypeError(f"expected CLIP-normalised float images, got {images.dtype}; preprocess them first "
                            "(clipforge.preprocess or embed_images, which take paths, bytes, PIL and uint8 arrays)")
        # At evaluation (serving), NaN / infinite pixels would give NaN embeddings: refuse them. In
        # training the check is left to the trainer's non-finite loss guard (no per-step device sync).
        if not self.training and images.device.type != "meta" and not bool(torch.isfinite(images).all()):
            raise ValueError("images hold NaN or infinite values; check the preprocessing")

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """images: (N, 3, R, R) normalised with CLIP's mean/std -> (N, embed_dim)."""
        self._check_images(images)
        feats = self.visual(images.to(self.dtype))
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """tokens: (N, L) int64 with L <= context_length, as made by clipforge.tokenize -> (N, embed_dim)."""
        if tokens.dim() != 2:
            raise ValueError(f"expected tokens of shape (N, L), got {tuple(tokens.shape)}")
        n, l = tokens.shape
        if l > self.context_length:
            raise ValueError(
                f"token sequences of length {l} exceed this model's context length {self.context_length}; "
                "tokenize with clipforge.tokenize(texts, context_length=...) which truncates"
            )
        x = self.token_embedding(tokens).to(self.dtype) + self.positional_embedding[:l].to(self.dtype)  # (N, L, W)
        x = self.ln_final(self.transformer(x))
        # features at the end-of-text token, the highest id in each sequence
        x = x[torch.arange(n, device=x.device), tokens.argmax(dim=-1)] @ self.text_projection  # (N, E)
        return F.normalize(x, dim=-1) if normalize else x

    @property
    def dtype(self) -> torch.dtype:
        return self.text_projection.dtype

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        """-> (image_features, text_features, logit_scale): L2-normalised features, exp(scale); a model with
        a logit bias (SigLIP) returns it fourth, as OpenCLIP's CLIP does."""
        out = (
            self.encode_image(images, normalize=True),
            self.encode_text(tokens, normalize=True),
            self.logit_scale.exp(),
        )
        return out if self.logit_bias is None else (*out, self.logit_bias)


def create_model(name: str, **overrides) -> CLIP:
    """Build a CLIP model from a preset name (see `clipforge.list_models()`) with optional overrides.

    Overrides are top-level config fields (e.g. ``quick_gelu=False``, ``attention_backend="sdpa"``,
    ``grad_checkpointing=True``) or nested ones as dicts (``vision={"image_size": 64}``).
    """
    from .config import get_preset

    cfg = get_preset(name).replace(**overrides)
    return CLIP(cfg)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["CLIP", "create_model", "keyed_patch_dropout", "num_parameters", "LayerNorm", "QuickGELU", "TextConfig",
           "VisionConfig"]
