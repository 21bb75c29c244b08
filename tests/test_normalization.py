"""data.normalization: mean/std 0.5 inputs for Flax and Hugging Face weights, through eval, train, export, infer, predict.

transformers is the oracle: a small random ViTForImageClassification and its own ViTImageProcessor (rescale 1/255,
normalize with mean and std 0.5) give the logits vitkit must reproduce.
"""
import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from vitkit.cli import main
from vitkit.config import load_config
from vitkit.data.transforms import UInt8RandomErasing, normalize_batch
from vitkit.deploy.infer import resolve_preprocessing
from vitkit.deploy.metadata import METADATA_KEY, ModelCard, Preprocessing
from vitkit.deploy.predict import predict
from vitkit.engine.build import build_model, load_pretrained
from vitkit.errors import VitkitError

transformers = pytest.importorskip("transformers")

CLASSES = ["ant", "bee", "cat"]
EVAL = ["--eval_image_size=32", "--eval.resize_size=32", "--eval_num_workers=0", "--eval_batch_size=8"]


def test_inception_normalization_is_x_over_255_minus_half_over_half():
    pixels = torch.tensor([0, 51, 102, 153, 204, 255], dtype=torch.uint8)
    images = pixels.view(1, 1, 2, 3).expand(2, 3, 2, 3)
    # (x / 255 - 0.5) / 0.5 by hand: 0 -> -1, 51 -> -0.6, 102 -> -0.2, 153 -> 0.2, 204 -> 0.6, 255 -> 1.
    expected = torch.tensor([-1.0, -0.6, -0.2, 0.2, 0.6, 1.0]).view(1, 1, 2, 3).expand(2, 3, 2, 3)
    torch.testing.assert_close(normalize_batch(images, normalization="inception"), expected, atol=1e-7, rtol=0)
    torch.testing.assert_close(normalize_batch(images[0], normalization="inception"), expected[0], atol=1e-7, rtol=0)
    half = normalize_batch(images, dtype=torch.bfloat16, normalization="inception")
    assert half.dtype == torch.bfloat16 and torch.equal(half, expected.to(torch.bfloat16))
    # The default stays the original's ImageNet statistics: 0 is -mean/std, not -1.
    assert normalize_batch(images)[0, 0, 0, 0].item() == pytest.approx(-123.675 / 58.395, abs=1e-6)
    with pytest.raises(VitkitError, match="unknown normalization 'bogus'"):
        normalize_batch(images, normalization="bogus")


def test_random_erasing_noise_is_drawn_in_the_chosen_normalizations_units():
    torch.manual_seed(0)
    image = torch.zeros(3, 64, 64, dtype=torch.uint8)
    erasing = UInt8RandomErasing(1.0, "inception")
    fills = [erasing.make_params([image])["v"] for _ in range(20)]
    noise = torch.cat([fill.flatten(1) for fill in fills], dim=1).float()
    # 127.5 + 127.5 z: clipping at 0 and 255 is symmetric, so each channel's mean stays at 127.5 (ImageNet's blue
    # channel would sit near 103.5) and about a third of the pixels clip at ±1 std.
    assert torch.allclose(noise.mean(1), torch.full((3,), 127.5), atol=4)
    clipped = (noise == 0).float().mean().item() + (noise == 255).float().mean().item()
    assert 0.25 < clipped < 0.4


