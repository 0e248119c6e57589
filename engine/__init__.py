"""clipforge: fast CLIP training and serving."""
from .version import __version__
from .model.config import CLIPConfig, TextConfig, VisionConfig, get_preset, list_models
from .model.clip import CLIP, create_model
from .model.weights import load, save
from .model.tokenizer import tokenize
from .model.factory import create_model_and_transforms, get_tokenizer
from .model.transforms import image_transform
from .loss import contrastive_loss, ContrastiveLoss
from .siglip_loss import siglip_loss, SigLipLoss
