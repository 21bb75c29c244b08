"""Images read in place from tar archives and WebDataset shards, never extracted.

A split may be an image folder, a `.tar` of class folders (the original's imagenet_train.tar), or a folder (local or
a URL such as s3://bucket/imagenet/train) of WebDataset tar shards with the `index.json` that `vitkit data shard`
writes. An archive's headers are scanned once (bounded, without tarfile's unbounded reads of long-name and PAX
records) into an index of (container, offset, size) per image; a shard folder's index is read from its JSON. Each
sample is then one positioned read (os.preadv) or one byte-range request, and ImageFolderDataset decodes and
augments it exactly as it does a file, with the same per-sample seeds: a split trains to the same weights whatever
form its images are stored in, as long as they are listed in the same order (label, then path).
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import tarfile
import tempfile
import warnings

import numpy as np

from vitkit import storage
from vitkit.data.folder import (IMAGE_EXTENSIONS, FileSource, Sample, check_class_count, check_labelled_samples,
                                is_image_file, list_image_folder, read_bytes)
from vitkit.errors import VitkitError

# The largest member read as one image: ImageNet's largest JPEG is about 15 MB, so anything this size is a damaged
# or hostile header, whose bytes are never allocated.
MAX_MEMBER_BYTES = 1 << 30
# The most images one split's index holds (ImageNet-21k has 14 million): bounds the index's memory.
MAX_MEMBERS = 50_000_000
# The most bytes of one GNU long-name or PAX record read (names are at most a few KB on any filesystem).
MAX_HEADER_RECORD_BYTES = 1 << 20
# The largest index.json read: about 50 bytes a sample (member name, offset, size, label).
MAX_INDEX_BYTES = 4 << 30
# Open shard files kept per process; the least recently used is closed beyond this.
MAX_OPEN_FILES = 64

INDEX_NAME = "index.json"
INDEX_KIND = "wids-shard-index-v1"  # webdataset's wids shard-list descriptor, which this index extends
SHARD_PATTERN = "shard-{:06d}.tar"
DEFAULT_MAX_SHARD_BYTES = 1 << 30
MAX_SHARD_SAMPLES = 10_000_000

_BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")


class ArchiveSource:
    """Sample i's bytes are `sizes[i]` bytes at `offsets[i]` of container `containers[container_of[i]]`: a local tar
    file (read with os.preadv into a fresh buffer) or a URL (a byte-range request through vitkit.storage).

    Open files and remote filesystems are kept per process (loader workers open their own after the fork; both are
    dropped when the source is pickled for a spawned worker), at most MAX_OPEN_FILES files at a time."""

    def __init__(self, containers: list[str], container_of, offsets, sizes, names: list[str]):
        self.containers = list(containers)
        self.container_of = np.asarray(container_of, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self._names = np.array([name.encode("utf-8", "surrogateescape") for name in names], dtype=np.bytes_)
        self._remote = [storage.is_url(container) for container in self.containers]
        self._open: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._filesystem = None
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.offsets)

    def name(self, index: int) -> str:
        """'<container>:<member>', e.g. /data/imagenet_train.tar:n01440764/n01440764_10026.JPEG."""
        member = self._names[index].decode("utf-8", "surrogateescape")
        return f"{self.containers[self.container_of[index]]}:{member}"

    def read(self, index: int) -> np.ndarray:
        container = int(self.container_of[index])
        offset, size = int(self.offsets[index]), int(self.sizes[index])
        if self._pid != os.getpid():  # a forked loader worker: the parent's descriptors and sessions are not its own
            self._open, self._filesystem, self._pid = collections.OrderedDict(), None, os.getpid()
        if self._remote[container]:
            return self._read_range(self.containers[container], offset, size)
        data = bytearray(size)
        view, got = memoryview(data), 0
        fd = self._descriptor(container)
        while got < size:  # one read is the rule on local disks; network filesystems may return less
            count = os.preadv(fd, [view[got:]], offset + got)
            if not count:
                raise OSError(f"{self.containers[container]} ends inside this member: the file was cut short")
            got += count
        return np.frombuffer(data, dtype=np.uint8)

    def _descriptor(self, container: int) -> int:
        fd = self._open.get(container)
        if fd is not None:
            self._open.move_to_end(container)
            return fd
        while len(self._open) >= MAX_OPEN_FILES:
            os.close(self._open.popitem(last=False)[1])
        fd = os.open(self.containers[container], os.O_RDONLY)
        self._open[container] = fd
        return fd

    def _read_range(self, url: str, offset: int, size: int) -> np.ndarray:
        if self._filesystem is None:
            fs, _ = storage.filesystem(url)
            # A fresh instance: an fsspec filesystem made in another process (the parent) refuses to run after fork.
            self._filesystem = type(fs)(**{**fs.storage_options, "skip_instance_cache": True})
        _, inner = storage.filesystem(url)
        data = storage.with_retries(
            "read", url, lambda: self._filesystem.cat_file(inner, start=offset, end=offset + size))
        if len(data) != size:
            raise OSError(f"{url} gave {len(data)} of the {size} bytes at {offset}: the shard was cut short")
        return np.frombuffer(bytearray(data), dtype=np.uint8)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_open=collections.OrderedDict(), _filesystem=None, _pid=-1)
        return state

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._open.values():
                os.close(fd)


# ------------------------------------------------------------------------------------------------ tar headers

def _number(field: bytes, what: str, where: str) -> int:
    """A tar header's numeric field: octal text, or GNU's base-256 (first byte 0x80) for sizes over 8 GB."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    if field[:1] == b"\xff":
        raise VitkitError(f"{where} has a negative {what} in a tar header: the archive is damaged; re-create it")
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise VitkitError(f"{where} has a tar header whose {what} is not a number: the archive is damaged or not a "
                          "tar; re-create it") from None


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip(b" ") or b"-1", 8)
    except ValueError:
        return False  # not even a number where a tar header keeps its checksum
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    signed = unsigned - sum(256 for byte in block[:148] + block[156:] if byte > 127)
    return stored in (unsigned, signed)


