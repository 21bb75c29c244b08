"""vitkit.storage against a real S3 server (moto's, on 127.0.0.1, started here and stopped after): URLs, reads,
copies both ways, atomic publishing, the checkpoint-marker order of the output mirror, retries of transient errors,
one copy per machine, and one-line errors for unknown schemes, unreachable endpoints and missing buckets."""
import http.server
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from conftest import free_port  # noqa: E402
from vitkit import storage  # noqa: E402
from vitkit.errors import VitkitError  # noqa: E402

# Dummy credentials for moto; and no instance-metadata lookup (an HTTP request off the machine) when a test takes
# the credentials away.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint URL of a moto S3 server on loopback; its buckets are emptied by `s3` for each test."""
    saved = {key: os.environ.get(key) for key in S3_ENV}
    os.environ.update(S3_ENV)
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3(s3_server, tmp_path):
    """A fresh moto state, vitkit.storage pointed at the server, and the raw s3fs filesystem for checks."""
    urllib.request.urlopen(urllib.request.Request(f"{s3_server}/moto-api/reset", method="POST")).read()
    storage.configure(s3_server)
    storage._settings["cache_dir"] = str(tmp_path / "cache")
    fs, _ = storage.filesystem("s3://x")
    yield fs
    storage.configure("")
    storage._settings["cache_dir"] = ""


def put(fs, key: str, data: bytes) -> None:
    with fs.open(key, "wb") as handle:
        handle.write(data)


# ---- URLs and schemes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, expected", [
    ("s3://bucket/run", True), ("obs://bucket/a", True), ("gs://b/x", True), ("foo://x", True),
    ("./s3:/bucket", False), ("/data/train", False), ("relative/path", False), ("C:\\data", False), ("", False),
])
def test_is_url(path, expected):
    assert storage.is_url(path) is expected


def test_unknown_scheme_is_one_error_naming_it_and_the_fix():
    with pytest.raises(VitkitError) as caught:
        storage.filesystem("foo://bucket/data")
    assert "'foo://'" in str(caught.value) and "vitkit[cloud]" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_s3_without_s3fs_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # what `import s3fs` sees where it is not installed
    storage.configure("")
    with pytest.raises(VitkitError, match=r"s3fs.*pip install 'vitkit\[cloud\]'"):
        storage.filesystem("s3://bucket/run")


def test_obs_is_s3_at_the_configured_endpoint(s3):
    s3.mkdir("bucket")
    put(s3, "bucket/a.txt", b"obs")
    with storage.open_read("obs://bucket/a.txt") as handle:
        assert handle.read() == b"obs"


def test_endpoint_must_be_http():
    with pytest.raises(VitkitError, match="not an http"):
        storage.configure("ftp://host")


# ---- reading -------------------------------------------------------------------------------------------------


def test_open_exists_listdir(s3):
    s3.mkdir("bucket")
    put(s3, "bucket/data/train/ant/1.png", b"\x89PNG one")
    put(s3, "bucket/data/train/bee/2.png", b"\x89PNG two")
    assert storage.exists("s3://bucket/data/train/ant/1.png")
    assert not storage.exists("s3://bucket/data/train/ant/9.png")
    assert storage.listdir("s3://bucket/data/train") == ["ant", "bee"]
    assert storage.listdir("s3://bucket/data/none") == []
    assert storage.isdir("s3://bucket/data") and not storage.isdir("s3://bucket/data/train/ant/1.png")
    with storage.open_read("s3://bucket/data/train/bee/2.png") as handle:
        assert handle.read() == b"\x89PNG two"


def test_a_missing_object_is_one_error(s3):
    s3.mkdir("bucket")
    with pytest.raises(VitkitError, match=r"s3://bucket/nothing does not exist"):
        storage.open_read("s3://bucket/nothing")


# ---- copies --------------------------------------------------------------------------------------------------


def test_copy_tree_out_then_in_is_the_same_tree(s3, tmp_path):
    s3.mkdir("bucket")
    source = tmp_path / "source"
    files = {"a.txt": b"a" * 10, "sub/b.bin": bytes(range(256)), "sub/deeper/c": b""}
    for name, data in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    storage.copy_tree_out(source, "s3://bucket/tree")
    assert sorted(s3.find("bucket/tree")) == sorted(f"bucket/tree/{name}" for name in files)
    copy = storage.copy_tree_in("s3://bucket/tree", tmp_path / "copy")
    assert {path.relative_to(copy).as_posix(): path.read_bytes() for path in copy.rglob("*") if path.is_file()} == files


