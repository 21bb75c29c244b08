"""What a weights file is, from its first bytes: the one place their magic numbers are read.

`vitkit.model.loading.sniff_format` picks a reader from this; the MindSpore reader names what a file it was handed
really is. Neither trusts a file's name.
"""
from __future__ import annotations

# The most bytes any check below reads.
HEAD_BYTES = 16
# A safetensors file starts with its JSON header's length (little-endian u64) and then '{'; a real header is a few
# kilobytes to a few megabytes, so a length past this is another format's bytes that happen to hold a '{' at 8.
_MAX_SAFETENSORS_HEADER = 100_000_000


def kind_from_head(head: bytes) -> str | None:
    """'zip' (torch.save's archive or an .npz), 'pickle' (a legacy torch.save), 'safetensors' or 'npy'; None when
    the first bytes are none of those (a MindSpore checkpoint, which its own module recognises, or no checkpoint)."""
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if len(head) >= 9 and head[8:9] == b"{" and 1 < int.from_bytes(head[:8], "little") < _MAX_SAFETENSORS_HEADER:
        return "safetensors"
    return None
