"""Hostile model files and metadata: nothing in a file runs code, and nothing a file claims allocates unbounded memory.

Every probe ends in one `vitkit: error:` line (exit status 2), or, where a part of a file is provably never read,
in the untouched result. Probes that would allocate without bound before their fix run the CLI in a child process
whose heap is capped (RLIMIT_DATA), so that a regression fails the test instead of the machine.
"""
from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import vitkit
from vitkit.cli import main
from vitkit.errors import VitkitError

REPO = Path(__file__).resolve().parents[1]
TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_dim=64, image_size=32, num_classes=3)


class _Touch:
    """Unpickling this creates `path` (open(path, 'w')): the marker that code from a file ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("vitkit: error: "), err[-2000:]
    return lines[0]


def _bounded_cli(*argv, heap_gib: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """`vitkit ARGV` in a child whose heap is capped, so a memory bomb fails instead of exhausting the machine."""
    code = (
        "import resource, sys\n"
        f"limit = {heap_gib} << 30\n"
        "resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))\n"
        "from vitkit.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )


def _assert_one_line_refusal(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("vitkit: error: "), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _rewrite_zip(src: Path, dst: Path, replace=None, add=None) -> Path:
    """A copy of a zip archive with some entries' bytes replaced (bytes, or a function of the old bytes) or added."""
    replace, add = replace or {}, add or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename in replace:
                new = replace[info.filename]
                data = new(data) if callable(new) else new
            zout.writestr(info.filename, data)
        for name, data in add.items():
            zout.writestr(name, data)
    return dst


# --- torch.export .pt2 archives ---------------------------------------------------------------------------------------

