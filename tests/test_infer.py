"""vitkit infer / labels / postprocess: ONNX Runtime over folders, the original's result files and accuracy lines."""
import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config, write_image_folder
from vitkit.cli import main
from vitkit.data.transforms import eval_transform, normalize_batch
from vitkit.deploy.export import export_model
from vitkit.engine.trainer import train
from vitkit.model.loading import load_model

TINY_EVAL = ["--backbone=vit_tiny_patch16", "--model.patch_size=8", "--model.embed_dim=32", "--model.depth=2",
             "--model.num_heads=2", "--model.mlp_dim=64", "--eval_image_size=32", "--eval_num_workers=0"]


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A tiny trained ViT, its ONNX export with the original's batch of 1, and a validation folder of JPEGs."""
    root = tmp_path_factory.mktemp("infer")
    write_image_folder(root / "data" / "train", {"ant": 12, "bee": 12, "cat": 12}, seed=1)
    write_image_folder(root / "data" / "val", {"ant": 5, "bee": 4, "cat": 5}, seed=2, size=45, suffix=".jpg")
    train(tiny_config(root / "data", root / "run", "--max_epoch=1"))
    checkpoint = root / "run" / "vit_tiny_patch16-1_4.safetensors"
    export_model(load_model(checkpoint), root / "model.onnx")
    return root, checkpoint, root / "model.onnx"


def _eval_json(checkpoint, data, capsys) -> dict:
    assert main(["eval", "--model", str(checkpoint), "--data", str(data), "--json", *TINY_EVAL]) == 0
    return json.loads(capsys.readouterr().out)


