"""The ViT family, its presets, and reading/writing its weights in every supported format."""
from vitkit.model.loading import load_model, read_weights, save_model
from vitkit.model.presets import list_models
from vitkit.model.vit import ViTArch, ViTComponents, VisionTransformer, create_model, make_arch

__all__ = [
    "ViTArch", "ViTComponents", "VisionTransformer", "create_model", "make_arch",
    "list_models", "load_model", "read_weights", "save_model",
]