def test_copy_in_fetches_only_what_changed(s3, tmp_path, monkeypatch):
    s3.mkdir("bucket")
    put(s3, "bucket/d/one", b"1")
    put(s3, "bucket/d/two", b"22")
    storage.copy_tree_in("s3://bucket/d", tmp_path / "d")
    put(s3, "bucket/d/three", b"333")
    fetched = []
    real = storage.download_file
    monkeypatch.setattr(storage, "download_file", lambda url, local: fetched.append(url) or real(url, local))
    storage.copy_tree_in("s3://bucket/d", tmp_path / "d")
    assert fetched == ["s3://bucket/d/three"]
    assert (tmp_path / "d" / "three").read_bytes() == b"333"


def test_a_fetched_model_is_downloaded_again_only_when_the_object_changed(s3, monkeypatch):
    """A remote --model is fetched by every command; the copy is reused while the object's version (its ETag) is the
    one copied, and fetched again when the object is rewritten, even at the same size."""
    s3.mkdir("bucket")
    put(s3, "bucket/m/model.safetensors", b"first version")
    fetched = []
    real = storage.download_file
    monkeypatch.setattr(storage, "download_file", lambda url, local: fetched.append(url) or real(url, local))
    local = storage.fetch("s3://bucket/m/model.safetensors")
    assert local.read_bytes() == b"first version" and len(fetched) == 1
    assert storage.fetch("s3://bucket/m/model.safetensors").read_bytes() == b"first version"
    assert len(fetched) == 1  # the same object: the copy is used
    put(s3, "bucket/m/model.safetensors", b"other version")  # same size, other bytes
    assert storage.fetch("s3://bucket/m/model.safetensors").read_bytes() == b"other version"
    assert len(fetched) == 2
    edited_copy(local, b"damaged copy!")  # a local copy changed under the cache is not trusted either
    assert storage.fetch("s3://bucket/m/model.safetensors").read_bytes() == b"other version"
    assert len(fetched) == 3


def edited_copy(local: Path, data: bytes) -> None:
    """Rewrite a file as a later edit would: file times move in steps of up to a few milliseconds on some kernels,
    so the time is set a second on rather than left to the clock."""
    before = local.stat().st_mtime_ns
    local.write_bytes(data)
    os.utime(local, ns=(before, before + 10**9))


def test_a_copy_that_another_process_replaced_after_the_download_is_not_trusted(s3, monkeypatch):
    """Two commands fetch the same model at once while it is rewritten: the older copy may be renamed into place
    after the newer one. The stamp names the file its own download wrote, so it no longer matches, and the next
    fetch downloads the current version."""
    s3.mkdir("bucket")
    put(s3, "bucket/m/model.safetensors", b"new version!")
    real = storage.download_file

    def overtaken(url, local):
        written = real(url, local)
        edited_copy(Path(local), b"old version!")  # the other process's copy of the version before
        return written

    monkeypatch.setattr(storage, "download_file", overtaken)
    assert storage.fetch("s3://bucket/m/model.safetensors").read_bytes() == b"old version!"
    monkeypatch.setattr(storage, "download_file", real)
    assert storage.fetch("s3://bucket/m/model.safetensors").read_bytes() == b"new version!"


def test_version_stamps_are_never_mirrored(s3, tmp_path):
    s3.mkdir("bucket")
    put(s3, "bucket/m/model.safetensors", b"weights")
    out = tmp_path / "out"
    storage.copy_tree_in("s3://bucket/m/model.safetensors", out / "model.safetensors", refresh_file=True)
    assert (out / ".model.safetensors.version").is_file()
    storage.RemoteFolder.pull("s3://bucket/run", out, lambda name: name.endswith(".pt")).sync()
    assert s3.find("bucket/run") == ["bucket/run/model.safetensors"]


def test_an_object_named_to_escape_the_folder_is_refused(s3, tmp_path):
    s3.mkdir("bucket")
    put(s3, "bucket/d/ok", b"1")
    s3.call_s3("put_object", Bucket="bucket", Key="d/../../escaped", Body=b"x")
    with pytest.raises(VitkitError, match="no safe local path"):
        storage.copy_tree_in("s3://bucket/d", tmp_path / "inner" / "d")
    assert not list(tmp_path.rglob("escaped"))


def test_publish_uploads_whole_files_only(s3):
    s3.mkdir("bucket")
    with storage.publish("s3://bucket/out/result.txt") as local:
        local.write_text("complete")
        assert not s3.exists("bucket/out/result.txt")  # nothing visible while it is being written
    assert s3.cat_file("bucket/out/result.txt") == b"complete"
    with pytest.raises(RuntimeError):
        with storage.publish("s3://bucket/out/failed.txt") as local:
            local.write_text("half")
            raise RuntimeError("the writer failed")
    assert not s3.exists("bucket/out/failed.txt")