def _pax_records(data: bytes, where: str) -> dict[str, str]:
    """'<length> <key>=<value>\\n' records of a PAX header."""
    records, position = {}, 0
    while position < len(data) and data[position:position + 1] not in (b"\0", b""):
        space = data.find(b" ", position)
        try:
            length = int(data[position:space])
        except ValueError:
            raise VitkitError(f"{where} has a damaged PAX record at byte {position}: re-create the archive") from None
        if space < 0 or length <= space - position or position + length > len(data):
            raise VitkitError(f"{where} has a damaged PAX record at byte {position}: re-create the archive")
        key, _, value = data[space + 1:position + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def scan_tar(path: str) -> tuple[list[tuple[str, int, int]], list[str], dict[str, int]]:
    """(regular members as (name, data offset, size), directory names, counts of members skipped by reason) of a
    local tar archive, from its headers alone: each header is one 512-byte read, the data is skipped by seeking.

    Names are normalized ('./' and repeated '/' dropped); a member whose name is absolute or has a '..' component is
    skipped ('unsafe name'), as is one over MAX_MEMBER_BYTES ('too large'); links, devices and FIFOs are skipped
    ('not a regular file'). A header that is not a tar header, or data that runs past the end of the file, is a
    VitkitError: the archive is damaged or cut short. Plain (uncompressed) tars only: a compressed one cannot be read
    in place.
    """
    where = f"archive {path}"
    try:
        file = open(path, "rb")
    except OSError as error:
        raise VitkitError(f"cannot open {where} ({error.strerror}): check the data path") from None
    members, folders = [], []
    skipped = collections.Counter()
    with file:
        end = os.fstat(file.fileno()).st_size
        if file.read(2) in (b"\x1f\x8b", b"BZ", b"\xfd7", b"\x28\xb5"):
            raise VitkitError(f"{where} is compressed: vitkit reads plain .tar archives in place; decompress it "
                              "once (e.g. gunzip) and point the data path at the .tar")
        position, long_name, pax = 0, None, {}
        while True:
            file.seek(position)
            block = file.read(_BLOCK)
            if len(block) == _BLOCK and not block.strip(b"\0"):
                break  # the end-of-archive marker
            if not block:  # every tar writer ends with the marker: without it, the file lost its tail
                raise VitkitError(f"{where} is cut short: it ends after {position:,} bytes without the end-of-archive "
                                  "marker; re-download or re-create it")
            if len(block) < _BLOCK:
                raise VitkitError(f"{where} is cut short inside a header at byte {position}: re-download or "
                                  "re-create it")
            if not _checksum_ok(block):
                what = "is not a tar archive" if position == 0 else f"is damaged at byte {position}"
                raise VitkitError(f"{where} {what} (a header's checksum does not match): check the file")
            kind = block[156:157]
            size = _number(block[124:136], "size", where)
            data_at = position + _BLOCK
            if data_at + size > end:
                raise VitkitError(f"{where} is cut short: a member's {size:,} bytes at byte {data_at:,} run past the "
                                  f"end of the file ({end:,} bytes); re-download or re-create it")
            position = data_at + -(-size // _BLOCK) * _BLOCK
            if kind in (b"L", b"x", b"K"):
                if size > MAX_HEADER_RECORD_BYTES:
                    raise VitkitError(f"{where} has a {size:,}-byte name record at byte {data_at:,}, over the "
                                      f"limit of {MAX_HEADER_RECORD_BYTES:,}: the archive is damaged or hostile")
                file.seek(data_at)
                record = file.read(size)
                if kind == b"L":
                    long_name = record.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                elif kind == b"x":
                    pax = _pax_records(record, where)
                continue
            if kind == b"g":
                continue  # global PAX defaults (comments, times): nothing a reader of names and sizes needs
            name = long_name or pax.get("path")
            if name is None:
                name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                prefix = block[345:500].split(b"\0", 1)[0] if block[257:262] == b"ustar" else b""
                if prefix:
                    name = prefix.decode("utf-8", "surrogateescape") + "/" + name
            if "size" in pax:
                try:
                    size = int(pax["size"])
                except ValueError:
                    raise VitkitError(f"{where} has a PAX size that is not a number: re-create it") from None
                if size < 0 or data_at + size > end:
                    raise VitkitError(f"{where} is cut short or damaged: a member's PAX size of {size:,} bytes at "
                                      f"byte {data_at:,} runs past the end of the file; re-download or re-create it")
                position = data_at + -(-size // _BLOCK) * _BLOCK
            long_name, pax = None, {}
            parts = [part for part in name.split("/") if part not in ("", ".")]
            if name.startswith("/") or ".." in parts:
                skipped["unsafe name"] += 1
            elif kind == b"5":
                if parts:
                    folders.append("/".join(parts))
                    if len(folders) > MAX_MEMBERS:
                        raise VitkitError(f"{where} holds more than {MAX_MEMBERS:,} folders: split it into several "
                                          "archives or shards")
            elif kind not in _REGULAR:
                skipped["not a regular file"] += 1
            elif size > MAX_MEMBER_BYTES:
                skipped["too large"] += 1
            elif parts:
                members.append(("/".join(parts), data_at, size))
                if len(members) > MAX_MEMBERS:
                    raise VitkitError(f"{where} holds more than {MAX_MEMBERS:,} files: split it into several "
                                      "archives or shards")
    return members, folders, dict(skipped)


def _warn_skipped(where: str, skipped: dict[str, int]) -> None:
    if skipped:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))
        warnings.warn(f"{where}: skipped members ({reasons}); their bytes are never read")


def _strip_common_folder(images: list[tuple[list[str], int, int]], folders: list[list[str]]):
    """Drops the folders every image lies in (train/ of train/<class>/<image>) down to the class level: a leading
    component is dropped while all images share it and would still have a class folder and a name below it."""
    while images and all(len(image[0]) >= 3 for image in images) and len({image[0][0] for image in images}) == 1:
        top = images[0][0][0]
        images = [(parts[1:], *rest) for parts, *rest in images]
        folders = [parts[1:] for parts in folders if len(parts) > 1 and parts[0] == top]
    return images, folders


def _tar_images(path: str):
    members, folders, skipped = scan_tar(path)
    _warn_skipped(f"archive {path}", skipped)
    latest = {}  # a name written twice: the later member wins, as when the tar is extracted
    for name, offset, size in members:
        parts = name.split("/")
        if is_image_file(parts[-1]) and not any(part.startswith(".") for part in parts[:-1]):
            latest[name] = (parts, offset, size, name)
    images = [latest[name] for name in sorted(latest)]
    return _strip_common_folder(images, [folder.split("/") for folder in folders])


def list_tar(path: str, num_classes: int | None = None, scanned=None) -> tuple[list[Sample], list[str], ArchiveSource]:
    """Samples of a tar of class folders (<class>/.../<image>, optionally under common folders such as train/),
    the class names and their bytes' source: as list_image_folder gives for the same tree extracted, in the same
    order (label, then path below the class folder). `scanned`: what _tar_images already read of it."""
    images, folders = scanned or _tar_images(path)
    class_names = sorted({parts[0] for parts, *_ in images if len(parts) >= 2}
                         | {parts[0] for parts in folders if parts and not parts[0].startswith(".")})
    check_class_count(f"archive {path}", class_names, num_classes)
    label_of = {name: label for label, name in enumerate(class_names)}
    # (label, path below the class level, offset, size, member name), in list_image_folder's order
    chosen = sorted(((label_of[parts[0]], "/".join(parts), offset, size, name) for parts, offset, size, name in images
                     if len(parts) >= 2), key=lambda item: item[:2])
    source = ArchiveSource([path], np.zeros(len(chosen)), [item[2] for item in chosen], [item[3] for item in chosen],
                           [item[4] for item in chosen])
    samples = [(source.name(index), item[0]) for index, item in enumerate(chosen)]
    check_labelled_samples(f"archive {path}", samples, class_names)
    return samples, class_names, source


def list_tar_flat(path: str, scanned=None) -> tuple[list[Sample], ArchiveSource]:
    """Every image of a tar, sorted by name, label -1: input for inference. `scanned` as for list_tar."""
    images, _ = scanned or _tar_images(path)
    if not images:
        raise VitkitError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in archive {path}; check the path")
    source = ArchiveSource([path], np.zeros(len(images)), [image[1] for image in images],
                           [image[2] for image in images], [image[3] for image in images])
    return [(source.name(index), -1) for index in range(len(images))], source


# --------------------------------------------------------------------------------------------------- shards

def _index_location(location: str) -> tuple[str, str]:
    """(index.json's path or URL, the folder its shard names are relative to) for a shard folder or its index."""
    if location.rstrip("/").endswith(".json"):
        index = location
    else:
        index = location.rstrip("/") + "/" + INDEX_NAME
    return index, index.rsplit("/", 1)[0] if "/" in index else "."


def holds_shards(location: str) -> bool:
    """Whether a path or URL is shards (`vitkit data shard`): an index.json, or a folder or prefix holding one."""
    if location.endswith(".json"):
        return True
    if storage.is_url(location):
        return storage.exists(location.rstrip("/") + "/" + INDEX_NAME)
    return os.path.isfile(os.path.join(location, INDEX_NAME))


def is_shard_split(location: str) -> bool:
    """A split to read as shards: shards (holds_shards), or any URL left after storage.local_input, which copies
    every remote split but shards in."""
    if storage.is_url(location):
        if location.endswith(".tar"):
            raise VitkitError(f"{location}: tar archives are read in place from local paths only; write the split "
                              "as shards (`vitkit data shard`) to read it from a bucket")
        return True
    return holds_shards(location)


def _read_index(index: str) -> dict:
    try:
        with storage.open_read(index) as file:
            text = file.read(MAX_INDEX_BYTES + 1)
    except FileNotFoundError:
        raise VitkitError(f"shard index {index} does not exist: point the data path at a folder that "
                          "`vitkit data shard` wrote, or at its index.json") from None
    except OSError as error:
        raise VitkitError(f"cannot read shard index {index} ({error}): check the path") from None
    if len(text) > MAX_INDEX_BYTES:
        raise VitkitError(f"shard index {index} is over {MAX_INDEX_BYTES:,} bytes: not an index vitkit wrote; "
                          "split the data set into several")
    try:
        content = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise VitkitError(f"shard index {index} is not valid JSON ({str(error)[:200]}): re-create it with "
                          "`vitkit data shard`") from None
    if not isinstance(content, dict) or content.get("wids_version") != 1 or "vitkit" not in content:
        raise VitkitError(f"{index} is not a vitkit shard index (wids_version 1 with a 'vitkit' section): re-create "
                          "the shards with `vitkit data shard`")
    return content


def _int_list(value, count: int, what: str, index: str) -> np.ndarray:
    if not isinstance(value, list) or len(value) != count or not all(type(item) is int for item in value):
        raise VitkitError(f"shard index {index}: {what} must be a list of {count} integers; re-create the index")
    return np.array(value, dtype=np.int64) if value else np.zeros(0, dtype=np.int64)


def _safe_shard_name(url, index: str) -> str:
    parts = url.split("/") if isinstance(url, str) else []
    if not parts or len(url) > 1024 or url.startswith("/") or storage.is_url(url) or any(
            part in ("", ".", "..") for part in parts):
        raise VitkitError(f"shard index {index} names a shard {str(url)[:200]!r} outside its folder: shard urls must "
                          "be relative names below the index's folder; re-create the index")
    return url


def list_shards(location: str, num_classes: int | None = None) -> tuple[list[Sample], list[str], ArchiveSource]:
    """Samples, class names and bytes' source of a shard folder (local or URL) through its index.json, which is
    checked throughout: shard names stay below the index's folder, every byte range lies inside its shard's size
    (and, locally, each shard file has that size), member sizes and counts are bounded, labels name a class."""
    index, folder = _index_location(location)
    content = _read_index(index)
    classes = content["vitkit"].get("classes") if isinstance(content["vitkit"], dict) else None
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes) or len(set(classes)) != len(
            classes):
        raise VitkitError(f"shard index {index}: 'vitkit.classes' must be a list of distinct class names")
    check_class_count(f"shards {folder}", classes, num_classes)
    shards = content.get("shardlist")
    if not isinstance(shards, list) or not all(isinstance(shard, dict) for shard in shards):
        raise VitkitError(f"shard index {index}: 'shardlist' must be a list of shards; re-create the index")
    containers, container_of, offsets, sizes, labels, names, total = [], [], [], [], [], [], 0
    for number, shard in enumerate(shards):
        url = _safe_shard_name(shard.get("url"), index)
        count = shard.get("nsamples")
        filesize = shard.get("filesize")
        if type(count) is not int or not 0 <= count <= MAX_SHARD_SAMPLES or type(filesize) is not int or filesize < 0:
            raise VitkitError(f"shard index {index}: shard {url} needs a sample count (0 to {MAX_SHARD_SAMPLES:,}) "
                              "and a file size; re-create the index")
        total += count
        if total > MAX_MEMBERS:
            raise VitkitError(f"shard index {index} lists more than {MAX_MEMBERS:,} samples: split the data set")
        starts = _int_list(shard.get("offsets"), count, f"shard {url}'s offsets", index)
        lengths = _int_list(shard.get("sizes"), count, f"shard {url}'s sizes", index)
        targets = _int_list(shard.get("labels"), count, f"shard {url}'s labels", index)
        members = shard.get("members")
        if not isinstance(members, list) or len(members) != count or not all(
                isinstance(name, str) and len(name) <= 1024 for name in members):
            raise VitkitError(f"shard index {index}: shard {url}'s members must be {count} names; re-create it")
        if count and (starts.min() < _BLOCK or lengths.min() < 0 or lengths.max() > MAX_MEMBER_BYTES
                      or (starts + lengths).max() > filesize):
            raise VitkitError(f"shard index {index}: shard {url} lists byte ranges outside its {filesize:,} bytes "
                              f"or members over {MAX_MEMBER_BYTES:,} bytes; re-create the shards")
        if count and (targets.min() < 0 or targets.max() >= len(classes)):
            raise VitkitError(f"shard index {index}: shard {url} has labels outside the {len(classes)} classes")
        path = folder + "/" + url
        if not storage.is_url(path):
            actual = os.path.getsize(path) if os.path.isfile(path) else None
            if actual != filesize:
                found = "is missing" if actual is None else f"has {actual:,} bytes"
                raise VitkitError(f"shard {path} {found} but the index says {filesize:,} bytes: copy the shard "
                                  "again or re-create the shards")
        containers.append(path)
        container_of.append(np.full(count, number, dtype=np.int32))
        offsets.append(starts)
        sizes.append(lengths)
        labels.append(targets)
        names.extend(members)
    if not total:
        raise VitkitError(f"shard index {index} lists no samples: re-create the shards from a folder with images")
    labels = np.concatenate(labels)
    source = ArchiveSource(containers, np.concatenate(container_of), np.concatenate(offsets), np.concatenate(sizes),
                           names)
    samples = [(source.name(i), int(label)) for i, label in enumerate(labels)]
    check_labelled_samples(f"shards {folder}", samples, classes)
    return samples, list(classes), source


