"""vitkit: train, evaluate and deploy Vision Transformers; a PyTorch port of the MindSpore model-zoo ViT."""
from vitkit.errors import VitkitError

__version__ = "0.1.0"

# The model API is imported on first use, so that `vitkit.cli` can set process options before torch loads.
_MODEL_API = ("ViTArch", "ViTComponents", "VisionTransformer", "create_model", "list_models", "load_model", "save_model")

__all__ = ["VitkitError", "__version__", *_MODEL_API]


def __getattr__(name: str):
    if name in _MODEL_API:
        import vitkit.model

        return getattr(vitkit.model, name)
    raise AttributeError(f"module 'vitkit' has no attribute '{name}'")
