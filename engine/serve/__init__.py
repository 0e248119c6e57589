"""Serving: the embedding API, resumable embedding files, prompts, retrieval, evaluation and their CLI."""
from .embed import classify, embed_images, embed_texts, zero_shot_classifier
from .embed_file import write_embeddings

__all__ = ["classify", "embed_images", "embed_texts", "zero_shot_classifier", "write_embeddings"]