def list_labelled(path: str, num_classes: int | None = None) -> tuple[list[Sample], list[str], object | None]:
    """(samples, class names, byte source) of a training or validation split in any form: an image folder of
    classes (source None: each sample is a file), a .tar of class folders, or shards (a folder with index.json,
    the index itself, or a URL)."""
    path = os.fspath(path)
    if is_shard_split(path):
        return list_shards(path, num_classes)
    if path.endswith(".tar") and os.path.isfile(path):
        return list_tar(path, num_classes)
    samples, class_names = list_image_folder(path, num_classes)
    return samples, class_names, None


def list_inference_input(path: str, num_classes: int | None) -> tuple[list[Sample], bool, object | None] | None:
    """(samples, whether they are labelled, byte source) for a .tar or shards; None for a folder (the caller's)."""
    path = os.fspath(path)
    if is_shard_split(path):
        samples, _, source = list_shards(path, num_classes)
        return samples, True, source
    if not (path.endswith(".tar") and os.path.isfile(path)):
        return None
    scanned = _tar_images(path)  # read the headers once, for the choice and the listing
    if any(len(image[0]) >= 2 for image in scanned[0]):
        samples, _, source = list_tar(path, num_classes, scanned)
        return samples, True, source
    samples, source = list_tar_flat(path, scanned)
    return samples, False, source


