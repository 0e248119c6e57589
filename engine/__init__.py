"""clipforge: fast CLIP training and serving."""
from .version import __version__
from .model.config import CLIPConfig, TextConfig, VisionConfig, get_preset, list_models
from .model.clip import CLIP, create_model
from .model.weights import load, save
from .model.tokenizer import tokenize
from .loss import contrastive_loss, ContrastiveLoss