def test_local_paths_publish_atomically_too(tmp_path):
    with storage.publish(tmp_path / "x.txt") as local:
        local.write_text("done")
    assert (tmp_path / "x.txt").read_text() == "done"


# ---- the output mirror ---------------------------------------------------------------------------------------


def is_marker(name: str) -> bool:
    return name.endswith(".pt")


def test_mirror_uploads_markers_last_and_deletes_them_first(s3, tmp_path, monkeypatch):
    s3.mkdir("bucket")
    local = tmp_path / "run"
    local.mkdir()
    mirror = storage.RemoteFolder(local, "s3://bucket/run", is_marker=is_marker)
    events = []
    real_upload, real_remove = storage.upload_file, storage.remove
    monkeypatch.setattr(storage, "upload_file", lambda path, url: events.append(("put", url)) or real_upload(path, url))
    monkeypatch.setattr(storage, "remove", lambda url: events.append(("rm", url)) or real_remove(url))
    for name in ("m-1_4.pt", "m-1_4.safetensors", "log.txt", ".m-2_1.pt.abc.tmp"):
        (local / name).write_text(name)
    mirror.sync()
    assert events[-1] == ("put", "s3://bucket/run/m-1_4.pt")
    assert sorted(events[:-1]) == [("put", "s3://bucket/run/log.txt"), ("put", "s3://bucket/run/m-1_4.safetensors")]
    assert not s3.exists("bucket/run/.m-2_1.pt.abc.tmp")  # a write in progress is never published
    events.clear()
    mirror.sync()
    assert events == []  # nothing changed: nothing uploaded
    (local / "m-1_4.pt").unlink()
    (local / "m-1_4.safetensors").unlink()
    (local / "log.txt").write_text("log, longer now")
    mirror.sync()
    assert events == [("put", "s3://bucket/run/log.txt"), ("rm", "s3://bucket/run/m-1_4.pt"),
                      ("rm", "s3://bucket/run/m-1_4.safetensors")]
    assert sorted(s3.ls("bucket/run")) == ["bucket/run/log.txt"]


def test_pull_then_sync_leaves_files_of_others_alone(s3, tmp_path):
    s3.mkdir("bucket")
    put(s3, "bucket/run/m-1_4.pt", b"pt")
    put(s3, "bucket/run/rank1.log", b"another machine's log")
    mirror = storage.RemoteFolder.pull("s3://bucket/run", tmp_path / "run", is_marker)
    assert (tmp_path / "run" / "m-1_4.pt").read_bytes() == b"pt"
    (tmp_path / "run" / "rank1.log").unlink()  # this machine never wrote it: a sync without delete keeps it
    mirror.sync(delete=False)
    assert s3.exists("bucket/run/rank1.log")


# ---- errors and retries --------------------------------------------------------------------------------------


def test_unreachable_endpoint_is_one_error_naming_it(s3_server):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    storage.configure(endpoint)
    try:
        with pytest.raises(VitkitError) as caught:
            storage.check_writable("s3://bucket/run")
    finally:
        storage.configure("")
    assert f"cannot reach the storage endpoint {endpoint}" in str(caught.value)
    assert "s3://bucket/run" in str(caught.value) and "AWS_ENDPOINT_URL" in str(caught.value)


