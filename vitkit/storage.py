"""Remote storage: the one place a path such as ``s3://bucket/run`` is recognised, opened, listed, copied and written.

Schemes: ``s3://`` (s3fs), ``obs://`` (Huawei OBS, read as S3 through s3fs with the configured endpoint) and
``gs://``/``gcs://`` (gcsfs, if installed). Endpoint and credentials come the standard way: the AWS_* variables
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE, AWS_DEFAULT_REGION), AWS_ENDPOINT_URL for
an S3-compatible store (OBS, MinIO), and the config key ``storage.endpoint_url``, which wins over the variable.

Nothing half-written: an object store makes each object visible whole or not at all (one PUT, or a multipart upload
that is completed), so every upload here is one object written from a complete local file, and a set of objects
that belong together (a checkpoint's .safetensors and .pt) is uploaded with its marker last: a reader that finds the
marker finds every other part complete. Deletions go the other way round, marker first.

Transient failures (timeouts, dropped connections, 5xx, throttling) are retried with exponential backoff, a bounded
number of times; anything else (an unreachable endpoint, a missing bucket, refused credentials, an unknown scheme)
is a VitkitError that names the URL and the fix.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

from vitkit.errors import VitkitError
from vitkit.faults import fault_point
from vitkit.fileio import atomic_path

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_S3_SCHEMES = ("s3", "s3a", "obs")
_GCS_SCHEMES = ("gs", "gcs")
_INSTALL_CLOUD = "pip install 'vitkit[cloud]'"
# Attempts for an operation that keeps failing transiently, and the first pause (doubled each time): bounded so an
# outage stops the run within about a minute instead of hanging it.
MAX_ATTEMPTS = 5
FIRST_BACKOFF_S = 0.5
# botocore's own retries of each request (5xx, throttling, dropped connections), inside the attempts above.
BOTOCORE_ATTEMPTS = 3
# Seconds botocore waits to connect or for a reply before an attempt counts as a transient failure.
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 120

_settings = {"endpoint_url": ""}
_T = TypeVar("_T")


def configure(endpoint_url: str = "") -> None:
    """Set the S3-compatible endpoint (storage.endpoint_url); '' leaves it to AWS_ENDPOINT_URL or AWS itself."""
    if endpoint_url and not re.match(r"^https?://[^\s/]+", endpoint_url):
        raise VitkitError(f"storage.endpoint_url '{endpoint_url[:200]}' is not an http(s) URL: give one such as "
                          "https://obs.cn-north-4.myhuaweicloud.com or http://127.0.0.1:9000")
    _settings["endpoint_url"] = endpoint_url
    _filesystems.clear()


def is_url(path) -> bool:
    """True for ``scheme://...`` (any scheme: an unknown one is an error in filesystem(), never a local folder)."""
    return isinstance(path, str) and _URL.match(path) is not None


def scheme(url: str) -> str:
    return _URL.match(url)[1].lower()


def _endpoint() -> str:
    return _settings["endpoint_url"] or os.environ.get("AWS_ENDPOINT_URL_S3", "") or os.environ.get("AWS_ENDPOINT_URL", "")


_filesystems: dict[str, object] = {}


def filesystem(path: str):
    """(fsspec filesystem, path inside it) for a URL; (the local filesystem, path) for anything else."""
    import fsspec  # noqa: F401 - a dependency of the cloud extra; the local branch below needs it too

    if not is_url(path):
        return fsspec.filesystem("file"), str(path)
    name = scheme(path)
    rest = path[_URL.match(path).end():]
    if name in _S3_SCHEMES:
        fs = _s3()
    elif name in _GCS_SCHEMES:
        fs = _gcs()
    elif name == "file":
        return fsspec.filesystem("file"), rest
    else:
        raise VitkitError(f"'{_clip(path)}' has the scheme '{name}://', which vitkit cannot read or write: use "
                          "s3://, obs:// or gs:// (after " + _INSTALL_CLOUD + "), or a local path")
    return fs, rest.rstrip("/")