SAMPLE_INPUTS = "archive/data/sample_inputs/model.pt"
MODEL_JSON = "archive/models/model.json"
WEIGHTS_CONFIG = "archive/data/weights/model_weights_config.json"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A fixed-size and an any-size (dynamic batch and image side) vitkit export of one tiny model, and an image."""
    from vitkit.deploy.export import export_model
    from vitkit.deploy.metadata import ModelCard, Preprocessing

    folder = tmp_path_factory.mktemp("pt2")
    torch.manual_seed(0)
    model = vitkit.create_model("vit_tiny_patch16", **TINY).eval()
    card = ModelCard(Preprocessing(32, 32), ("ant", "bee", "cat"), 8)
    export_model(model, folder / "fixed.pt2", "PT2", card)
    export_model(model, folder / "any.pt2", "PT2", card, dynamic_batch=True, dynamic_image_size=True)
    pixels = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "image.png")
    return folder


def _predict(model: Path, image: Path) -> int:
    return main(["predict", "--model", str(model), str(image), "--json"])


def test_vitkit_pt2_exports_load_and_run_without_unpickling_anything(exports, monkeypatch, capsys):
    from vitkit.model.formats.pt2 import load_pt2_program

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    for name, batch in (("fixed.pt2", 1), ("any.pt2", 2)):
        images = torch.ones(batch, 3, 32, 32)
        expected = torch.export.load(exports / name).module()(images)
        with monkeypatch.context() as patch:
            patch.setattr(torch, "load", refuse)
            patch.setattr(pickle, "loads", refuse)
            patch.setattr(pickle, "load", refuse)
            patch.setattr(pickle, "Unpickler", refuse)
            patch.setattr(torch._C, "_pickle_load_obj", refuse)
            program, extra = load_pt2_program(exports / name)
            logits = program.module()(images)
        assert torch.equal(logits, expected)
        assert json.loads(extra["vitkit_deploy.json"])["patch_size"] == 8
    assert _predict(exports / "any.pt2", exports / "image.png") == 0
    assert [row["label"] for row in json.loads(capsys.readouterr().out)[0]["top5"]] != []
    # Its inputs are still checked without the guard code: by the program's range constraints.
    with pytest.raises(Exception, match="Expected input"):
        load_pt2_program(exports / "fixed.pt2")[0].module()(torch.ones(2, 3, 32, 32))


def test_pt2_pickled_sample_inputs_never_run_and_change_nothing(exports, tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = _rewrite_zip(exports / "fixed.pt2", tmp_path / "evil.pt2", {SAMPLE_INPUTS: pickle.dumps(_Touch(marker), 2)})
    assert _predict(exports / "fixed.pt2", exports / "image.png") == 0
    clean = capsys.readouterr().out
    # vitkit never reads the sample inputs (torch unpickles them, and retries with weights_only=False): the
    # program runs exactly as exported and the pickle stays inert bytes.
    assert _predict(evil, exports / "image.png") == 0
    assert capsys.readouterr().out == clean
    assert not marker.exists()



def _assert_refused(evil, exports, capsys, words: str, marker) -> None:
    """`vitkit predict` refuses the file in one line naming it and the reason, and its payload never ran."""
    assert _predict(evil, exports / "image.png") == 2
    line = _one_error_line(capsys)
    assert str(evil) in line and words in line
    assert not marker.exists()

def test_pt2_weight_stored_as_pickle_is_refused(exports, tmp_path, capsys):
    marker = tmp_path / "ran"
    config = json.loads(zipfile.ZipFile(exports / "fixed.pt2").read(WEIGHTS_CONFIG))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    evil = _rewrite_zip(exports / "fixed.pt2", tmp_path / "evil.pt2", {
        WEIGHTS_CONFIG: json.dumps(config).encode(),
        f"archive/data/weights/{first['path_name']}": pickle.dumps(_Touch(marker), 2),
    })
    _assert_refused(evil, exports, capsys, "pickle", marker)


def test_pt2_symbolic_shape_expression_is_never_evaluated(exports, tmp_path, capsys):
    marker = tmp_path / "ran"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch() or "

    def poison(data: bytes) -> bytes:
        text = data.decode()
        symbol = "Symbol('s"
        assert symbol in text
        return text.replace(symbol, payload.replace('"', '\\"') + symbol, 1).encode()

    evil = _rewrite_zip(exports / "any.pt2", tmp_path / "evil.pt2", {MODEL_JSON: poison})
    _assert_refused(evil, exports, capsys, "shape expression", marker)


def test_pt2_guard_code_is_never_executed(exports, tmp_path, capsys):
    marker = tmp_path / "ran"
    program = json.loads(zipfile.ZipFile(exports / "fixed.pt2").read(MODEL_JSON))
    program["guards_code"] = [f"__import__('pathlib').Path({str(marker)!r}).touch() is None"]
    evil = _rewrite_zip(exports / "fixed.pt2", tmp_path / "evil.pt2", {MODEL_JSON: json.dumps(program).encode()})
    assert _predict(evil, exports / "image.png") == 2
    line = _one_error_line(capsys)
    assert str(evil) in line and "guard" in line
    assert not marker.exists()


@pytest.mark.parametrize("target", ["torch.ops.aten.from_file.default", "torch.ops.higher_order.print", "torch.os.system"])
def test_pt2_graph_calling_anything_but_tensor_ops_is_refused(exports, tmp_path, capsys, target):
    program = json.loads(zipfile.ZipFile(exports / "fixed.pt2").read(MODEL_JSON))
    node = next(n for n in program["graph_module"]["graph"]["nodes"] if n["target"] == "torch.ops.aten.gelu.default")
    node["target"] = target
    evil = _rewrite_zip(exports / "fixed.pt2", tmp_path / "evil.pt2", {MODEL_JSON: json.dumps(program).encode()})
    assert _predict(evil, exports / "image.png") == 2
    line = _one_error_line(capsys)
    assert str(evil) in line and target in line


def test_pt2_compiled_code_and_pickled_objects_are_refused(exports, tmp_path, capsys):
    for name, data, fragment in (
        ("archive/data/aotinductor/model/model.so", b"\x7fELF", "compiled code"),
        ("archive/data/constants/custom_obj_0", pickle.dumps(_Touch(tmp_path / "ran"), 2), "custom_obj_0"),
        ("archive/data/evil.pkl", pickle.dumps(_Touch(tmp_path / "ran"), 2), "evil.pkl"),
    ):
        evil = _rewrite_zip(exports / "fixed.pt2", tmp_path / "evil.pt2", add={name: data})
        assert _predict(evil, exports / "image.png") == 2
        line = _one_error_line(capsys)
        assert str(evil) in line and fragment in line
    assert not (tmp_path / "ran").exists()


def test_pt2_with_too_many_entries_is_refused(exports, tmp_path, capsys):
    extra = {f"archive/extra/note_{i}.txt": b"x" for i in range(5000)}
    evil = _rewrite_zip(exports / "fixed.pt2", tmp_path / "evil.pt2", add=extra)
    assert _predict(evil, exports / "image.png") == 2
    line = _one_error_line(capsys)
    assert str(evil) in line and "entries" in line


def test_pt2_entry_declaring_an_absurd_size_is_refused_before_reading(exports, tmp_path):
    evil = _rewrite_zip(exports / "fixed.pt2", tmp_path / "evil.pt2")
    with zipfile.ZipFile(evil, "a") as archive:
        archive.writestr("archive/extra/huge.txt", b"tiny")
        archive.filelist[-1].file_size = 17 << 30  # what the central directory claims; the data is 4 bytes
    proc = _bounded_cli("predict", "--model", evil, exports / "image.png")
    _assert_one_line_refusal(proc, str(evil), "archive/extra/huge.txt")


def test_pt2_deflate_bomb_entry_is_refused_before_reading(exports, tmp_path):
    evil = _rewrite_zip(exports / "fixed.pt2", tmp_path / "evil.pt2")
    with zipfile.ZipFile(evil, "a", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("archive/extra/bomb.txt", "w", force_zip64=True) as member:
            chunk = b" " * (1 << 20)
            for _ in range(1024):
                member.write(chunk)
    assert evil.stat().st_size < 8 << 20
    proc = _bounded_cli("predict", "--model", evil, exports / "image.png")
    _assert_one_line_refusal(proc, str(evil), "archive/extra/bomb.txt", "compress")


# --- the components hook ----------------------------------------------------------------------------------------------


def test_components_path_is_checked_before_anything_is_called(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    (tmp_path / "hostile_parts.py").write_text(textwrap.dedent(f"""
        from pathlib import Path

        class NotParts:
            def __init__(self):
                Path({str(marker)!r}).touch()

        def make_parts():
            Path({str(marker)!r}).touch()

        instance = NotParts.__new__(NotParts)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    from vitkit.model.vit import resolve_components

    for name in ("hostile_parts.NotParts", "hostile_parts.make_parts", "hostile_parts.instance"):
        with pytest.raises(VitkitError, match="ViTComponents") as caught:
            resolve_components(name)
        assert name in str(caught.value)
    assert not marker.exists()