def test_missing_credentials_are_one_error_naming_the_fix(s3, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    storage.configure(storage._endpoint())  # a fresh client that reads the (now missing) credentials
    with pytest.raises(VitkitError, match=r"refused access to s3://bucket/run.*AWS_ACCESS_KEY_ID"):
        storage.check_writable("s3://bucket/run")


def test_missing_bucket_is_one_error_naming_it(s3):
    with pytest.raises(VitkitError, match=r"the bucket 'nobucket' of s3://nobucket/run does not exist"):
        storage.check_writable("s3://nobucket/run")


class _FlakyProxy(http.server.BaseHTTPRequestHandler):
    """Answers the first `failures` requests with 503 SlowDown (S3's throttling), then forwards to the server."""

    failures = 0
    seen = []
    target = ""

    def _handle(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).seen.append(self.command)
        if type(self).failures > 0:
            type(self).failures -= 1
            reply = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(reply)
            return
        request = urllib.request.Request(self.target + self.path, data=body or None, method=self.command,
                                         headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
        try:
            response = urllib.request.urlopen(request)
        except urllib.error.HTTPError as error:
            response = error
        data = response.read()
        self.send_response(response.status if hasattr(response, "status") else response.code)
        for key, value in response.headers.items():
            if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(key, value)
        self.send_header("Content-Length", response.headers["Content-Length"] if self.command == "HEAD" else
                         str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_endpoint(s3, s3_server):
    _FlakyProxy.target, _FlakyProxy.seen, _FlakyProxy.failures = s3_server, [], 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyProxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    s3.mkdir("bucket")
    put(s3, "bucket/obj", b"payload")
    storage.configure(f"http://127.0.0.1:{server.server_address[1]}")
    yield _FlakyProxy
    server.shutdown()
    server.server_close()


def fewer_attempts(monkeypatch):
    """One request per botocore call, three of vitkit's: the retries seen are vitkit's own, and quick."""
    monkeypatch.setattr(storage, "FIRST_BACKOFF_S", 0.01)
    monkeypatch.setattr(storage, "MAX_ATTEMPTS", 3)
    monkeypatch.setattr(storage, "BOTOCORE_ATTEMPTS", 1)
    storage.configure(storage._endpoint())


def test_throttling_is_retried_until_it_passes(flaky_endpoint, monkeypatch):
    fewer_attempts(monkeypatch)
    flaky_endpoint.failures = 2  # two 503 SlowDown answers: vitkit's third attempt gets through
    started = time.monotonic()
    with storage.open_read("s3://bucket/obj") as handle:
        assert handle.read() == b"payload"
    assert flaky_endpoint.failures == 0 and len(flaky_endpoint.seen) >= 3
    assert time.monotonic() - started < 10


def test_throttling_that_never_ends_is_one_error_after_bounded_attempts(flaky_endpoint, monkeypatch):
    fewer_attempts(monkeypatch)
    flaky_endpoint.failures = 10**6
    with pytest.raises(VitkitError, match=r"could not look up s3://bucket/obj \(.*Service Unavailable"):
        storage.exists("s3://bucket/obj")
    # three attempts, each of which asks at most twice (s3fs's info() tries a second HEAD): bounded, then one error
    assert 3 <= len(flaky_endpoint.seen) <= 6


# ---- one copy per machine ------------------------------------------------------------------------------------


def test_other_local_processes_wait_for_the_leaders_copy(tmp_path, monkeypatch):
    storage._settings["cache_dir"] = str(tmp_path / "cache")
    monkeypatch.setenv("LOCAL_RANK", "1")
    marker_dir = tmp_path / "cache" / "locks"

    def leader_finishes():
        time.sleep(0.3)
        marker_dir.mkdir(parents=True, exist_ok=True)
        (marker_dir / f"data-{storage._job_token()}").write_text("done")

    threading.Thread(target=leader_finishes).start()
    ran = []
    started = time.monotonic()
    storage.once_per_machine("data", lambda: ran.append(1), wait_s=10)
    assert ran == [] and time.monotonic() - started >= 0.3
    (marker_dir / f"bad-{storage._job_token()}").write_text("failed: the bucket is gone")
    with pytest.raises(VitkitError, match="the bucket is gone"):
        storage.once_per_machine("bad", lambda: None, wait_s=10)
    with pytest.raises(VitkitError, match="raise storage.sync_wait_s"):
        storage.once_per_machine("never", lambda: None, wait_s=0.2)
    storage._settings["cache_dir"] = ""


@pytest.mark.parametrize("env, leader", [
    ({}, True), ({"LOCAL_RANK": "0"}, True), ({"LOCAL_RANK": "3"}, False),
    ({"DEVICE_ID": "8", "RANK_SIZE": "16"}, True), ({"DEVICE_ID": "3", "RANK_SIZE": "16"}, False),
    ({"DEVICE_ID": "2", "RANK_SIZE": "2"}, True),
])
def test_machine_leader_follows_the_original_rule(monkeypatch, env, leader):
    for key in ("LOCAL_RANK", "DEVICE_ID", "RANK_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert storage.is_machine_leader() is leader


def test_image_folders_are_copied_in_and_shard_splits_stay_in_the_bucket(s3, tmp_path):
    from vitkit.config import load_config

    s3.mkdir("bucket")
    put(s3, "bucket/shards/index.json", b"{}")
    put(s3, "bucket/shards/shard-000000.tar", b"tar")
    put(s3, "bucket/folder/ant/1.png", b"png")
    cfg = load_config(None, ["--dataset_path=s3://bucket/shards", "--eval_path=s3://bucket/folder",
                             f"--storage.cache_dir={tmp_path / 'cache'}", f"--storage.endpoint_url={storage._endpoint()}"])
    storage.configure_from(cfg)
    storage.localize_inputs(cfg, ("data.train_path", "data.val_path"))
    assert cfg.data.train_path == "s3://bucket/shards"
    assert Path(cfg.data.val_path).is_relative_to(tmp_path / "cache")
    assert (Path(cfg.data.val_path) / "ant" / "1.png").read_bytes() == b"png"
