"""clipforge: fast CLIP training and serving."""
from .version import __version__
from .config import CLIPConfig, TextConfig, VisionConfig, get_preset
from .model import CLIP, create_model
from .loading import load, save
from .tokenizer import tokenize
from .loss import contrastive_loss, ContrastiveLoss