# ---------------------------------------------------------------------------------------------- writing shards

def _shard_name(number: int) -> str:
    return SHARD_PATTERN.format(number)


def _write_shard(tar_path: str, items: list[tuple[str, str, bytes, int]]) -> tuple[list[int], list[int]]:
    """A WebDataset shard: for each (key, extension, bytes, label) the members <key>.<ext> and <key>.cls (the label
    as decimal text), one after the other, then the end-of-archive marker. Written here rather than by tarfile,
    which pads the archive to 10 KB records, so that a shard's size is what --max-shard-bytes counted. Returns each
    image member's data offset and size."""
    offsets, sizes, position = [], [], 0
    with open(tar_path, "wb") as out:
        for key, extension, data, label in items:
            for name, payload in ((f"{key}.{extension}", data), (f"{key}.cls", str(label).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(payload), 0o444, 0  # no time: the same input, the same shard
                header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
                if payload is data:
                    offsets.append(position + len(header))
                    sizes.append(len(payload))
                padding = -len(payload) % _BLOCK
                out.write(header + payload + bytes(padding))
                position += len(header) + len(payload) + padding
        out.write(bytes(2 * _BLOCK))
    return offsets, sizes


def _shard_bytes(size: int) -> int:
    """What one sample of `size` bytes adds to a shard: two headers, its data padded, the label's block."""
    return 3 * _BLOCK + -(-size // _BLOCK) * _BLOCK


def _store(local_file: str, dest: str, name: str) -> None:
    """The finished local file as dest/name: renamed into place locally, uploaded whole remotely."""
    with storage.publish(dest.rstrip("/") + "/" + name) as target:
        shutil.move(local_file, target)  # a copy where the scratch folder lies on another file system than dest


def write_shards(src: str, dest: str, shard_size: int | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """WebDataset shards of a split (image folder, .tar of class folders, or other shards) in `dest` (a folder or a
    URL): shard-000000.tar, ... with at most `shard_size` samples and `max_shard_bytes` bytes each (a larger image
    gets a shard of its own), then index.json, written last so that a folder with an index is complete.

    Samples keep the split's order (label, then path) and are keyed by their position (00000000, 00000001, ...), so
    sample i of the shards is sample i of the source: training from either is the same. Bytes are copied, never
    decoded; unreadable files are skipped with a warning."""
    if shard_size is not None and not 1 <= shard_size <= MAX_SHARD_SAMPLES:
        raise VitkitError(f"--shard-size must be 1 to {MAX_SHARD_SAMPLES:,}, got {shard_size}")
    if not 4 * _BLOCK <= max_shard_bytes <= 1 << 40:
        raise VitkitError(f"--max-shard-bytes must be {4 * _BLOCK} to {1 << 40:,}, got {max_shard_bytes}")
    index_path, _ = _index_location(dest)
    if storage.exists(index_path):
        raise VitkitError(f"{dest} already holds shards ({INDEX_NAME}): write to an empty folder or remove them")
    if not storage.is_url(dest):
        os.makedirs(dest, exist_ok=True)
    # A remote image folder or .tar is copied in once per machine (after the checks above); remote shards are read
    # where they are.
    samples, class_names, source = list_labelled(storage.local_input(src))
    source = source or FileSource([path for path, _ in samples])
    shard_list, written, skipped = [], 0, 0
    batch, batch_bytes = [], 0

    def flush():
        nonlocal batch, batch_bytes
        name = _shard_name(len(shard_list))
        with tempfile.TemporaryDirectory(prefix="vitkit-shard-") as scratch:
            local = os.path.join(scratch, name)
            offsets, sizes = _write_shard(local, batch)
            filesize = os.path.getsize(local)
            _store(local, dest, name)
        shard_list.append({"url": name, "nsamples": len(batch), "filesize": filesize,
                           "members": [f"{key}.{extension}" for key, extension, _, _ in batch],
                           "offsets": offsets, "sizes": sizes, "labels": [label for *_, label in batch]})
        batch, batch_bytes = [], 0

    for i, (name, label) in enumerate(samples):
        try:
            data = _read_bounded(source, i)
        except OSError as error:
            warnings.warn(f"skipping unreadable image {name}: {error}")
            skipped += 1
            continue
        extension = name.rsplit(".", 1)[-1].lower()
        cost = _shard_bytes(len(data))
        if batch and (len(batch) == shard_size or batch_bytes + cost > max_shard_bytes - 2 * _BLOCK):
            flush()
        batch.append((f"{written:08d}", extension, data, label))
        batch_bytes += cost
        written += 1
    if batch:
        flush()
    if not written:
        raise VitkitError(f"none of the {len(samples)} images of {src} could be read: check the files")
    index = {"__kind__": INDEX_KIND, "wids_version": 1, "name": os.path.basename(os.path.normpath(src)),
             "shardlist": shard_list, "vitkit": {"version": 1, "classes": class_names}}
    with tempfile.TemporaryDirectory(prefix="vitkit-shard-") as scratch:
        local = os.path.join(scratch, INDEX_NAME)
        with open(local, "w") as file:
            json.dump(index, file, separators=(",", ":"))
        _store(local, dest, INDEX_NAME)
    return {"dest": dest, "shards": len(shard_list), "samples": written, "skipped": skipped,
            "classes": len(class_names)}


def _read_bounded(source, index: int) -> bytes:
    """A sample's bytes for a shard; a file over MAX_MEMBER_BYTES is refused before it is read."""
    if isinstance(source, FileSource):
        path = source.name(index)
        if os.path.getsize(path) > MAX_MEMBER_BYTES:
            raise OSError(f"over {MAX_MEMBER_BYTES:,} bytes, larger than any image a shard holds")
        return read_bytes(path).tobytes()
    return source.read(index).tobytes()

