from .backbones import BACKBONES, build_backbone
from .segmenter import HEADS, ModelConfig, Segmenter, SegOutput

__all__ = ["BACKBONES", "HEADS", "ModelConfig", "Segmenter", "SegOutput", "build_backbone"]
