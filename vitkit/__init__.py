"""vitkit: train, evaluate and deploy Vision Transformers; a PyTorch port of the MindSpore model-zoo ViT."""
from vitkit.errors import VitkitError
from vitkit.model import (
    ViTArch,
    ViTComponents,
    VisionTransformer,
    create_model,
    list_models,
    load_model,
    save_model,
)

__version__ = "0.1.0"

__all__ = [
    "VitkitError", "ViTArch", "ViTComponents", "VisionTransformer",
    "create_model", "list_models", "load_model", "save_model", "__version__",
]
