"""Fuzzing the readers of untrusted input: every input ends in a result or one VitkitError, never a crash.

Covered: the C JPEG region decoder and the image decoders around it, MindSpore `.ckpt`, Flax `.npz`, safetensors,
PyTorch `.pth`, Hugging Face model folders and the YAML config loader. Each property test mutates real seed inputs
(a photograph shipped with scikit-image, the MindSpore fixture, weight files this module writes byte by byte in each
format's layout, the repository's own configs) with byte flips, truncations, splices and inserted huge length
fields, or builds structured inputs (safetensors headers, .npy headers, Hugging Face configs, YAML documents).

The readers run in a child process (`_Worker`), one request at a time, with its heap capped: a segmentation fault
or abort of a C decoder, a hang, or an unbounded allocation fails the test with the input that caused it instead
of killing pytest, and hypothesis still shrinks that input. A few mutated files also go through the `vitkit`
command itself in a subprocess per reader, which must exit 0 or 2 with no traceback.

Profiles (docs/fuzzing.md): `ci`, the default, runs a fixed, derandomized set of examples in seconds; `long`
(VITKIT_FUZZ_PROFILE=long, or `make fuzz`) draws fresh random examples, VITKIT_FUZZ_EXAMPLES per test.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import random
import re
import select
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import one_line_error  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# ---- profiles ------------------------------------------------------------------------------------------------------

_COMMON = dict(
    deadline=None,  # the 2 shared cores make single examples slow now and then; the worker's timeout bounds them
    database=None,  # nothing written into the tree; a finding is reported with its minimal input and a blob
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                           HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)
settings.register_profile("ci", max_examples=int(os.environ.get("VITKIT_FUZZ_EXAMPLES", 25)), derandomize=True,
                          **_COMMON)
settings.register_profile("long", max_examples=int(os.environ.get("VITKIT_FUZZ_EXAMPLES", 2000)), derandomize=False,
                          **_COMMON)
PROFILE = os.environ.get("VITKIT_FUZZ_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"VITKIT_FUZZ_PROFILE is '{PROFILE}': use ci or long")
FUZZ = settings.get_profile(PROFILE)
# Mutated files per reader that go through the `vitkit` command (a subprocess each).
CLI_RUNS = 1 if PROFILE == "ci" else max(2, FUZZ.max_examples // 200)

# A request that takes longer than this is a hang: the worker is killed and the input reported.
REQUEST_TIMEOUT_S = 120
# The worker's heap: a reader that asks for more has sized an allocation from the file without bounding it.
WORKER_HEAP_BYTES = 3 << 30
# The decoders' pixel bound in the worker (data.max_image_pixels), lower than the default so that a mutated header
# claiming a huge image costs milliseconds; the bound itself is what is exercised.
FUZZ_MAX_PIXELS = 4_000_000
TRANSFORM_SIZE = 32

# ---- the worker: runs one reader per request in a child process ----------------------------------------------------


def _judge(call) -> dict:
    """{'outcome': 'result' | 'refused' | 'finding', 'detail': ...} for one call of a reader."""
    import traceback

    from vitkit.errors import VitkitError

    try:
        call()
    except VitkitError as exc:
        message = str(exc)
        if not message or "\n" in message or "\r" in message:
            return {"outcome": "finding", "detail": f"VitkitError that is not one line: {message!r}"}
        return {"outcome": "refused", "detail": message[:500]}
    except BaseException:  # noqa: BLE001 - anything else, MemoryError and failed checks included, is a finding
        return {"outcome": "finding", "detail": traceback.format_exc()[-6000:]}
    return {"outcome": "result", "detail": ""}


def _load_model(request: dict) -> None:
    from vitkit.model.loading import load_model

    load_model(request["path"])


def _load_config(request: dict) -> None:
    from vitkit.config import dump_yaml, load_config

    config = load_config(request.get("path"), request.get("overrides", ()))
    dump_yaml(config)  # what `vitkit config` prints: a loaded config must also be writable


def _decode_jpeg(request: dict) -> None:
    """jpeg_size, decode_region (on a box inside the size the header gives), decode_rgb and decode_transformed.

    Documented failures: jpeg_size and decode_region give None, the decoders raise UnreadableImage. Every result is
    checked against its contract (tuple of two ints, a bytearray of 3 x width x height, a uint8 (3, H, W) tensor)."""
    import torch

    from vitkit.data import folder
    from vitkit.data.folder import UnreadableImage, decode_rgb, decode_transformed, read_bytes
    from vitkit.data.transforms import train_transform

    data = read_bytes(request["path"])
    size = folder.jpeg_size(data) if folder.jpeg_size is not None else None
    if size is not None:
        assert isinstance(size, tuple) and len(size) == 2 and all(isinstance(side, int) for side in size), size
        width, height = size
        if folder.decode_region is not None and 0 < width * height <= FUZZ_MAX_PIXELS:
            fx, fy, fw, fh = request["box"]
            box_width, box_height = max(1, round(fw * width)), max(1, round(fh * height))
            left, top = round(fx * (width - box_width)), round(fy * (height - box_height))
            pixels = folder.decode_region(data, left, top, box_width, box_height)
            assert pixels is None or (type(pixels) is bytearray and len(pixels) == 3 * box_width * box_height), (
                type(pixels), None if pixels is None else len(pixels))
    try:
        image = decode_rgb(data, max_pixels=FUZZ_MAX_PIXELS)
    except UnreadableImage:
        pass
    else:
        assert image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3, (image.dtype, image.shape)
        assert image.shape[1] * image.shape[2] <= FUZZ_MAX_PIXELS, image.shape
    transform = train_transform(TRANSFORM_SIZE, augment="none")
    try:
        crop = decode_transformed(data, transform, max_pixels=FUZZ_MAX_PIXELS)
    except UnreadableImage:
        return
    assert isinstance(crop, torch.Tensor) and tuple(crop.shape) == (3, TRANSFORM_SIZE, TRANSFORM_SIZE), crop.shape


def _segfault(request: dict) -> None:
    import ctypes

    ctypes.string_at(0)  # reads address 0: what a C decoder's bad pointer does


_OPERATIONS = {"model": _load_model, "config": _load_config, "jpeg": _decode_jpeg, "segfault": _segfault}


def _worker_main() -> None:
    """Serves requests (one JSON line each on stdin) with one JSON line each on the original stdout."""
    import faulthandler
    import resource
    import warnings

    resource.setrlimit(resource.RLIMIT_DATA, (WORKER_HEAP_BYTES, WORKER_HEAP_BYTES))
    faulthandler.enable()  # a segmentation fault or abort prints the Python stack to stderr (the parent's log)
    warnings.simplefilter("ignore")
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever a library prints goes to the log, never into the replies
    for module in ("vitkit.config", "vitkit.data.folder", "vitkit.model.loading"):
        importlib.import_module(module)  # before the first request, so that no request is charged the imports

    replies.write(json.dumps({"outcome": "ready"}) + "\n")
    replies.flush()
    for line in sys.stdin:
        request = json.loads(line)
        reply = _judge(lambda: _OPERATIONS[request["op"]](request))
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_main()
    sys.exit(0)

    sys.exit(0)


class _Worker:
    """The child process the readers run in; restarted after a crash or a hang."""

    def __init__(self):
        self.proc = None
        self.log = None

    def _start(self) -> None:
        self.log = tempfile.TemporaryFile()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker"], cwd=REPO, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
        )
        ready = self._reply(REQUEST_TIMEOUT_S)
        if ready.get("outcome") != "ready":
            raise RuntimeError(f"the fuzz worker did not start: {ready}")

    def _log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def _reply(self, timeout: float) -> dict:
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not readable:
            self.proc.kill()
            self.proc.wait()
            detail = f"no answer within {timeout:.0f} s (a hang); worker log:\n{self._log_tail()}"
            self.proc = None
            return {"outcome": "finding", "detail": detail}
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            what = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            detail = f"the worker died ({what}); worker log:\n{self._log_tail()}"
            self.proc = None
            return {"outcome": "finding", "detail": detail}
        return json.loads(line)

    def ask(self, **request) -> dict:
        if self.proc is None:
            self._start()
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the reply read reports how it died
        return self._reply(REQUEST_TIMEOUT_S)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def worker(command_runs):  # the command runs start with the first property test and overlap with them
    child = _Worker()
    yield child
    child.close()


def assert_handled(reply: dict, what: str) -> None:
    hypothesis.event(f"outcome: {reply['outcome']}")  # the result/refused mix, in --hypothesis-show-statistics
    assert reply["outcome"] in ("result", "refused"), f"{what}: {reply['detail']}"


# ---- mutations -----------------------------------------------------------------------------------------------------

# Bytes that break parsers when they land on a length, a count or a marker: huge little- and big-endian integers,
# varints that overflow 64 bits, huge decimal numbers and markers of the formats read here.
HOSTILE_BYTES = (
    (2**64 - 1).to_bytes(8, "little"), (2**63 - 1).to_bytes(8, "little"), (2**63).to_bytes(8, "little"),
    (2**32 - 1).to_bytes(4, "little"), (2**31).to_bytes(4, "little"), (2**31 - 1).to_bytes(4, "big"),
    (2**32 + 8).to_bytes(8, "little"), b"\xff\xff", b"\x7f\xff", b"\x00\x00\x00\x00", b"\x00",
    b"\xff" * 9 + b"\x01", b"\x80" * 10 + b"\x01", b"\xff\xff\xff\xff\x0f",
    b"99999999999999999999999", b"-1", b"-9223372036854775809", b"1e999", b"NaN", b"[[[[[[[[", b"{{{{", b'"', b"\\u",
    b"\xff\xd8", b"\xff\xd9", b"\xff\xc0\x00\x11\x08\xff\xff\xff\xff\x03", b"\xff\xda", b"\xff\xc2", b"\xff\xdd\x00\x04\x00\x00",
    b"PK\x03\x04", b"PK\x01\x02", b"PK\x05\x06", b"\x93NUMPY", b"\x80\x04", b"Float32", b"str", b"Int64", b"Bool",
    b"*a", b"&a ", b"!!python/object/apply:os.system", b"<<: ", b"---\n", b"\t", b"\xef\xbb\xbf", b"\xc3\x28",
)


def apply_mutations(seed: bytes, operations) -> bytes:
    """The seed with each (kind, position, argument) applied in turn; positions wrap around the current length."""
    data = bytearray(seed)
    for kind, position, argument in operations:
        at = position % (len(data) + 1)
        if kind == "flip" and at < len(data):
            data[at] ^= argument
        elif kind == "overwrite":
            data[at : at + len(argument)] = argument
        elif kind == "insert":
            data[at:at] = argument
        elif kind == "delete":
            del data[at : at + argument]
        elif kind == "truncate":
            del data[at:]
        elif kind == "splice":  # a piece of the file copied in at another place: a duplicated entry, a shifted field
            source = argument % (len(data) + 1)
            data[at:at] = data[source : source + 1 + argument % 97]
    return bytes(data)


def landmarks_of(data: bytes, pattern: bytes, limit: int = 400) -> list[int]:
    """Where `pattern` matches: the structural bytes (markers, headers, tags) that mutations should hit often."""
    found = [match.start() for match in re.finditer(pattern, data, flags=re.DOTALL)] or [0]
    return found[:: max(1, len(found) // limit)]


def operations(landmarks: list[int]):
    position = st.one_of(
        st.integers(0, 64),
        st.builds(lambda mark, shift: max(0, mark + shift), st.sampled_from(landmarks), st.integers(-24, 24)),
        st.integers(0, 1 << 24),
    )
    payload = st.one_of(st.sampled_from(HOSTILE_BYTES), st.binary(min_size=1, max_size=16))
    operation = st.one_of(
        st.tuples(st.just("flip"), position, st.integers(1, 255)),
        st.tuples(st.just("overwrite"), position, payload),
        st.tuples(st.just("insert"), position, payload),
        st.tuples(st.just("delete"), position, st.integers(1, 64)),
        st.tuples(st.just("truncate"), position, st.just(None)),
        st.tuples(st.just("splice"), position, st.integers(0, 1 << 24)),
    )
    return st.lists(operation, min_size=1, max_size=4)


def random_operations(rng: random.Random, landmarks: list[int]) -> list[tuple]:
    """A few operations drawn with `rng`: the same kinds as `operations`, for the subprocess runs."""
    ops = []
    for _ in range(rng.randint(1, 3)):
        position = max(0, rng.choice(landmarks) + rng.randint(-24, 24))
        kind = rng.choice(("flip", "overwrite", "insert", "delete", "truncate", "splice"))
        argument = {"flip": rng.randint(1, 255), "overwrite": rng.choice(HOSTILE_BYTES),
                    "insert": rng.choice(HOSTILE_BYTES), "delete": rng.randint(1, 64), "truncate": None,
                    "splice": rng.randint(0, 1 << 24)}[kind]
        ops.append((kind, position, argument))
    return ops


# ---- seeds: real inputs in each format -----------------------------------------------------------------------------

WIDTH, HEADS, PATCH, IMAGE, CLASSES, MLP = 8, 2, 4, 8, 3, 16
TOKENS = (IMAGE // PATCH) ** 2 + 1
_rng = np.random.default_rng(0)


def _weights(*shape) -> np.ndarray:
    return (_rng.standard_normal(shape) * 0.1).astype(np.float32)


def timm_state() -> dict[str, np.ndarray]:
    """A one-block ViT in timm's (vitkit's) names and shapes."""
    block = "blocks.0."
    return {
        "cls_token": _weights(1, 1, WIDTH), "pos_embed": _weights(1, TOKENS, WIDTH),
        "patch_embed.proj.weight": _weights(WIDTH, 3, PATCH, PATCH), "patch_embed.proj.bias": _weights(WIDTH),
        block + "norm1.weight": _weights(WIDTH), block + "norm1.bias": _weights(WIDTH),
        block + "attn.qkv.weight": _weights(3 * WIDTH, WIDTH), block + "attn.qkv.bias": _weights(3 * WIDTH),
        block + "attn.proj.weight": _weights(WIDTH, WIDTH), block + "attn.proj.bias": _weights(WIDTH),
        block + "norm2.weight": _weights(WIDTH), block + "norm2.bias": _weights(WIDTH),
        block + "mlp.fc1.weight": _weights(MLP, WIDTH), block + "mlp.fc1.bias": _weights(MLP),
        block + "mlp.fc2.weight": _weights(WIDTH, MLP), block + "mlp.fc2.bias": _weights(WIDTH),
        "norm.weight": _weights(WIDTH), "norm.bias": _weights(WIDTH),
        "head.weight": _weights(CLASSES, WIDTH), "head.bias": _weights(CLASSES),
    }


def huggingface_state() -> dict[str, np.ndarray]:
    """The same ViT in Hugging Face's on-disk names (transformers 4's ViTForImageClassification)."""
    layer = "vit.encoder.layer.0."
    state = {
        "vit.embeddings.cls_token": _weights(1, 1, WIDTH), "vit.embeddings.position_embeddings": _weights(1, TOKENS, WIDTH),
        "vit.embeddings.patch_embeddings.projection.weight": _weights(WIDTH, 3, PATCH, PATCH),
        "vit.embeddings.patch_embeddings.projection.bias": _weights(WIDTH),
        "vit.layernorm.weight": _weights(WIDTH), "vit.layernorm.bias": _weights(WIDTH),
        "classifier.weight": _weights(CLASSES, WIDTH), "classifier.bias": _weights(CLASSES),
    }
    for name, rows, cols in (("layernorm_before", WIDTH, 0), ("layernorm_after", WIDTH, 0),
                             ("attention.attention.query", WIDTH, WIDTH), ("attention.attention.key", WIDTH, WIDTH),
                             ("attention.attention.value", WIDTH, WIDTH), ("attention.output.dense", WIDTH, WIDTH),
                             ("intermediate.dense", MLP, WIDTH), ("output.dense", WIDTH, MLP)):
        state[layer + name + ".weight"] = _weights(rows, cols) if cols else _weights(rows)
        state[layer + name + ".bias"] = _weights(rows)
    return state


HF_CONFIG = {
    "model_type": "vit", "architectures": ["ViTForImageClassification"], "hidden_size": WIDTH, "num_hidden_layers": 1,
    "num_attention_heads": HEADS, "intermediate_size": MLP, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
    "image_size": IMAGE, "patch_size": PATCH, "num_channels": 3, "qkv_bias": True,
    "id2label": {"0": "ant", "1": "bee", "2": "cat"}, "label2id": {"ant": 0, "bee": 1, "cat": 2},
}


def flax_arrays() -> dict[str, np.ndarray]:
    """The same ViT in the ViT paper's Flax layout (kernels (in, out), attention split per head)."""
    head_dim = WIDTH // HEADS
    block = "Transformer/encoderblock_0/"
    arrays = {
        "embedding/kernel": _weights(PATCH, PATCH, 3, WIDTH), "embedding/bias": _weights(WIDTH),
        "cls": _weights(1, 1, WIDTH), "Transformer/posembed_input/pos_embedding": _weights(1, TOKENS, WIDTH),
        "Transformer/encoder_norm/scale": _weights(WIDTH), "Transformer/encoder_norm/bias": _weights(WIDTH),
        "head/kernel": _weights(WIDTH, CLASSES), "head/bias": _weights(CLASSES),
    }
    for norm in ("LayerNorm_0", "LayerNorm_2"):
        arrays[f"{block}{norm}/scale"], arrays[f"{block}{norm}/bias"] = _weights(WIDTH), _weights(WIDTH)
    for part in ("query", "key", "value"):
        arrays[f"{block}MultiHeadDotProductAttention_1/{part}/kernel"] = _weights(WIDTH, HEADS, head_dim)
        arrays[f"{block}MultiHeadDotProductAttention_1/{part}/bias"] = _weights(HEADS, head_dim)
    arrays[f"{block}MultiHeadDotProductAttention_1/out/kernel"] = _weights(HEADS, head_dim, WIDTH)
    arrays[f"{block}MultiHeadDotProductAttention_1/out/bias"] = _weights(WIDTH)
    arrays[f"{block}MlpBlock_3/Dense_0/kernel"], arrays[f"{block}MlpBlock_3/Dense_0/bias"] = _weights(WIDTH, MLP), _weights(MLP)
    arrays[f"{block}MlpBlock_3/Dense_1/kernel"], arrays[f"{block}MlpBlock_3/Dense_1/bias"] = _weights(MLP, WIDTH), _weights(WIDTH)
    return arrays


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors format by hand: an 8-byte little-endian header length, the JSON header, the raw data."""
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        raw = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + b"".join(blobs)


def npy_bytes(array: np.ndarray, header: str | None = None) -> bytes:
    """A version 1.0 .npy file: magic, 2-byte header length, the header dict padded to 64 bytes, the raw data."""
    if header is None:
        header = f"{{'descr': '{array.dtype.str}', 'fortran_order': False, 'shape': {tuple(array.shape)}, }}"
    text = header.encode()  # latin-1 in real files; drawn text may hold any character
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + array.tobytes()


def npz_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, raw in members.items():
            archive.writestr(name + ".npy", raw)
    return buffer.getvalue()


def torch_pickle_bytes() -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save({"model": {name: torch.from_numpy(array) for name, array in timm_state().items()}}, buffer)
    return buffer.getvalue()


VITKIT_ARCH = {"patch_size": PATCH, "embed_dim": WIDTH, "depth": 1, "num_heads": HEADS, "mlp_dim": MLP,
               "image_size": IMAGE, "num_classes": CLASSES}
_SKIMAGE = importlib.util.find_spec("skimage")  # its bundled photographs; found without importing it
SAMPLE_JPEG = Path(_SKIMAGE.origin).parent / "data" / "rocket.jpg" if _SKIMAGE else None

# (seed bytes, file suffix, the bytes mutations aim at)
_ZIP_MARKS = rb"PK\x01\x02|PK\x03\x04|PK\x05\x06|\x93NUMPY|\{'descr'|'shape'|data\.pkl|\x80\x02"


def _model_seeds() -> dict[str, tuple[bytes, str, list[int]]]:
    ckpt = (FIXTURES / "mindspore" / "ms_vit_tiny_cls.ckpt").read_bytes()
    flax = flax_arrays()
    seeds = {
        "mindspore": (ckpt, ".ckpt", rb"Float\d\d|body\.|stem\.|head\.|norm\.|cls\b|pos_embedding"),
        "safetensors-vitkit": (safetensors_bytes(timm_state(), {"format": "pt", "vitkit.arch": json.dumps(VITKIT_ARCH),
                                                                "vitkit.class_names": '["ant", "bee", "cat"]'}),
                               ".safetensors", rb'[\[\]{}:,"]|\d+'),
        "safetensors-timm": (safetensors_bytes(timm_state()), ".safetensors", rb'[\[\]{}:,"]|\d+'),
        "npz": (npz_bytes({name: npy_bytes(array) for name, array in flax.items()}), ".npz", _ZIP_MARKS),
        "npz-deflated": (npz_bytes({name: npy_bytes(array) for name, array in flax.items()}, zipfile.ZIP_DEFLATED),
                         ".npz", _ZIP_MARKS),
        "pth": (torch_pickle_bytes(), ".pth", _ZIP_MARKS),
    }
    return {name: (data, suffix, landmarks_of(data, pattern)) for name, (data, suffix, pattern) in seeds.items()}


MODEL_SEEDS = _model_seeds()
HF_FILES = {
    "config.json": json.dumps(HF_CONFIG, indent=2).encode(),
    "model.safetensors": safetensors_bytes(huggingface_state(), {"format": "pt"}),
}
CONFIG_FILES = sorted((REPO / "configs").glob("*.yml"))


def _jpeg_seeds() -> dict[str, bytes]:
    """The photograph as shipped, and the same photograph made small (fast to decode, denser in markers)."""
    if SAMPLE_JPEG is None:
        return {}
    from PIL import Image

    shipped = SAMPLE_JPEG.read_bytes()
    small = Image.open(io.BytesIO(shipped)).convert("RGB").resize((48, 32))
    variants = {"shipped": shipped}
    for name, options in (("small 4:2:0", dict(subsampling=2)), ("small progressive", dict(progressive=True)),
                          ("small grey", dict())):
        buffer = io.BytesIO()
        (small.convert("L") if "grey" in name else small).save(buffer, "JPEG", quality=85, **options)
        variants[name] = buffer.getvalue()
    return variants


JPEG_SEEDS = _jpeg_seeds()
_JPEG_MARKS = rb"\xff[\xc0-\xfe]"
needs_jpeg = pytest.mark.skipif(not JPEG_SEEDS, reason="scikit-image (the sample photograph) is not installed")


def write_bytes(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---- the seeds themselves are accepted: mutations start from valid inputs ------------------------------------------


def test_every_seed_is_read(worker, tmp_path):
    for name, (data, suffix, _) in MODEL_SEEDS.items():
        reply = worker.ask(op="model", path=str(write_bytes(tmp_path / f"{name}{suffix}", data)))
        assert reply["outcome"] == "result", f"seed {name}: {reply['detail']}"
    folder = tmp_path / "hf"
    for name, data in HF_FILES.items():
        write_bytes(folder / name, data)
    assert worker.ask(op="model", path=str(folder))["outcome"] == "result"
    for config in CONFIG_FILES:
        reply = worker.ask(op="config", path=str(config))
        assert reply["outcome"] == "result", f"{config.name}: {reply['detail']}"
    for name, data in JPEG_SEEDS.items():
        reply = worker.ask(op="jpeg", path=str(write_bytes(tmp_path / "seed.jpg", data)), box=[0.5, 0.5, 0.5, 0.5])
        assert reply["outcome"] == "result", f"JPEG {name}: {reply['detail']}"


# ---- mutated real inputs -------------------------------------------------------------------------------------------


def _fuzz_model_seed(name: str):
    data, suffix, landmarks = MODEL_SEEDS[name]

    @FUZZ
    @given(ops=operations(landmarks))
    def check(worker, tmp_path, ops):
        path = write_bytes(tmp_path / f"mutated{suffix}", apply_mutations(data, ops))
        assert_handled(worker.ask(op="model", path=str(path)), f"{name} mutated by {ops}")

    return check


test_mutated_mindspore_checkpoint = _fuzz_model_seed("mindspore")
test_mutated_safetensors_with_vitkit_metadata = _fuzz_model_seed("safetensors-vitkit")
test_mutated_safetensors_in_timm_names = _fuzz_model_seed("safetensors-timm")
test_mutated_npz = _fuzz_model_seed("npz")
test_mutated_deflated_npz = _fuzz_model_seed("npz-deflated")
test_mutated_pytorch_checkpoint = _fuzz_model_seed("pth")


@FUZZ
@given(target=st.sampled_from(sorted(HF_FILES) + ["model.safetensors.index.json"]), data=st.data())
def test_mutated_huggingface_folder(worker, tmp_path, target, data):
    files = dict(HF_FILES)
    if target.endswith(".index.json"):
        # The sharded form: the weights under another name, found through the index.
        files["shard-1.safetensors"] = files.pop("model.safetensors")
        names = [name for name in huggingface_state()]
        files[target] = json.dumps({"metadata": {}, "weight_map": {name: "shard-1.safetensors" for name in names}}).encode()
    seed = files[target]
    ops = data.draw(operations(landmarks_of(seed, rb'[\[\]{}:,"]|\d+')), label="operations")
    files[target] = apply_mutations(seed, ops)
    folder = tmp_path / "hf"
    for name, raw in files.items():
        write_bytes(folder / name, raw)
    assert_handled(worker.ask(op="model", path=str(folder)), f"{target} mutated by {ops}")


@FUZZ
@given(config=st.sampled_from(CONFIG_FILES), data=st.data())
def test_mutated_config_file(worker, tmp_path, config, data):
    seed = config.read_bytes()
    ops = data.draw(operations(landmarks_of(seed, rb"[:\[\]{},\n\"'#-]")), label="operations")
    path = write_bytes(tmp_path / "mutated.yml", apply_mutations(seed, ops))
    assert_handled(worker.ask(op="config", path=str(path)), f"{config.name} mutated by {ops}")


@needs_jpeg
@FUZZ
@given(seed=st.sampled_from(sorted(JPEG_SEEDS)), data=st.data(),
       box=st.tuples(*[st.floats(0, 1, allow_nan=False)] * 4))
def test_mutated_jpeg(worker, tmp_path, seed, data, box):
    original = JPEG_SEEDS[seed]
    ops = data.draw(operations(landmarks_of(original, _JPEG_MARKS)), label="operations")
    path = write_bytes(tmp_path / "mutated.jpg", apply_mutations(original, ops))
    assert_handled(worker.ask(op="jpeg", path=str(path), box=list(box)), f"JPEG '{seed}' mutated by {ops}")


# ---- structured inputs ---------------------------------------------------------------------------------------------

TIMM_NAMES = list(timm_state())
HUGE_INTS = st.one_of(st.integers(-3, 70), st.sampled_from([2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**64]),
                      st.integers(-(2**70), 2**70))
JSON_SCALARS = st.one_of(st.none(), st.booleans(), HUGE_INTS, st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=12))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
ARCH_FIELDS = ["patch_size", "embed_dim", "depth", "num_heads", "mlp_dim", "image_size", "num_classes", "in_chans",
               "representation_size", "class_token", "fc_norm", "qkv_bias", "pool", "pos_embed", "ln_eps", "gelu",
               "init", "drop_rate"]


@st.composite
def safetensors_files(draw) -> bytes:
    """A header of entries with drawn dtypes, shapes and offsets over a drawn data buffer, metadata included."""
    names = draw(st.lists(st.one_of(st.sampled_from(TIMM_NAMES), st.text(max_size=20)), min_size=0, max_size=8,
                          unique=True))
    buffer_size = draw(st.integers(0, 4096))
    header: dict = {}
    for name in names:
        if name == "__metadata__":
            continue
        start = draw(st.one_of(st.integers(0, buffer_size), HUGE_INTS))
        end = draw(st.one_of(st.integers(0, buffer_size), HUGE_INTS))
        entry = {
            "dtype": draw(st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3", "C64",
                                           "f32", "", "X"])),
            "shape": draw(st.lists(HUGE_INTS, max_size=5)),
            "data_offsets": [start, end],
        }
        if draw(st.booleans()):
            entry = draw(st.fixed_dictionaries({}, optional={key: st.just(value) for key, value in entry.items()}))
        header[name] = entry
    if draw(st.booleans()):
        arch = draw(st.dictionaries(st.sampled_from(ARCH_FIELDS), JSON_VALUES, max_size=6))
        metadata = {"format": "pt",
                    "vitkit.arch": draw(st.one_of(st.just(json.dumps(arch)), st.text(max_size=20))),
                    "vitkit.class_names": draw(st.one_of(st.just(json.dumps(draw(st.lists(JSON_SCALARS, max_size=4)))),
                                                         st.text(max_size=10)))}
        header["__metadata__"] = draw(st.one_of(st.just(metadata), JSON_VALUES))
    text = json.dumps(header).encode()
    length = draw(st.one_of(st.just(len(text)), HUGE_INTS.filter(lambda n: 0 <= n < 2**64)))
    return length.to_bytes(8, "little") + text + draw(st.binary(min_size=buffer_size, max_size=buffer_size))


@FUZZ
@given(data=safetensors_files())
def test_structured_safetensors(worker, tmp_path, data):
    path = write_bytes(tmp_path / "drawn.safetensors", data)
    assert_handled(worker.ask(op="model", path=str(path)), f"safetensors file {data[:600]!r}")


FLAX_ARRAYS = flax_arrays()
NPY_DESCRS = ["<f4", "<f2", "<f8", "|V2", "<V4", "<i8", "|u1", "|b1", "|O", ">f4", "<c8", "<U4", "|S3", "<M8[s]",
              "[('a', '<f4')]", "'<f4'", "", "<f4 ", "float32"]


@st.composite
def npy_headers(draw) -> str:
    """The dict text of a .npy header, with drawn dtype, order and shape, or drawn text that only looks like one."""
    descr = draw(st.sampled_from(NPY_DESCRS))
    shape = draw(st.lists(HUGE_INTS, max_size=5))
    order = draw(st.sampled_from(["False", "True", "0", "None", "'x'"]))
    shown_descr = descr if descr.startswith("[") or descr.startswith("'") else repr(descr)
    shown_shape = draw(st.sampled_from([repr(tuple(shape)), repr(list(shape)), "()", "(-1,)", "None", "(1, 2"]))
    header = f"{{'descr': {shown_descr}, 'fortran_order': {order}, 'shape': {shown_shape}, }}"
    return draw(st.one_of(st.just(header), st.text(max_size=60).map(lambda text: "{" + text + "}")))


@FUZZ
@given(replaced=st.lists(st.sampled_from(sorted(FLAX_ARRAYS)), min_size=1, max_size=3, unique=True),
       headers=st.lists(npy_headers(), min_size=3, max_size=3), payload=st.binary(max_size=512),
       compression=st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
def test_structured_npz_headers(worker, tmp_path, replaced, headers, payload, compression):
    members = {name: npy_bytes(array) for name, array in FLAX_ARRAYS.items()}
    for name, header in zip(replaced, headers):
        members[name] = npy_bytes(np.frombuffer(payload, dtype=np.uint8), header)
    path = write_bytes(tmp_path / "drawn.npz", npz_bytes(members, compression))
    assert_handled(worker.ask(op="model", path=str(path)), f"npz with {dict(zip(replaced, headers))}")


HF_KEYS = ["model_type", "hidden_act", "layer_norm_eps", "num_attention_heads", "id2label", "label2id", "image_size",
           "patch_size", "pooler_act", "hidden_size", "num_hidden_layers", "qkv_bias", "num_channels"]


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(HF_KEYS), JSON_VALUES, min_size=1, max_size=5),
       removed=st.lists(st.sampled_from(HF_KEYS), max_size=3),
       id2label=st.one_of(st.none(), st.dictionaries(st.one_of(st.text(max_size=6), st.integers().map(str)),
                                                     JSON_SCALARS, max_size=5)))
def test_structured_huggingface_config(worker, tmp_path, changes, removed, id2label):
    config = {key: value for key, value in HF_CONFIG.items() if key not in removed}
    config.update(changes)
    if id2label is not None:
        config["id2label"] = id2label
    folder = tmp_path / "hf"
    write_bytes(folder / "config.json", json.dumps(config).encode())
    write_bytes(folder / "model.safetensors", HF_FILES["model.safetensors"])
    assert_handled(worker.ask(op="model", path=str(folder)), f"config.json {config}")


def _option_keys() -> list[str]:
    from vitkit.config import FLAT_KEYS, GROUPS, OPTIONS

    return sorted({*OPTIONS, *FLAT_KEYS, *GROUPS})


OPTION_KEYS = _option_keys()
YAML_SCALARS = st.one_of(st.none(), st.booleans(), HUGE_INTS, st.floats(), st.text(max_size=16),
                         st.sampled_from(["ViT-B/32", "bicubic", "AdamW", "autoaugment", "1e-3", "0x10", "~", ".inf",
                                          "", "yes", "no", "on", "2026-12-04", "*.onnx", "a: b", "[x"]))
YAML_VALUES = st.recursive(YAML_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.sampled_from(OPTION_KEYS), st.text(max_size=8)), inner,
                                                  max_size=4)), max_leaves=10)
YAML_DOCUMENTS = st.dictionaries(st.one_of(st.sampled_from(OPTION_KEYS), st.text(max_size=10), st.integers()),
                                 YAML_VALUES, max_size=6)


@FUZZ
@given(document=YAML_DOCUMENTS, raw=st.one_of(st.none(), st.text(max_size=200)))
def test_structured_config_documents(worker, tmp_path, document, raw):
    text = yaml.safe_dump(document, allow_unicode=True) if raw is None else raw
    path = write_bytes(tmp_path / "drawn.yml", text.encode("utf-8", errors="surrogatepass"))
    assert_handled(worker.ask(op="config", path=str(path)), f"config file {text[:1000]!r}")


@FUZZ
@given(overrides=st.lists(st.one_of(
    st.builds(lambda key, value: f"--{key}={value}", st.sampled_from(OPTION_KEYS), st.text(max_size=20)),
    st.builds(lambda key, value: f"--{key}={yaml.safe_dump(value).strip()}", st.sampled_from(OPTION_KEYS), YAML_SCALARS),
    st.sampled_from(OPTION_KEYS).map(lambda key: f"--{key}"), st.text(max_size=20)), max_size=6))
def test_structured_config_overrides(worker, overrides):
    assert_handled(worker.ask(op="config", overrides=overrides), f"overrides {overrides}")


def test_a_crash_in_the_worker_is_a_finding_and_the_next_request_is_served(worker, tmp_path):
    # What makes the harness catch a crashing C decoder: the worker dies, the input is reported, and a fresh worker
    # serves the next request (hypothesis replays many while it shrinks the input).
    reply = worker.ask(op="segfault")
    assert reply["outcome"] == "finding" and "signal 11" in reply["detail"], reply
    assert "Fatal Python error: Segmentation fault" in reply["detail"]  # faulthandler's stack of the crash
    config = write_bytes(tmp_path / "empty.yml", b"")
    assert worker.ask(op="config", path=str(config))["outcome"] == "result"


# ---- regressions: the minimal inputs of findings, as plain tests ---------------------------------------------------


def test_a_deflated_npz_whose_entry_starts_in_the_wrong_place_is_refused(tmp_path):
    # Found by test_mutated_deflated_npz: a flipped bit in a local header's extra-field length (offset 28) moves the
    # start of the compressed data, and zlib raised zlib.error, which is no OSError.
    from vitkit.model.loading import read_weights

    data = bytearray(npz_bytes({"embedding/kernel": npy_bytes(np.zeros((4, 4, 3, 8), np.float32))}, zipfile.ZIP_DEFLATED))
    data[28] ^= 1
    path = write_bytes(tmp_path / "damaged.npz", bytes(data))
    assert "damaged.npz" in one_line_error(lambda: read_weights(path))


def test_a_pytorch_checkpoint_whose_pickle_pops_an_empty_stack_is_refused(tmp_path):
    # Found by test_mutated_pytorch_checkpoint: torch's weights-only unpickler raised IndexError on a damaged
    # data.pkl (here its smallest form: REDUCE with nothing on the stack).
    import torch

    from vitkit.model.loading import read_weights

    saved = io.BytesIO()
    torch.save({"weight": torch.zeros(2)}, saved)
    damaged = io.BytesIO()
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(damaged, "w") as target:
        for info in source.infolist():
            target.writestr(info, b"\x80\x02R." if info.filename.endswith("data.pkl") else source.read(info))
    path = write_bytes(tmp_path / "damaged.pth", damaged.getvalue())
    assert "damaged.pth" in one_line_error(lambda: read_weights(path))


@pytest.mark.parametrize("image_size", [[[]], [{}], [1.5, 1.5]])
def test_a_huggingface_config_with_a_size_that_is_no_number_is_refused(tmp_path, image_size):
    # Found by test_structured_huggingface_config: image_size [[]] made the square check hash a list (TypeError).
    from vitkit.model.loading import read_weights

    folder = tmp_path / "hf"
    write_bytes(folder / "config.json", json.dumps({**HF_CONFIG, "image_size": image_size}).encode())
    write_bytes(folder / "model.safetensors", HF_FILES["model.safetensors"])
    assert "image_size" in one_line_error(lambda: read_weights(folder))


def test_a_zip_entry_name_that_is_not_utf8_is_refused(tmp_path):
    # Found by test_mutated_pytorch_checkpoint: a flipped bit in an entry's name, whose header flags it as UTF-8,
    # made zipfile raise UnicodeDecodeError while vitkit sniffed the format.
    from vitkit.model.loading import read_weights

    data = npz_bytes({"\u00e1": npy_bytes(np.zeros(2, np.float32))}).replace("\u00e1".encode(), b"\xe1A")
    path = write_bytes(tmp_path / "damaged.npz", data)
    assert "damaged.npz" in one_line_error(lambda: read_weights(path))


def test_an_npz_attention_kernel_without_head_axes_is_refused(tmp_path):
    # Found by test_structured_npz_headers: a 0-d query kernel made the head count lookup raise IndexError.
    from vitkit.model.loading import read_weights

    arrays = flax_arrays()
    arrays["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"] = np.zeros((), np.float32)
    path = write_bytes(tmp_path / "damaged.npz", npz_bytes({name: npy_bytes(array) for name, array in arrays.items()}))
    assert "damaged.npz" in one_line_error(lambda: read_weights(path))


@pytest.mark.parametrize("field", ["extract version", "compression method"])
def test_a_zip_that_needs_a_newer_unzip_is_refused(tmp_path, field):
    # Found by test_mutated_pytorch_checkpoint: zipfile raises NotImplementedError for an archive whose entry needs
    # a later zip version (6.4 here) or a compression method it lacks (99, AES).
    from vitkit.model.loading import read_weights

    data = bytearray(npz_bytes({name: npy_bytes(array) for name, array in flax_arrays().items()}))
    central = data.index(b"PK\x01\x02")
    if field == "extract version":
        data[central + 6] = 64
    else:
        data[central + 10], data[8] = 99, 99  # the first entry's method, in its directory and its local header
    path = write_bytes(tmp_path / "newer.npz", bytes(data))
    assert "newer.npz" in one_line_error(lambda: read_weights(path))


def test_an_npy_header_with_unbalanced_brackets_is_refused(tmp_path):
    # Found by the long run of test_structured_npz_headers: numpy's header reader let tokenize.TokenError out.
    from vitkit.model.loading import read_weights

    members = {name: npy_bytes(array) for name, array in flax_arrays().items()}
    members["Transformer/encoder_norm/bias"] = npy_bytes(np.zeros(0, np.uint8),
                                                         "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, }")
    path = write_bytes(tmp_path / "damaged.npz", npz_bytes(members))
    assert "damaged.npz" in one_line_error(lambda: read_weights(path))


def test_a_huggingface_config_with_a_null_layer_norm_eps_is_refused(tmp_path):
    # Found by the long run of test_structured_huggingface_config: "layer_norm_eps": null reached float(None).
    from vitkit.model.loading import load_model

    folder = tmp_path / "hf"
    write_bytes(folder / "config.json", json.dumps({**HF_CONFIG, "layer_norm_eps": None}).encode())
    write_bytes(folder / "model.safetensors", HF_FILES["model.safetensors"])
    assert "layer_norm_eps" in one_line_error(lambda: load_model(folder))


# ---- through the command line, in a subprocess: a crash or a traceback is caught here too --------------------------


def _cli_cases(root: Path) -> dict[str, list[list[str]]]:
    """argv lists per reader: `vitkit predict` on mutated model files and images, `vitkit config` on mutated YAML."""
    image = write_bytes(root / "photo.jpg", JPEG_SEEDS["shipped"]) if JPEG_SEEDS else None
    good_model = write_bytes(root / "good.safetensors", MODEL_SEEDS["safetensors-vitkit"][0])
    cases: dict[str, list[list[str]]] = {}
    for run in range(CLI_RUNS):
        rng = random.Random(run)
        for name in ("mindspore", "npz", "safetensors-vitkit"):
            data, suffix, landmarks = MODEL_SEEDS[name]
            path = write_bytes(root / f"{name}-{run}{suffix}", apply_mutations(data, random_operations(rng, landmarks)))
            if image is not None:
                cases.setdefault(name, []).append(["predict", "--model", str(path), str(image)])
        folder = root / f"hf-{run}"
        target = rng.choice(sorted(HF_FILES))
        for file, raw in HF_FILES.items():
            if file == target:
                raw = apply_mutations(raw, random_operations(rng, landmarks_of(raw, rb'[\[\]{}:,"]')))
            write_bytes(folder / file, raw)
        if image is not None:
            cases.setdefault("huggingface", []).append(["predict", "--model", str(folder), str(image)])
        config = CONFIG_FILES[run % len(CONFIG_FILES)].read_bytes()
        mutated = apply_mutations(config, random_operations(rng, landmarks_of(config, rb"[:\n]")))
        path = write_bytes(root / f"config-{run}.yml", mutated)
        cases.setdefault("config", []).append(["config", "--config_path", str(path)])
        if image is not None:
            shipped = JPEG_SEEDS["shipped"]
            path = write_bytes(root / f"photo-{run}.jpg",
                               apply_mutations(shipped, random_operations(rng, landmarks_of(shipped, _JPEG_MARKS))))
            cases.setdefault("jpeg", []).append(["predict", "--model", str(good_model), str(path)])
    return cases


class _CommandRuns:
    """`vitkit ARGV` subprocesses, at most `limit` at a time, started when the module starts: each spends seconds
    importing torch, which then overlaps with the property tests in the worker."""

    def __init__(self, cases: list[tuple[str, list[str]]], limit: int):
        self.pending, self.running, self.limit = list(cases), [], limit
        self.results: dict[str, list] = {}
        self._fill()

    def _fill(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        while self.pending and len(self.running) < self.limit:
            reader, argv = self.pending.pop(0)
            log = tempfile.TemporaryFile()
            proc = subprocess.Popen([sys.executable, "-m", "vitkit", *argv], cwd=REPO, env=env,
                                    stdout=subprocess.DEVNULL, stderr=log)
            self.running.append((reader, argv, proc, log))

    def finish(self) -> dict[str, list]:
        """{reader: [(argv, exit status, stderr)]} once every run has ended."""
        while self.running:
            reader, argv, proc, log = self.running.pop(0)
            try:
                proc.wait(timeout=REQUEST_TIMEOUT_S * 2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.seek(0)
            self.results.setdefault(reader, []).append((argv, proc.returncode, log.read().decode(errors="replace")))
            log.close()
            self._fill()
        return self.results


@pytest.fixture(scope="module")
def command_runs(tmp_path_factory):
    cases = [(reader, argv) for reader, runs in _cli_cases(tmp_path_factory.mktemp("cli")).items() for argv in runs]
    runs = _CommandRuns(cases, limit=len(cases) if PROFILE == "ci" else 4)
    yield runs
    runs.finish()  # no process outlives the module, whichever tests ran


@pytest.fixture(scope="module")
def cli_results(command_runs):
    return command_runs.finish()


@pytest.mark.parametrize("reader", ["mindspore", "npz", "safetensors-vitkit", "huggingface", "config", "jpeg"])
def test_the_command_ends_in_a_result_or_one_error_line(cli_results, reader):
    if reader not in cli_results:
        pytest.skip("scikit-image (the sample photograph) is not installed")
    for argv, code, err in cli_results[reader]:
        assert code in (0, 2) and "Traceback" not in err, f"vitkit {' '.join(argv)} exited {code}:\n{err[-3000:]}"
        errors = [line for line in err.splitlines() if line.startswith("vitkit: error: ")]
        assert len(errors) == (code == 2), f"vitkit {' '.join(argv)} exited {code}:\n{err[-3000:]}"