# --- MindSpore .ckpt --------------------------------------------------------------------------------------------------


def _mindspore_tensors(depth=2, width=8, patch=4, classes=5) -> dict[str, torch.Tensor]:
    from vitkit.model.formats.mindspore import vitkit_to_mindspore

    model = vitkit.create_model("vit_tiny_patch16", patch_size=patch, embed_dim=width, depth=depth, num_heads=2,
                                mlp_dim=2 * width, image_size=4 * patch, num_classes=classes)
    return vitkit_to_mindspore(model.state_dict())


def test_mindspore_layer_index_beyond_any_vit_is_refused_without_allocating(tmp_path):
    from vitkit.model.formats.mindspore import write_mindspore_checkpoint

    tensors = _mindspore_tensors()
    tensors["body.layers.99999999999.0.cell.0.gamma"] = torch.ones(8)
    write_mindspore_checkpoint(tmp_path / "evil.ckpt", tensors)
    proc = _bounded_cli("convert", tmp_path / "evil.ckpt", tmp_path / "out.safetensors")
    _assert_one_line_refusal(proc, "99999999999", "1024")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("shape", [(8, 4), (6, 8)])
def test_mindspore_qkv_of_mismatched_shapes_is_refused_with_the_shapes(tmp_path, capsys, shape):
    from vitkit.model.formats.mindspore import write_mindspore_checkpoint

    tensors = _mindspore_tensors()
    tensors["body.layers.1.0.cell.1.to_k.weight"] = torch.ones(shape)
    write_mindspore_checkpoint(tmp_path / "evil.ckpt", tensors)
    assert main(["convert", str(tmp_path / "evil.ckpt"), str(tmp_path / "out.safetensors")]) == 2
    line = _one_error_line(capsys)
    assert "body.layers.1" in line and str(list(shape)) in line and "[8, 8]" in line


# --- Flax .npz --------------------------------------------------------------------------------------------------------


