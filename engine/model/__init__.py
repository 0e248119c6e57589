"""The CLIP model family: configs and presets, the model (clip.py), weights I/O, the tokenizer and the
image transforms (the model's input contract), and OpenCLIP-shaped entry points (factory.py).

Usable without anything from clipforge.train or clipforge.serve.
"""
from .clip import CLIP, create_model, num_parameters
from .config import PRESETS, CLIPConfig, TextConfig, VisionConfig, get_preset, list_models
from .factory import Tokenizer, create_model_and_transforms, get_tokenizer
from .tokenizer import tokenize
from .transforms import CLIP_MEAN, CLIP_STD, ImageTransform, image_transform
from .weights import load, save

__all__ = ["CLIP", "create_model", "num_parameters", "PRESETS", "CLIPConfig", "TextConfig", "VisionConfig",
           "get_preset", "list_models", "tokenize", "load", "save", "Tokenizer", "create_model_and_transforms",
           "get_tokenizer", "CLIP_MEAN", "CLIP_STD", "ImageTransform", "image_transform"]
