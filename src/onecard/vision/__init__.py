"""LLaVA-style image question answering on one card: ``VisionModel.from_pretrained(path).generate(image, question)``."""

from onecard.vision.generate import VisionAnswer, VisionConfig, VisionModel
from onecard.vision.images import load_image
from onecard.vision.loader import open_llava_folder

__all__ = ["VisionAnswer", "VisionConfig", "VisionModel", "load_image", "open_llava_folder"]
