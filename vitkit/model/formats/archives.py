"""Zip archives (.pt2 programs, .npz arrays) bounded from their directory alone, before any entry is read."""
from __future__ import annotations

import os
import zipfile

from vitkit.errors import VitkitError

MAX_ENTRIES = 4096
MAX_ENTRY_BYTES = 16 << 30
# How far an archive's compressed entries may inflate. Weights barely compress (about 1.1x), so more than this is a
# deflate bomb: it can declare its true size, but not hide the ratio. Below a MiB, ratios say nothing.
MAX_COMPRESSION_RATIO = 100
_RATIO_FREE_BYTES = 1 << 20


def format_bytes(count: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift:
            return f"{count / (1 << shift):.1f} {unit}"
    return f"{count} bytes"


def check_zip_directory(path, archive: zipfile.ZipFile, *, max_entries: int = MAX_ENTRIES,
                        max_entry_bytes: int = MAX_ENTRY_BYTES, what: str = "archive",
                        per_entry_ratio: bool = False) -> list[zipfile.ZipInfo]:
    """The entries of a zip archive whose directory is within bounds; a VitkitError before any entry is read.

    Bounded: the entry count, each entry's declared size (what zipfile inflates at most), that the entries fit in
    the file, and how far the compressed entries inflate together, or each one with `per_entry_ratio` (for
    formats that never compress; an .npz may legitimately hold one all-zero array that inflates a thousandfold).
    """
    infos = archive.infolist()
    if len(infos) > max_entries:
        raise VitkitError(f"'{path}' has {len(infos)} entries, more than any {what} vitkit reads ({max_entries}): "
                          "the file is not a model, or is damaged")
    file_size = os.path.getsize(path)
    compressed_total = inflated_total = 0
    largest = None
    for info in infos:
        if info.file_size > max_entry_bytes:
            raise VitkitError(f"'{path}' entry '{info.filename}' declares {format_bytes(info.file_size)}, more than "
                              f"vitkit reads from one entry ({format_bytes(max_entry_bytes)}): the file is not a model")
        compressed_total += info.compress_size
        if info.compress_type == zipfile.ZIP_STORED:
            if info.compress_size != info.file_size:
                raise VitkitError(f"'{path}' entry '{info.filename}' is stored uncompressed but declares two sizes "
                                  f"({info.file_size} and {info.compress_size}): the file is damaged")
            continue
        inflated_total += info.file_size
        if largest is None or info.file_size - info.compress_size > largest.file_size - largest.compress_size:
            largest = info
        if per_entry_ratio and info.file_size > max(_RATIO_FREE_BYTES, MAX_COMPRESSION_RATIO * info.compress_size):
            raise VitkitError(
                f"'{path}' entry '{info.filename}' would inflate from {format_bytes(info.compress_size)} compressed to "
                f"{format_bytes(info.file_size)}, more than {MAX_COMPRESSION_RATIO}x: vitkit does not read "
                "compression bombs"
            )
    if compressed_total > file_size:
        raise VitkitError(f"'{path}' declares entries larger than the file itself: the file is truncated or damaged")
    if largest is not None and inflated_total > max(_RATIO_FREE_BYTES, MAX_COMPRESSION_RATIO * file_size):
        raise VitkitError(
            f"'{path}' would inflate from {format_bytes(file_size)} compressed to {format_bytes(inflated_total)} "
            f"(entry '{largest.filename}' alone to {format_bytes(largest.file_size)}), more than "
            f"{MAX_COMPRESSION_RATIO}x: vitkit does not read compression bombs"
        )
    return infos
