"""vitkit predict on real Fashion-MNIST images: top-5 classes and probabilities from a checkpoint or its ONNX export."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from vitkit.cli import main
from vitkit.data.fashion_mnist import write_fashion_mnist
from vitkit.engine.checkpoint import newest_weights
from vitkit.engine.trainer import train
from vitkit.model.loading import load_model
from vitkit.model.vit import Mlp, ViTComponents

# The demo's preprocessing: 28 px images resized to 28 and center-cropped to 28, i.e. left as they are.
FASHION = ["--train_image_size=28", "--eval_image_size=28", "--model.patch_size=7", "--eval.resize_size=28",
           "--class_num=10"]
MODEL_KEYS = ["--backbone=vit_tiny_patch16", "--model.patch_size=7", "--model.embed_dim=32", "--model.depth=2",
              "--model.num_heads=2", "--model.mlp_dim=64", "--eval_image_size=28", "--eval.resize_size=28"]


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """A tiny ViT trained for an epoch on 60 real Fashion-MNIST images, and its ONNX export."""
    root = tmp_path_factory.mktemp("predict")
    write_fashion_mnist(root / "data", limit_per_split=60)
    train(tiny_config(root / "data", root / "run", "--max_epoch=1", *FASHION))
    onnx_path = root / "fashion.onnx"
    assert main(["export", "--model", str(root / "run"), f"--file_name={onnx_path}", "--eval.resize_size=28"]) == 0
    images = sorted((root / "data" / "val").glob("*/*.png"))[:3]
    return root, onnx_path, images


def _by_hand(checkpoint, images) -> np.ndarray:
    """Softmax of the PyTorch model on PIL-decoded pixels normalized with the original's constants, by hand."""
    mean = np.array([123.675, 116.28, 103.53], dtype=np.float32)[:, None, None]
    std = np.array([58.395, 57.12, 57.375], dtype=np.float32)[:, None, None]
    batch = np.stack([(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) - mean) / std
                      for p in images])
    with torch.no_grad():
        logits = load_model(checkpoint)(torch.from_numpy(batch)).double()
    return torch.softmax(logits, dim=1).numpy()