def _npy_header(shape, descr="<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def test_npz_array_header_claiming_96_tib_is_refused_before_allocating(tmp_path):
    path = tmp_path / "evil.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("embedding/kernel.npy", _npy_header((16, 16, 3, 1 << 35)) + b"\0" * 64)
        archive.writestr("embedding/bias.npy", _npy_header((8,)) + b"\0" * 32)
    proc = _bounded_cli("convert", path, tmp_path / "out.safetensors")
    _assert_one_line_refusal(proc, "embedding/kernel", "96.0 TiB")


def test_npz_deflate_bomb_is_refused_before_reading(tmp_path):
    path = tmp_path / "bomb.npz"
    count = (1 << 30) // 4
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("embedding/kernel.npy", "w", force_zip64=True) as member:
            member.write(_npy_header((8, 8, 3, count // 192)))
            chunk = bytes(1 << 20)
            for _ in range(1024):
                member.write(chunk)
    assert path.stat().st_size < 4 << 20
    proc = _bounded_cli("convert", path, tmp_path / "out.safetensors")
    _assert_one_line_refusal(proc, "embedding/kernel.npy", "compress")


# --- safetensors metadata ---------------------------------------------------------------------------------------------


def _vitkit_safetensors(path: Path, arch_text: str) -> Path:
    model = vitkit.create_model("vit_tiny_patch16", **TINY)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt", "vitkit.arch": arch_text})
    return path


@pytest.mark.parametrize("arch_text, fragment", [
    ("[1, 2]", "not a JSON object"),
    ("{not json", "not a JSON object"),
    ('{"depth": "12"}', "depth"),
    ('{"embed_dim": true}', "embed_dim"),
    ('{"ln_eps": "small"}', "ln_eps"),
    ('{"pool": ["token"]}', "pool"),
])
def test_safetensors_arch_metadata_of_the_wrong_kind_is_one_line(tmp_path, capsys, arch_text, fragment):
    path = _vitkit_safetensors(tmp_path / "evil.safetensors", arch_text)
    assert main(["convert", str(path), str(tmp_path / "out.safetensors")]) == 2
    line = _one_error_line(capsys)
    assert "vitkit.arch" in line and fragment in line


@pytest.mark.parametrize("arch, fragment", [
    ({"embed_dim": 65536, "depth": 100000, "image_size": 2240000000}, "embed_dim"),
    ({**TINY, "depth": 100000}, "depth"),
    ({**TINY, "image_size": 2240000000}, "image_size"),
    ({**TINY, "num_heads": 3}, "num_heads"),
    ({**TINY, "patch_size": 0}, "patch_size"),
    # Every field in range, but 1024 blocks 16384 wide (~13 TB) where the file holds two 32 wide: refused by shape.
    ({**TINY, "embed_dim": 16384, "depth": 1024, "mlp_dim": 65536, "num_heads": 128}, "do not fit"),
    ({**TINY, "image_size": 8192}, "do not fit"),
])
def test_safetensors_arch_describing_an_absurd_model_is_refused_before_building(tmp_path, arch, fragment):
    path = _vitkit_safetensors(tmp_path / "evil.safetensors", json.dumps(arch))
    proc = _bounded_cli("convert", path, tmp_path / "out.safetensors")
    line = _assert_one_line_refusal(proc, fragment)
    assert "vitkit.arch" in line or "do not fit the model" in line


def test_vitkit_safetensors_with_honest_metadata_still_loads(tmp_path):
    model = vitkit.create_model("vit_tiny_patch16", **TINY, style="mindspore").eval()
    loaded = vitkit.load_model(vitkit.save_model(model, tmp_path / "m.safetensors"))
    assert loaded.arch == model.arch
    resized = vitkit.load_model(tmp_path / "m.safetensors", image_size=64)
    assert resized.arch.image_size == 64


# --- Hugging Face folders ---------------------------------------------------------------------------------------------


@pytest.fixture
def hf_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=32, patch_size=8, num_labels=3)
    torch.manual_seed(0)
    folder = tmp_path / "models" / "vit"
    transformers.ViTForImageClassification(config).eval().save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def _point_index_at(folder: Path, shard: str) -> None:
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    index_path.write_text(json.dumps(index))


def test_hf_index_naming_shards_outside_the_folder_is_refused(hf_folder, tmp_path, capsys):
    secret = tmp_path / "secret"
    secret.mkdir()
    shard = sorted(hf_folder.glob("model-*.safetensors"))[0]
    (secret / "x.safetensors").write_bytes(shard.read_bytes())
    (hf_folder / "link.safetensors").symlink_to(secret / "x.safetensors")
    for named in ("../../secret/x.safetensors", str(secret / "x.safetensors"), "/etc/hostname", "link.safetensors"):
        _point_index_at(hf_folder, named)
        assert main(["convert", str(hf_folder), str(tmp_path / "out.safetensors")]) == 2
        line = _one_error_line(capsys)
        assert named in line and "outside" in line
    assert not (tmp_path / "out.safetensors").exists()


def test_hf_cache_snapshot_whose_files_link_into_its_blobs_still_loads(hf_folder, tmp_path):
    reference = vitkit.load_model(hf_folder)
    snapshot = tmp_path / "hub" / "models--x--vit" / "snapshots" / "0123abc"
    blobs = tmp_path / "hub" / "models--x--vit" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for file in hf_folder.iterdir():
        (blobs / file.name).write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", file.name))
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(vitkit.load_model(snapshot)(images), reference(images))


def test_hf_index_with_a_weight_map_of_the_wrong_kind_is_one_line(hf_folder, tmp_path, capsys):
    index_path = hf_folder / "model.safetensors.index.json"
    for weight_map in (["model-00001.safetensors"], {"a.weight": 3}):
        index_path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        assert main(["convert", str(hf_folder), str(tmp_path / "out.safetensors")]) == 2
        assert "weight_map" in _one_error_line(capsys)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_hf_oversized_config_or_index_is_refused_before_parsing(hf_folder, tmp_path, capsys, name):
    path = hf_folder / name
    data = json.loads(path.read_text())
    data["padding"] = "x" * (40 << 20)
    path.write_text(json.dumps(data))
    assert main(["convert", str(hf_folder), str(tmp_path / "out.safetensors")]) == 2
    line = _one_error_line(capsys)
    assert name in line and "MiB" in line
