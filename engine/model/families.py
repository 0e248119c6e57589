"""The OpenCLIP model families clipforge does not implement, told apart by their state dicts' keys, so that
loading refuses them by name instead of failing on a key or guessing."""
from __future__ import annotations

from typing import Any, Mapping

LOADS = ("clipforge loads CLIP models with the plain towers of OpenAI's and OpenCLIP's releases: a ViT "
         "(visual.conv1, visual.transformer.*) or modified ResNet (visual.layer1-4, visual.attnpool) image tower "
         "and the plain text transformer (token_embedding, transformer.resblocks.*, ln_final, text_projection)")


def other_family(sd: Mapping[str, Any]) -> str | None:
    """The OpenCLIP model family of a state dict that clipforge does not implement, by its keys, or None."""
    keys = list(sd)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("text_decoder.") or has("visual.attn_pool."):
        return "CoCa (a captioning text decoder, text_decoder.*)"
    if has("visual.trunk."):
        if "logit_bias" in sd:
            kind = "SigLIP (a timm image tower with a sigmoid-loss logit_bias)"
        elif has("visual.trunk.stages."):
            kind = "ConvNeXt (a timm image tower, visual.trunk.stages.*)"
        elif any(".rope" in k or k.endswith("q_bias") for k in keys if k.startswith("visual.trunk.")):
            kind = "EVA (a timm image tower with rotary embeddings)"
        else:
            kind = "a timm image tower (visual.trunk.*)"
        return kind
    if has("text."):
        if has("text.transformer.embeddings.") or has("text.transformer.encoder.") or has("text.proj"):
            return "a Hugging Face text tower (CustomTextCLIP, text.transformer.* from transformers)"
        return "a custom text tower (CustomTextCLIP, text.*)"
    if any(k.endswith(("ls_1.gamma", "ls_2.gamma")) for k in keys):
        return "layer scale (ls_1 / ls_2 gains in the residual blocks, e.g. ViT-M-16-alt)"
    return None  # (a plain ViT / ResNet with a top-level logit_bias is SigLIP-trained: it loads, bias and all)