@pytest.fixture(scope="module")
def hugging_face(tmp_path_factory):
    """A random 32 px ViTForImageClassification folder and an image folder labelled with its own predictions.

    Each image's class is what transformers predicts from ViTImageProcessor's pixel values, so evaluating with the
    same preprocessing scores 100 %. Half the images are ones whose prediction changes when the pixels are
    normalized with ImageNet's statistics instead (computed by hand), so that normalization scores exactly half.
    """
    root = tmp_path_factory.mktemp("hf_vit")
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8,
        id2label=dict(enumerate(CLASSES)), label2id={name: i for i, name in enumerate(CLASSES)},
    )
    torch.manual_seed(1)
    reference = transformers.ViTForImageClassification(config)
    with torch.no_grad():
        for name, tensor in reference.named_parameters():
            scale = 1.0 if "layernorm" in name and name.endswith("weight") else 0.0
            tensor.copy_(scale + torch.randn_like(tensor) * 0.2)
    reference.eval().save_pretrained(root / "vit")
    rng = np.random.default_rng(0)
    pool = [np.clip(rng.integers(0, 256, size=3) + rng.integers(-60, 60, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            for _ in range(200)]
    pixels = torch.from_numpy(np.stack(pool)).permute(0, 3, 1, 2).float()
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    processor = transformers.ViTImageProcessor(do_resize=False)
    with torch.no_grad():
        logits = reference(pixel_values=processor(pool, return_tensors="pt")["pixel_values"]).logits
        imagenet_labels = reference(pixel_values=(pixels - mean) / std).logits.argmax(1)
    labels = logits.argmax(1)
    flipped = torch.nonzero(labels != imagenet_labels).flatten()[:4].tolist()
    kept = torch.nonzero(labels == imagenet_labels).flatten()[: len(flipped)].tolist()
    assert len(flipped) == 4
    paths = []
    for name in CLASSES:
        (root / "val" / name).mkdir(parents=True)
    for index in flipped + kept:
        path = root / "val" / CLASSES[labels[index]] / f"image_{index:03d}.png"
        Image.fromarray(pool[index]).save(path)
        paths.append(path)
    return root, paths, logits[flipped + kept]


def _eval(model, data, capsys, *extra) -> tuple[dict, str]:
    assert main(["eval", "--model", str(model), "--data", str(data), "--json", *EVAL, *extra]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


def test_eval_with_inception_matches_transformers_and_imagenet_warns(hugging_face, capsys):
    root, paths, _ = hugging_face
    inception, err = _eval(root / "vit", root / "val", capsys, "--data.normalization=inception")
    assert (inception["correct1"], inception["total"]) == (8, 8) and "mean/std 0.5" not in err
    imagenet, err = _eval(root / "vit", root / "val", capsys)
    assert (imagenet["correct1"], imagenet["total"]) == (4, 8)
    assert err.count("this checkpoint expects inputs normalized with mean/std 0.5") == 1
    assert "set data.normalization=inception" in err


def test_predict_with_inception_gives_transformers_probabilities(hugging_face):
    root, paths, logits = hugging_face
    cfg = load_config(None, [*EVAL, "--data.normalization=inception"])
    predictions = predict(root / "vit", [str(path) for path in paths], cfg)
    expected = torch.softmax(logits.double(), dim=1)
    for prediction, row in zip(predictions, expected):
        assert prediction.top[0][1] == CLASSES[row.argmax().item()]
        for index, _, probability in prediction.top:
            assert probability == pytest.approx(row[index].item(), abs=1e-5)
    with pytest.warns(UserWarning, match="set data.normalization=inception"):
        imagenet = predict(root / "vit", [str(paths[0])], load_config(None, EVAL))
    assert abs(imagenet[0].top[0][2] - predictions[0].top[0][2]) > 1e-3


def test_exported_model_keeps_inception_and_infer_equals_eval(hugging_face, tmp_path, capsys):
    root, _, _ = hugging_face
    onnx_path = tmp_path / "vit.onnx"
    assert main(["export", "--model", str(root / "vit"), "--file_name", str(onnx_path), *EVAL,
                 "--data.normalization=inception"]) == 0
    captured = capsys.readouterr()
    assert "inception-normalized (mean/std 0.5) RGB" in captured.out and "mean/std 0.5" not in captured.err
    card = json.loads({p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}[METADATA_KEY])
    assert card["preprocessing"]["normalization"] == "inception"
    assert main(["infer", "--model", str(onnx_path), "--data", str(root / "val"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    expected, _ = _eval(root / "vit", root / "val", capsys, "--data.normalization=inception")
    assert (record["correct1"], record["correct5"], record["images"]) == (
        expected["correct1"], expected["correct5"], expected["total"]) == (8, 8, 8)


def test_export_at_imagenet_warns_and_names_imagenet(hugging_face, tmp_path, capsys):
    root, _, _ = hugging_face
    assert main(["export", "--model", str(root / "vit"), "--file_name", str(tmp_path / "vit.pt2"),
                 "--export.file_format=PT2", *EVAL]) == 0
    captured = capsys.readouterr()
    assert "ImageNet-normalized RGB" in captured.out
    assert "this checkpoint expects inputs normalized with mean/std 0.5" in captured.err


def test_fine_tuning_from_hugging_face_warns_only_at_imagenet(hugging_face, tiny_dataset, tmp_path, recwarn):
    root, _, _ = hugging_face
    cfg = tiny_config(tiny_dataset, tmp_path / "run", "--model.embed_dim=32", "--model.num_heads=4",
                      "--model.ln_eps=1e-12", "--model.gelu=erf")
    load_pretrained(build_model(cfg.model), str(root / "vit"), normalization="inception")
    assert not [w for w in recwarn if "mean/std 0.5" in str(w.message)]
    with pytest.warns(UserWarning, match="expects inputs normalized with mean/std 0.5"):
        load_pretrained(build_model(cfg.model), str(root / "vit"))


def test_cards_without_normalization_mean_imagenet_and_a_differing_config_warns():
    old = ModelCard.from_json(json.dumps({"preprocessing": {"image_size": 32}, "class_names": None, "patch_size": 8}))
    assert old.preprocessing.normalization == "imagenet"
    card = Preprocessing(32, normalization="inception")
    assert ModelCard.from_json(ModelCard(card).to_json()).preprocessing == card
    # A config that does not set the normalization keeps the exported model's.
    assert resolve_preprocessing(card, load_config(None, EVAL), 32).normalization == "inception"
    with pytest.warns(UserWarning, match="exported for mean/std 0.5 inputs .* set data.normalization=inception"):
        chosen = resolve_preprocessing(card, load_config(None, [*EVAL, "--data.normalization=imagenet"]), 32)
    assert chosen.normalization == "imagenet"  # one it sets is followed, as for the other eval keys
