"""torchvision's `vit_b_16` / `vit_b_32` / `vit_l_16` / `vit_l_32` / `vit_h_14` state_dicts as vitkit names and numerics.

torchvision's VisionTransformer keeps q, k and v fused in `nn.MultiheadAttention.in_proj_weight` (the same (q; k; v)
row order as vitkit's qkv), its MLP as a Sequential (`mlp.0`, `mlp.3`; `mlp.linear_1`, `mlp.linear_2` before 0.13),
and an optional tanh pre-logits layer in `heads`. The head count is not in the tensors: the presets match
vit_b (12), vit_l (16) and vit_h (16) by width and depth.
"""
from __future__ import annotations

import re

import torch

from vitkit.errors import VitkitError
from vitkit.model.formats.renaming import rename_by_tables

# torchvision builds every ViT with LayerNorm(eps=1e-6) and nn.GELU() (erf), and classifies the class token.
NUMERICS = {"ln_eps": 1e-6, "gelu": "erf"}

_TOP_LEVEL = {
    "class_token": "cls_token",
    "conv_proj.weight": "patch_embed.proj.weight",
    "conv_proj.bias": "patch_embed.proj.bias",
    "encoder.pos_embedding": "pos_embed",
    "encoder.ln.weight": "norm.weight",
    "encoder.ln.bias": "norm.bias",
    "heads.pre_logits.weight": "pre_logits.fc.weight",
    "heads.pre_logits.bias": "pre_logits.fc.bias",
    "heads.head.weight": "head.weight",
    "heads.head.bias": "head.bias",
}
_IN_BLOCK = {
    "ln_1": "norm1",
    "self_attention.in_proj_weight": "attn.qkv.weight",
    "self_attention.in_proj_bias": "attn.qkv.bias",
    "self_attention.out_proj": "attn.proj",
    "ln_2": "norm2",
    "mlp.0": "mlp.fc1",
    "mlp.linear_1": "mlp.fc1",
    "mlp.3": "mlp.fc2",
    "mlp.linear_2": "mlp.fc2",
}
_BLOCK = re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.(.+?)(\.weight|\.bias)?$")


def is_torchvision_vit(state: dict) -> bool:
    return "encoder.pos_embedding" in state or any(name.startswith("conv_proj.") for name in state)


def torchvision_to_vitkit(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """A torchvision ViT state_dict in vitkit names, plus its numerics."""
    if any(name.startswith("conv_proj.conv_") for name in state):
        raise VitkitError(
            "the torchvision ViT has a convolutional stem (conv_stem_configs), which vitkit's ViT does not have: "
            "only the patchify-stem models (vit_b_16 ... vit_h_14) can be read"
        )
    converted, blocks, unknown = rename_by_tables(state, _TOP_LEVEL, _BLOCK, _IN_BLOCK)
    converted.update({f"blocks.{entry.block}.{entry.part}{entry.suffix}": entry.tensor for entry in blocks})
    if unknown:
        raise VitkitError(
            f"not a torchvision VisionTransformer state_dict: unexpected tensors {', '.join(unknown[:3])}: "
            "save it from torchvision.models.vit_* (model.state_dict())"
        )
    return converted, dict(NUMERICS)
