"""The renaming every PyTorch-side source format shares: whole-model tensors by a table, block tensors by a pattern."""
from __future__ import annotations

import re
from typing import NamedTuple

import torch


class BlockTensor(NamedTuple):
    block: str  # the block's index, as written in the name
    part: str  # vitkit's name for it within the block (the source's looked up in the format's table)
    suffix: str  # what the pattern's third group caught ('weight', '.bias', ...), '' when nothing
    tensor: torch.Tensor


def rename_by_tables(
    state: dict[str, torch.Tensor], top_level: dict[str, str], block_pattern: re.Pattern, in_block: dict[str, str],
    ignored: tuple[str, ...] = (),
) -> tuple[dict[str, torch.Tensor], list[BlockTensor], list[str]]:
    """Split a source state_dict into tensors renamed by `top_level`, block tensors (`block_pattern`'s groups are
    block index, in-block name, suffix; the in-block name is looked up in `in_block`), and the names neither knows."""
    renamed: dict[str, torch.Tensor] = {}
    blocks: list[BlockTensor] = []
    unknown: list[str] = []
    for name, tensor in state.items():
        if name in ignored:
            continue
        if name in top_level:
            renamed[top_level[name]] = tensor
            continue
        match = block_pattern.match(name)
        part = in_block.get(match[2]) if match else None
        if part is None:
            unknown.append(name)
        else:
            blocks.append(BlockTensor(match[1], part, match[3] or "", tensor))
    return renamed, blocks, unknown
