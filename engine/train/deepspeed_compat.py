"""The DeepSpeed workarounds, each with its reason (DeepSpeed 0.19; recheck them when the pin moves)."""
from __future__ import annotations

import torch


def _scalars_to_vectors(model: torch.nn.Module) -> dict[str, torch.Size]:
    """Give 0-dim parameters (the logit scale) shape (1,) for the DeepSpeed engine's lifetime.

    DeepSpeed 0.19 mishandles 0-dim parameters in several places: its start-up broadcast sends
    `p.data.view(torch.uint8)` ("self.dim() cannot be 0 to view Float as Byte"), and ZeRO 0's gradient
    clipping multiplies each grad in place by a (1,) coefficient ("output with shape [] doesn't match
    the broadcast shape [1]"). A (1,) view of the same storage avoids both; the trainer reshapes the
    scale back to 0-dim before the loss, and `full_state_dict` restores the declared shapes, so
    exported weights keep OpenAI's 0-dim `logit_scale`. Returns {name: original shape}.
    """
    shapes = {}
    for name, p in model.named_parameters():
        if p.dim() == 0:
            shapes[name] = p.shape
            p.data = p.data.reshape(1)
    return shapes


def _deepspeed_checkpoint_globals() -> list:
    """The classes DeepSpeed pickles into its checkpoints (plain records, no code), for weights_only."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _weights_only_load(path: str, map_location=None):
    with torch.serialization.safe_globals(_deepspeed_checkpoint_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)
