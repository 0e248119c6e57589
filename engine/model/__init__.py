"""The CLIP model family: configs and presets, the model (clip.py), weights I/O and the tokenizer.

Usable without anything from clipforge.train or clipforge.serve.
"""
from .clip import CLIP, create_model, num_parameters
from .config import PRESETS, CLIPConfig, TextConfig, VisionConfig, get_preset, list_models
from .tokenizer import tokenize
from .weights import load, save

__all__ = ["CLIP", "create_model", "num_parameters", "PRESETS", "CLIPConfig", "TextConfig", "VisionConfig",
           "get_preset", "list_models", "tokenize", "load", "save"]