def _s3():
    if "s3" not in _filesystems:
        try:
            import s3fs
        except ImportError:
            raise VitkitError(f"s3:// and obs:// paths need s3fs, which is not installed: {_INSTALL_CLOUD}") from None
        endpoint = _endpoint()
        config = {"connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S,
                  "retries": {"max_attempts": BOTOCORE_ATTEMPTS, "mode": "standard"}}
        # No listing cache: another process (a resumed run, a reader) may have changed the bucket since.
        _filesystems["s3"] = s3fs.S3FileSystem(
            client_kwargs={"endpoint_url": endpoint} if endpoint else {}, config_kwargs=config,
            use_listings_cache=False, skip_instance_cache=True,
        )
    return _filesystems["s3"]


def _gcs():
    if "gs" not in _filesystems:
        try:
            import gcsfs
        except ImportError:
            raise VitkitError("gs:// paths need gcsfs, which is not installed: pip install gcsfs") from None
        _filesystems["gs"] = gcsfs.GCSFileSystem(skip_instance_cache=True)
    return _filesystems["gs"]


def _clip(text: str) -> str:
    return text if len(text) <= 200 else text[:200] + "..."


def _join(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *names])


# ---------------------------------------------------------------------------------------------- errors and retries

def _is_transient(error: BaseException) -> bool:
    try:
        from botocore.exceptions import ConnectTimeoutError, ReadTimeoutError
        if isinstance(error, (ConnectTimeoutError, ReadTimeoutError)):
            return True
    except ImportError:
        pass
    if isinstance(error, (TimeoutError, ConnectionResetError)):
        return True
    if isinstance(error, OSError) and error.errno in (errno.EBUSY, errno.ETIMEDOUT, errno.EAGAIN):
        return True  # s3fs's translation of 503 SlowDown and of timeouts
    text = str(error)
    if isinstance(error, (FileNotFoundError, PermissionError)):
        return False
    return bool(re.search(r"\b(5\d\d|SlowDown|Throttl\w*|RequestTimeout|Service ?Unavailable|InternalError)\b",
                          text))


def _is_unreachable(error: BaseException) -> bool:
    try:
        from botocore.exceptions import EndpointConnectionError
        if isinstance(error, EndpointConnectionError):
            return True
    except ImportError:
        pass
    return isinstance(error, ConnectionError) or "Could not connect" in str(error)


def _user_error(error: BaseException, url: str, doing: str) -> VitkitError:
    reason = _clip(" ".join(str(error).split()))
    where = _endpoint() or "the default AWS endpoint"
    if _is_unreachable(error):
        return VitkitError(f"cannot reach the storage endpoint {where} to {doing} {_clip(url)} ({reason}): check "
                           "storage.endpoint_url or AWS_ENDPOINT_URL and the network")
    if isinstance(error, PermissionError) or re.search(r"AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|"
                                                       r"Forbidden|403|ExpiredToken|NoCredentials|Unable to locate credentials",
                                                       reason):
        return VitkitError(f"the storage refused access to {_clip(url)} while trying to {doing} it ({reason}): set "
                           "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) to credentials allowed there")
    if isinstance(error, FileNotFoundError) or "NoSuchBucket" in reason:
        return VitkitError(f"{_clip(url)} does not exist (while trying to {doing} it): check the bucket and path, "
                           "or create the bucket first")
    return VitkitError(f"could not {doing} {_clip(url)} ({reason}): check the URL, the endpoint and the credentials")


