"""torch.hub entry points: one per vitkit preset, e.g.

    model = torch.hub.load("path/to/vitkit", "vit_base_patch32", source="local", weights="vit_base_patch32.ckpt")

`weights` is any checkpoint vitkit reads (MindSpore .ckpt, timm/torchvision/vitkit .pth or .safetensors, a Flax
.npz, a Hugging Face folder); vitkit ships no weights and nothing is downloaded. Without `weights` the model is
randomly initialised (timm's numerics unless `style="mindspore"`).
"""
import vitkit.model.loading as _loading
import vitkit.model.presets as _presets
import vitkit.model.vit as _vit
from vitkit.errors import VitkitError as _VitkitError

dependencies = ["torch", "torchvision"]

_SHAPE_FIELDS = ("patch_size", "embed_dim", "depth", "mlp_dim")


def _entry_point(name: str):
    def build(weights=None, num_classes=None, **kwargs):
        if kwargs.pop("pretrained", False):
            raise _VitkitError(f"vitkit ships no weights to download: pass weights=PATH to {name}")
        if weights is None:
            extra = {} if num_classes is None else {"num_classes": num_classes}
            return _vit.create_model(name, **extra, **kwargs)
        return _load_preset(name, weights, num_classes, kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"{name}: {_describe(_presets.PRESETS[name])}.\n\n"
        "weights: a checkpoint path in any format vitkit reads (None: random init); num_classes: the head's outputs "
        "(another count than the checkpoint's gives a fresh head for fine-tuning); other keywords are ViTArch fields, "
        "e.g. image_size=384 (position embeddings are resampled) or drop_path_rate=0.1."
    )
    return build


def _describe(preset: dict) -> str:
    return f"patch {preset['patch_size']}, width {preset['embed_dim']}, depth {preset['depth']}, {preset['num_heads']} heads"


def _load_preset(name: str, weights, num_classes, overrides: dict):
    """The checkpoint, which must hold this preset's shape; the preset supplies the head count if the file cannot."""
    preset = _presets.PRESETS[name]
    found = _loading.read_weights(weights)
    if "num_heads" not in found.arch and "num_heads" not in overrides:
        overrides["num_heads"] = preset["num_heads"]
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    shape = {field: getattr(_loading.infer_arch(found, **overrides), field) for field in _SHAPE_FIELDS}
    expected = {field: preset[field] for field in _SHAPE_FIELDS}
    if shape != expected:
        raise _VitkitError(
            f"'{weights}' holds a ViT with {', '.join(f'{k} {v}' for k, v in shape.items())}, not {name}'s "
            f"{', '.join(f'{k} {v}' for k, v in expected.items())}: load it with the matching entry point or vitkit.load_model"
        )
    return _loading.model_from_weights(found, **overrides).eval()


for _name in _presets.list_models():
    globals()[_name] = _entry_point(_name)