def test_infer_accuracy_equals_eval_and_prints_the_originals_lines(deployed, tmp_path, capsys):
    root, checkpoint, onnx_path = deployed
    data = tmp_path / "val"
    shutil.copytree(root / "data" / "val", data)
    (data / "bee" / "broken.jpg").write_bytes(b"\xff\xd8\xff this is no jpeg")  # skipped and counted by both
    expected = _eval_json(checkpoint, data, capsys)
    assert main(["infer", "--model", str(onnx_path), "--data", str(data), "--batch-size", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    total, top1, top5 = expected["total"], expected["top1"], expected["top5"]
    assert total == 14 and expected["failed"] == 1
    assert lines[0] == f"Total data: {total}, top1 accuracy: {top1}, top5 accuracy: {top5}."
    assert re.fullmatch(r"NN inference cost average time: \d+\.\d+ ms of infer_count 14", lines[1])
    assert "skipped 1 unreadable image(s)" in lines
    assert main(["infer", "--model", str(onnx_path), "--data", str(data), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (record["correct1"], record["correct5"], record["skipped"]) == (expected["correct1"], expected["correct5"], 1)


def test_result_files_and_label_file_in_the_originals_formats_read_back_by_postprocess(deployed, tmp_path, capsys):
    root, checkpoint, onnx_path = deployed
    data, results, label_file = root / "data" / "val", tmp_path / "result_Files", tmp_path / "imagenet_label.json"
    assert main(["infer", "--model", str(onnx_path), "--data", str(data), "--save-logits", str(results)]) == 0
    infer_line = capsys.readouterr().out.splitlines()[0]
    assert main(["labels", "--img_path", str(data), "--output", str(label_file)]) == 0
    assert capsys.readouterr().out.strip() == "[INFO] Completed! Total 14 data."
    text = label_file.read_text()
    assert "\n" not in text and json.loads(text) == {
        **{f"ant_{i:03d}.jpg": 0 for i in range(5)}, **{f"bee_{i:03d}.jpg": 1 for i in range(4)},
        **{f"cat_{i:03d}.jpg": 2 for i in range(5)},
    }
    assert sorted(p.name for p in results.iterdir()) == sorted(f"{_stem(n)}_0.bin" for n in json.loads(text))
    # Each file is the image's raw float32 logits: what PyTorch computes on vitkit's eval transform of it.
    model = load_model(checkpoint)
    image = torch.from_numpy(np.asarray(Image.open(data / "cat" / "cat_003.jpg").convert("RGB"))).permute(2, 0, 1)
    with torch.no_grad():
        expected = model(normalize_batch(eval_transform(32)(image)[None])).numpy()[0]
    stored = np.fromfile(results / "cat_003_0.bin", dtype=np.float32)
    assert stored.shape == (3,) and np.abs(stored - expected).max() < 1e-4
    assert main(["postprocess", "--result_path", str(results), "--label_path", str(label_file), "--dataset", "x"]) == 0
    assert capsys.readouterr().out.strip() == infer_line


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def test_postprocess_counts_by_hand_with_any_class_count_and_extension(tmp_path, capsys):
    results = tmp_path / "res"
    results.mkdir()
    # 7 classes (not the original's hard-coded 1001), PNG and JPEG names (not only '.JPEG').
    logits = {
        "a": ([0, 9, 1, 2, 3, 4, 5], 1),  # top-1 hit
        "b": ([9, 8, 7, 6, 5, 4, 3], 4),  # rank 5: top-5 hit only
        "c": ([9, 8, 7, 6, 5, 4, 3], 5),  # rank 6: miss
        "d_0": ([1, 2, 3, 4, 5, 6, 7], 6),  # a name that itself ends in _0
    }
    for stem, (values, _) in logits.items():
        np.array(values, dtype=np.float32).tofile(results / f"{stem}_0.bin")
    labels = {"a.png": 1, "b.JPEG": 4, "c.jpg": 5, "d_0.webp": 6, "unused.png": 0}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    assert main(["postprocess", "--result_path", str(results), "--label_path", str(tmp_path / "labels.json")]) == 0
    assert capsys.readouterr().out.strip() == "Total data: 4, top1 accuracy: 0.5, top5 accuracy: 0.75."
    np.zeros(5, dtype=np.float32).tofile(results / "unused_0.bin")
    assert main(["postprocess", "--result_path", str(results), "--label_path", str(tmp_path / "labels.json")]) == 2
    assert "holds 5 logits but other result files hold 7" in capsys.readouterr().err


def test_a_flat_folder_runs_without_accuracy(deployed, tmp_path, capsys):
    root, _, onnx_path = deployed
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted((root / "data" / "val").glob("*/*.jpg"))[:3]:
        shutil.copy(path, flat / path.name)
    assert main(["infer", "--model", str(onnx_path), "--data", str(flat)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "Total data: 3 (a folder without class subfolders: no accuracy)"
    assert lines[1].endswith("ms of infer_count 3")


def test_bad_inputs_are_one_line_errors(deployed, tmp_path, capsys):
    root, _, onnx_path = deployed
    data = str(root / "data" / "val")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(onnx_path.read_bytes()[: 3000])
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "notes.txt").write_text("hello")
    cases = [
        (["infer", "--model", str(tmp_path / "missing.onnx"), "--data", data], "does not exist"),
        (["infer", "--model", str(corrupt), "--data", data], "is not a usable ONNX model"),
        (["infer", "--model", str(onnx_path), "--data", str(tmp_path / "empty")], "no images"),
        (["infer", "--model", str(onnx_path), "--data", str(tmp_path / "no_images")], "no images"),
        (["infer", "--model", str(onnx_path), "--data", data, "--eval_image_size=64"], "takes 32x32 images, not 64x64"),
        (["postprocess", "--result_path", str(tmp_path / "empty"), "--label_path", "x.json"], "no *_0.bin result files"),
        (["labels", "--img_path", str(tmp_path / "empty")], "no class subfolders"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        error = capsys.readouterr().err
        assert error.startswith("vitkit: error: ") and error.count("\n") == 1 and expected in error, error


def test_an_override_replaces_only_its_own_key_of_the_models_preprocessing():
    from vitkit.config import load_config
    from vitkit.deploy.infer import resolve_preprocessing
    from vitkit.deploy.metadata import Preprocessing

    exported = Preprocessing(384, 416, "BICUBIC", "inception")
    assert resolve_preprocessing(exported, load_config(None, ["--eval.num_workers=2"]), None) == exported
    assert resolve_preprocessing(exported, load_config(None, ["--eval.resize_size=400"]), None) == Preprocessing(
        384, 400, "BICUBIC", "inception")