def with_retries(doing: str, url: str, operation: Callable[[], _T]) -> _T:
    """Run `operation`, retrying transient failures with exponential backoff; a lasting failure is a VitkitError."""
    for attempt in range(MAX_ATTEMPTS):
        try:
            return operation()
        except VitkitError:
            raise
        except Exception as error:  # noqa: BLE001 - fsspec backends raise many types; each is sorted below
            if not _is_transient(error) or attempt == MAX_ATTEMPTS - 1:
                raise _user_error(error, url, doing) from None
        time.sleep(FIRST_BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------------------- reading

def open_read(path, mode: str = "rb"):
    """A binary (or, with mode 'r', text) file object for a local path or a URL; a missing file is a VitkitError."""
    if not is_url(path):
        return open(path, mode)
    fs, inner = filesystem(path)
    return with_retries("read", path, lambda: fs.open(inner, mode))


def exists(path) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, inner = filesystem(path)

    def look_up():
        try:
            fs.info(inner)  # not fs.exists, which answers False for an unreachable endpoint too
            return True
        except FileNotFoundError:
            return False
    return with_retries("look up", path, look_up)


def isdir(path) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    fs, inner = filesystem(path)
    return with_retries("look up", path, lambda: fs.isdir(inner))


def listdir(path) -> list[str]:
    """Names (not paths) directly inside a folder or prefix, sorted; [] when there is none."""
    if not is_url(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, inner = filesystem(path)

    def names():
        try:
            return sorted({entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(inner, detail=False)
                           if entry.rstrip("/") != inner})
        except FileNotFoundError:
            return []
    return with_retries("list", path, names)


# ------------------------------------------------------------------------------------------- copying and writing

def _version(entry: dict) -> str:
    """What changes whenever an object is rewritten: its ETag (S3, OBS) or generation (GCS); '' if the store says
    neither."""
    return str(entry.get("ETag") or entry.get("etag") or entry.get("generation") or "")


def _remote_files(url: str) -> dict[str, tuple[int, str]]:
    """{path relative to url: (size, version)} of every object under a URL (a single object: {'': ...})."""
    fs, inner = filesystem(url)

    def walk():
        info = fs.info(inner)
        if info["type"] != "directory":
            return {"": (info["size"], _version(info))}
        found = fs.find(inner, detail=True)
        prefix = inner.rstrip("/") + "/"
        return {path[len(prefix):]: (entry["size"], _version(entry)) for path, entry in found.items()
                if path.startswith(prefix) and entry["type"] != "directory"}
    return with_retries("list", url, walk)


def _stamp_of(local: Path) -> Path:
    return local.with_name(f".{local.name}.version")


def _stamp(version: str, size_and_time: tuple[int, int]) -> str:
    """The remote version a local copy was made from, with the copy's own size and time: a copy replaced or edited
    since no longer matches its stamp."""
    return f"{version} {size_and_time[0]} {size_and_time[1]}"


def _is_current_copy(local: Path, version: str) -> bool:
    """Whether `local` is the copy its stamp describes, of the object's current version (never, when the store names
    no version). The stamp holds the size the download wrote, so a matching stamp means a whole copy."""
    stamp = _stamp_of(local)
    return bool(version) and local.is_file() and stamp.is_file() and stamp.read_text() == _stamp(version, _stat(local))


def _has_size(local: Path, size: int) -> bool:
    return local.is_file() and local.stat().st_size == size


def download_file(url: str, local: str | os.PathLike) -> tuple[int, int]:
    """Copy one object to a local file, atomically (a killed download leaves no partial file at `local`). Returns
    the (size, mtime_ns) of the file this call wrote, taken before it was moved into place: another process's copy
    may replace it at `local` right after."""
    fs, inner = filesystem(url)
    # Not fsynced: a cached copy that a crash damages is fetched again (its size differs), and a flush per object
    # would dominate copying a data set of small images.
    with atomic_path(local, durable=False) as tmp:
        with_retries("download", url, lambda: fs.get_file(inner, str(tmp)))
        written = _stat(Path(tmp))
    return written


def copy_tree_in(url: str, local: str | os.PathLike, refresh_file: bool = False) -> Path:
    """Mirror a URL (a folder or one object) into a local folder or file. Files already there with the remote size
    are kept (a data set's objects are written whole and never edited in place), so a second copy only fetches what
    is new. With `refresh_file`, a single object (a model, which may be rewritten under the same name and size) is
    kept only while its version is the one copied (`_is_current_copy`)."""
    local = Path(local)
    files = _remote_files(url)
    if list(files) == [""]:
        size, version = files[""]
        if refresh_file and not _is_current_copy(local, version):
            written = download_file(url, local)
            with atomic_path(_stamp_of(local), durable=False) as tmp:
                tmp.write_text(_stamp(version, written))
        elif not refresh_file and not _has_size(local, size):
            download_file(url, local)
        return local
    for relative, (size, _) in sorted(files.items()):
        _check_relative(relative, url)
        if not _has_size(local / relative, size):
            download_file(_join(url, relative), local / relative)
    local.mkdir(parents=True, exist_ok=True)
    return local


def _check_relative(relative: str, url: str) -> None:
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise VitkitError(f"the object '{_clip(relative)}' under {_clip(url)} has a name that is no safe local path: "
                          "rename it in the bucket")


def upload_file(local: str | os.PathLike, url: str) -> None:
    """Publish a complete local file at a URL. One object: readers see the old object or the whole new one."""
    fs, inner = filesystem(url)
    fault_point("upload")
    with_retries("upload to", url, lambda: fs.put_file(str(local), inner))


@contextlib.contextmanager
def publish(path: str | os.PathLike):
    """Yields a local path to write; on success it appears whole at `path` (a URL: uploaded; local: renamed into
    place by atomic_path). On failure nothing is published."""
    if not is_url(path):
        with atomic_path(path) as tmp:
            yield tmp
        return
    with tempfile.TemporaryDirectory(prefix="vitkit-upload-") as folder:
        local = Path(folder) / str(path).rstrip("/").rsplit("/", 1)[-1]
        yield local
        upload_file(local, str(path))


def remove(url: str) -> None:
    fs, inner = filesystem(url)
    with_retries("delete", url, lambda: fs.rm(inner, recursive=True) if fs.exists(inner) else None)


def copy_tree_out(local: str | os.PathLike, url: str) -> None:
    """Upload a local file, or every file under a local folder, to a URL (see RemoteFolder for the incremental,
    ordered mirror that training uses)."""
    if Path(local).is_file():
        upload_file(local, url)
        return
    RemoteFolder(local, url, known={}).sync(delete=False)


def check_writable(url: str) -> None:
    """Fail now, before any training, if objects cannot be written under `url` (unreachable endpoint, missing
    bucket, refused credentials): writes and deletes one small object."""
    fs, inner = filesystem(url)
    bucket = inner.split("/", 1)[0]
    def bucket_exists():
        try:
            fs.info(bucket)
            return True
        except FileNotFoundError:
            return False
    if not with_retries("look up", url, bucket_exists):
        raise VitkitError(f"the bucket '{bucket}' of {_clip(url)} does not exist: create it, or fix the URL")
    probe = _join(url, f".vitkit-write-check-{os.getpid()}")
    with tempfile.NamedTemporaryFile() as empty:
        upload_file(empty.name, probe)
    remove(probe)


# -------------------------------------------------------------------------------------------- the output mirror

class RemoteFolder:
    """A local folder whose new and changed files are published at a URL, the checkpoint markers last.

    `known` maps each relative path known to be the same locally and remotely to its local (size, mtime): a file
    whose stat differs is uploaded; a known file gone locally (a pruned checkpoint) is deleted remotely, its marker
    first. Files this process never saw (another machine's logs) are left alone."""

    def __init__(self, local: str | os.PathLike, url: str, known: dict | None = None,
                 is_marker: Callable[[str], bool] = lambda name: False):
        self.local, self.url, self.is_marker = Path(local), url.rstrip("/"), is_marker
        self.known = {} if known is None else dict(known)

    @classmethod
    def pull(cls, url: str, local: str | os.PathLike, is_marker: Callable[[str], bool] = lambda name: False):
        """Copy what is at the URL into the local folder (a previous run to resume) and mirror from there on."""
        folder = cls(local, url, is_marker=is_marker)
        if exists(url):
            copy_tree_in(url, local)
            for path in Path(local).rglob("*"):
                if path.is_file():
                    folder.known[path.relative_to(local).as_posix()] = _stat(path)
        Path(local).mkdir(parents=True, exist_ok=True)
        return folder

    def sync(self, delete: bool = True) -> None:
        current = {path.relative_to(self.local).as_posix(): _stat(path) for path in sorted(self.local.rglob("*"))
                   if path.is_file() and not _is_local_only(path.name)}
        changed = [name for name, stat in current.items() if self.known.get(name) != stat]
        # Parts before markers: a marker is only ever visible beside complete parts.
        for name in sorted(changed, key=lambda name: self.is_marker(name.rsplit("/", 1)[-1])):
            if self.is_marker(name.rsplit("/", 1)[-1]):
                fault_point("upload_marker")
            upload_file(self.local / name, _join(self.url, name))
            self.known[name] = current[name]
        if delete:
            gone = [name for name in self.known if name not in current]
            for name in sorted(gone, key=lambda name: not self.is_marker(name.rsplit("/", 1)[-1])):
                remove(_join(self.url, name))
                del self.known[name]


def _stat(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _is_local_only(name: str) -> bool:
    """vitkit's own bookkeeping, never mirrored: a write in progress, or a copy's version stamp (`_stamp_of`)."""
    return name.startswith(".") and (name.endswith((".tmp", ".version")) or ".partial" in name)


# ------------------------------------------------------------------------------------------ one copy per machine

def cache_dir() -> Path:
    return Path(_settings.get("cache_dir") or os.environ.get("VITKIT_CACHE") or Path.home() / ".cache" / "vitkit")


def cache_path(url: str, kind: str) -> Path:
    """A local folder of the cache for one URL: its name is readable and a hash keeps two URLs apart."""
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[:64] or "root"
    return cache_dir() / kind / f"{tail}-{digest}"


def is_machine_leader() -> bool:
    """The one process per machine that copies: LOCAL_RANK 0 under torchrun, DEVICE_ID % min(RANK_SIZE, 8) == 0
    under the original's launcher, and a process started alone."""
    if "LOCAL_RANK" in os.environ:
        return os.environ["LOCAL_RANK"] == "0"
    if "DEVICE_ID" in os.environ and "RANK_SIZE" in os.environ:
        return int(os.environ["DEVICE_ID"]) % min(int(os.environ["RANK_SIZE"]), 8) == 0
    return True


def _job_token() -> str:
    """Names this job on this machine: the processes of one launch share their parent (torchrun's agent)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", os.environ.get("TORCHELASTIC_RUN_ID", os.environ.get("JOB_ID", "")))[:64] + \
        f"-{os.getppid()}"


def once_per_machine(name: str, work: Callable[[], None], wait_s: float) -> None:
    """The machine's leader runs `work` and leaves a marker; the other local processes wait for it (at most
    `wait_s` seconds), and fail with the leader's error if it failed."""
    marker = cache_dir() / "locks" / f"{re.sub(r'[^A-Za-z0-9_-]', '_', name)[:80]}-{_job_token()}"
    if is_machine_leader():
        marker.unlink(missing_ok=True)
        try:
            work()
        except VitkitError as error:
            _write_marker(marker, f"failed: {error}")
            raise
        _write_marker(marker, "done")
        return
    deadline = time.monotonic() + wait_s
    while not marker.is_file():
        if time.monotonic() > deadline:
            raise VitkitError(f"waited {wait_s:g}s for this machine's first process to copy {name}: raise "
                              "storage.sync_wait_s, or check that process's log")
        time.sleep(0.2)
    outcome = marker.read_text()
    if outcome.startswith("failed: "):
        raise VitkitError(outcome[len("failed: "):])


def _write_marker(marker: Path, text: str) -> None:
    with atomic_path(marker) as tmp:
        tmp.write_text(text)


def fetch(url: str, wait_s: float = 3600) -> Path:
    """The local copy of a remote file or folder (a model, a checkpoint to resume), made once per machine."""
    local = cache_path(url, "objects") / url.rstrip("/").rsplit("/", 1)[-1]
    once_per_machine(url, lambda: copy_tree_in(url, local, refresh_file=True), wait_s)
    return local


# ------------------------------------------------------------------------------- a command's remote paths, made local

def configure_from(cfg) -> None:
    """Apply the config's storage group (endpoint, cache folder) to this process."""
    configure(cfg.storage.endpoint_url)
    _settings["cache_dir"] = cfg.storage.cache_dir


def local_input(path: str, wait_s: float = 3600, is_data: bool = True) -> str:
    """What a command reads for `path`: a local path as it is; remote shards as they are (read in place, a byte
    range per image: vitkit.data.archives); any other remote data folder or .tar archive as its local copy, made
    once per machine while the other local processes wait."""
    from vitkit.data.archives import holds_shards  # archives reads through this module

    if not is_url(path) or (is_data and holds_shards(path)):
        return path
    if not is_data:
        return str(fetch(path, wait_s))
    local = cache_path(path, "data")
    if path.endswith(".tar"):  # an archive of class folders is read in place from its copy, known by its suffix
        local = local / path.rsplit("/", 1)[-1]
    once_per_machine(path, lambda: copy_tree_in(path, local), wait_s)
    return str(local)


def localize_inputs(cfg, keys: tuple[str, ...]) -> None:
    """Replace each remote path among `keys` ('data.train_path', 'model.pretrained', ...) by what local_input gives."""
    for key in keys:
        group, name = key.split(".")
        value = getattr(getattr(cfg, group), name)
        setattr(getattr(cfg, group), name, local_input(value, cfg.storage.sync_wait_s, is_data=group == "data"))


def prepare_training(cfg, is_marker: Callable[[str], bool]) -> list[RemoteFolder]:
    """Before a run: every remote input copied in (once per machine), every remote output folder checked for
    writing, pulled into a local staging folder and returned as a RemoteFolder to sync after each checkpoint and
    at the end. With storage.enable_modelarts, the original's sync: data_url -> data_path, checkpoint_url ->
    load_path, train_url -> output_path, and output_path mirrored to train_url."""
    configure_from(cfg)
    store = cfg.storage
    mirrors = []
    # Outputs first: a bucket that cannot be written fails the run before any data is copied.
    outputs = [url for url in (store.train_url if store.enable_modelarts else "", cfg.checkpoint.output_dir,
                               cfg.logging.log_dir) if is_url(url)]
    for url in outputs:
        check_writable(url)
    if store.enable_modelarts:
        for key in ("data_path", "output_path", "load_path"):
            if is_url(getattr(store, key)):
                raise VitkitError(f"storage.{key} ({key}) is the local copy of a URL and must be a local path, not "
                                  f"'{_clip(getattr(store, key))}': set it to a folder such as /cache/...")
        if not os.path.isabs(cfg.checkpoint.output_dir) and not is_url(cfg.checkpoint.output_dir):
            cfg.checkpoint.output_dir = os.path.normpath(os.path.join(store.output_path, cfg.checkpoint.output_dir))
        pulled: list[RemoteFolder] = []

        def sync_in():
            if store.data_url:
                copy_tree_in(store.data_url, store.data_path)
            if store.checkpoint_url:
                copy_tree_in(store.checkpoint_url, store.load_path, refresh_file=True)
            if store.train_url:
                pulled.append(RemoteFolder.pull(store.train_url, store.output_path, is_marker))
        once_per_machine("modelarts-sync-in", sync_in, store.sync_wait_s)
        if store.train_url and is_machine_leader():
            mirrors.append(pulled[0])
    localize_inputs(cfg, ("data.train_path", "data.val_path"))  # model.pretrained: read_weights fetches a URL
    if is_url(cfg.train.resume):
        cfg.train.resume = str(fetch(cfg.train.resume, store.sync_wait_s))
    for group, name in (("checkpoint", "output_dir"), ("logging", "log_dir")):
        url = getattr(getattr(cfg, group), name)
        if not is_url(url):
            continue
        staging = cache_path(url, "runs")
        holder: list[RemoteFolder] = []

        def pull(url=url, staging=staging, holder=holder):
            # The staging folder becomes exactly what the bucket holds: the previous run to resume, nothing stale.
            shutil.rmtree(staging, ignore_errors=True)
            holder.append(RemoteFolder.pull(url, staging, is_marker))
        once_per_machine(url, pull, store.sync_wait_s)
        if is_machine_leader():
            mirrors.append(holder[0])
        setattr(getattr(cfg, group), name, str(staging))
    return mirrors


@contextlib.contextmanager
def local_folder_for(path: str):
    """Yields a local folder to write outputs into (a report, result files): `path` itself when local ('' stays
    ''), else a temporary folder whose files are uploaded to the URL once the block succeeds."""
    if not is_url(path):
        yield path
        return
    check_writable(path)
    with tempfile.TemporaryDirectory(prefix="vitkit-out-") as folder:
        yield folder
        copy_tree_out(folder, path)