def test_checkpoint_and_onnx_give_the_same_top5_with_the_training_folder_names(fashion, capsys):
    root, onnx_path, images = fashion
    checkpoint = newest_weights(str(root / "run"))
    expected = _by_hand(checkpoint, images)
    class_names = sorted(p.name for p in (root / "data" / "train").iterdir())
    runs = {}
    for model, extra in ((root / "run", MODEL_KEYS), (onnx_path, [])):
        assert main(["predict", *map(str, images), "--model", str(model), "--json", *extra]) == 0
        runs[str(model)] = json.loads(capsys.readouterr().out)
    for predictions in runs.values():
        assert [p["image"] for p in predictions] == list(map(str, images))
        for prediction, row in zip(predictions, expected):
            top = prediction["top5"]
            assert [t["index"] for t in top] == list(np.argsort(-row, kind="stable")[:5])
            assert [t["label"] for t in top] == [class_names[t["index"]] for t in top]
            assert np.allclose([t["probability"] for t in top], row[[t["index"] for t in top]], atol=1e-5)
    assert main(["predict", str(images[0]), "--model", str(onnx_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    first = runs[str(onnx_path)][0]["top5"][0]
    assert lines[0] == str(images[0]) and len(lines) == 6
    assert lines[1] == f"  {first['probability']:8.4f}  {first['label']} ({first['index']})"


def test_a_labels_file_names_the_classes(fashion, tmp_path, capsys):
    root, onnx_path, images = fashion
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"kind {i}" for i in range(10)) + "\n")
    assert main(["predict", str(images[0]), "--model", str(onnx_path), "--labels", str(names), "--json"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top5"]
    assert [t["label"] for t in top] == [f"kind {t['index']}" for t in top]
    names.write_text("only\ntwo\n")
    assert main(["predict", str(images[0]), "--model", str(onnx_path), "--labels", str(names)]) == 2
    assert "2 class names for 10 classes" in capsys.readouterr().err


def test_bad_inputs_are_one_line_errors(fashion, tmp_path, capsys):
    root, onnx_path, images = fashion
    text = tmp_path / "photo.png"
    text.write_text("not an image")
    cases = [
        ([str(text), "--model", str(onnx_path)], "is not an image"),
        ([str(tmp_path / "gone.png"), "--model", str(onnx_path)], "does not exist"),
        ([str(images[0]), "--model", str(tmp_path / "gone.onnx")], "does not exist"),
        ([str(images[0]), "--model", str(text)], "not a checkpoint"),
        ([str(images[0]), "--model", str(onnx_path), "--eval_image_size=64"], "takes 28x28 images, not 64x64"),
    ]
    for argv, expected in cases:
        assert main(["predict", *argv]) == 2, argv
        error = capsys.readouterr().err
        assert error.startswith("vitkit: error: ") and error.count("\n") == 1 and expected in error, error


def test_a_model_with_more_classes_than_folders_names_the_known_ones_and_indexes_the_rest(tiny_dataset, tmp_path,
                                                                                          capsys):
    # The original's class_num 1001 over ImageNet's 1000 folders, in small: 4 outputs trained on 3 class folders.
    train(tiny_config(tiny_dataset, tmp_path / "run", "--class_num=4", "--max_epoch=1"))
    onnx_path = tmp_path / "four.onnx"
    assert main(["export", "--model", str(tmp_path / "run"), f"--file_name={onnx_path}"]) == 0
    image = sorted((tiny_dataset / "val").glob("*/*.png"))[0]
    capsys.readouterr()
    for model, extra in ((tmp_path / "run", ["--eval_image_size=32"]), (onnx_path, [])):
        assert main(["predict", str(image), "--model", str(model), "--json", *extra]) == 0, capsys.readouterr().err
        top = json.loads(capsys.readouterr().out)[0]["top5"]
        assert sorted(t["index"] for t in top) == [0, 1, 2, 3]
        assert {t["index"]: t["label"] for t in top} == {0: "ant", 1: "bee", 2: "cat", 3: "class 3"}


class _GatedMlp(Mlp):
    """The stock MLP times a learned per-block gain: a swapped part with a tensor the stock ViT lacks."""

    def __init__(self, arch, components):
        super().__init__(arch, components)
        self.gain = torch.nn.Parameter(torch.full((arch.embed_dim,), 1.5))

    def forward(self, x):
        return super().forward(x) * self.gain


class _GatedParts(ViTComponents):
    mlp = _GatedMlp


def test_eval_export_infer_and_predict_honour_the_components_a_run_was_trained_with(tiny_dataset, tmp_path, capsys):
    parts = f"--model.components={__name__}._GatedParts"
    result = train(tiny_config(tiny_dataset, tmp_path / "run", "--max_epoch=1", parts))
    run, val = str(tmp_path / "run"), str(tiny_dataset / "val")
    sized = ["--eval_image_size=32", "--eval_num_workers=0"]
    capsys.readouterr()
    assert main(["eval", "--model", run, "--data", val, parts, *sized, "--json"]) == 0, capsys.readouterr().err
    # The run's own end-of-epoch evaluation saw the same weights on the same images.
    assert json.loads(capsys.readouterr().out)["top1"] == result["best_acc"]
    onnx_path = tmp_path / "gated.onnx"
    assert main(["export", "--model", run, f"--file_name={onnx_path}", parts, "--eval_image_size=32"]) == 0, \
        capsys.readouterr().err
    capsys.readouterr()
    assert main(["infer", "--model", str(onnx_path), "--data", val, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == result["best_acc"]
    image = sorted((tiny_dataset / "val").glob("*/*.png"))[0]
    tops = []
    for model, extra in ((run, [parts, *sized]), (str(onnx_path), [])):
        assert main(["predict", str(image), "--model", model, "--json", *extra]) == 0, capsys.readouterr().err
        tops.append(json.loads(capsys.readouterr().out)[0]["top5"])
    assert [t["index"] for t in tops[0]] == [t["index"] for t in tops[1]]
    assert np.allclose([t["probability"] for t in tops[0]], [t["probability"] for t in tops[1]], atol=1e-5)
    # Without the key the stock ViT cannot hold the gains: one line naming the problem.
    assert main(["eval", "--model", run, "--data", val, *sized]) == 2
    assert "blocks.0.mlp.gain" in capsys.readouterr().err
