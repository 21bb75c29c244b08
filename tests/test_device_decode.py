"""data.decode_on=device: workers plan the crop, the training device decodes (run here on the CPU, where
torchvision's decode_jpeg is libjpeg; tests/test_cuda.py runs the same path through nvJPEG)."""
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from conftest import tiny_config, write_image_folder
from vitkit.data.device_decode import EncodedCrop, EncodedCropDataset, collate_encoded, decode_batch
from vitkit.data.folder import decode_rgb, list_image_folder, read_bytes
from vitkit.data.transforms import train_transform
from vitkit.engine.trainer import Trainer
from vitkit.errors import VitkitError

SIZE = 32


def _photo_folder(root, count=6):
    """Real photographs (scikit-image's), cut to odd sizes, as JPEGs in two classes."""
    skimage_data = pytest.importorskip("skimage.data")
    photos = [skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee()]
    for i in range(count):
        photo = photos[i % len(photos)]
        height, width = 90 + 7 * i, 130 - 5 * i
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[:height * 2:2, :width * 2:2]).save(folder / f"{i}.jpg", quality=90)
    return root


def _reference(path, seed_of_sample, transform):
    """The workers' plain path, from torchvision's own draws: decode, then the stage's make_params, then the flip."""
    image = decode_rgb(read_bytes(path))
    crop, flip = transform.transforms[:2]
    torch.manual_seed(seed_of_sample)
    params = crop.make_params([image])
    flipped = bool(torch.rand(1) < flip.p)
    out = TF.resized_crop(image, params["top"], params["left"], params["height"], params["width"], [SIZE, SIZE],
                          antialias=True)
    return TF.horizontal_flip(out) if flipped else out


def test_device_decoded_batch_matches_the_workers_plain_path(tmp_path):
    root = _photo_folder(tmp_path / "train")
    samples, _ = list_image_folder(root)
    transform = train_transform(SIZE, crop_min=0.08, augment="none")
    dataset = EncodedCropDataset(samples, transform, seed=5)
    dataset.set_epoch(3)
    assert all(isinstance(dataset[i][0], EncodedCrop) for i in range(len(dataset)))
    batch, labels, _, failed = collate_encoded([dataset[i] for i in range(len(dataset))])
    assert failed == 0 and batch.positions.tolist() == list(range(len(samples))) and not batch.decoded
    images, kept_labels, unreadable = decode_batch(batch, labels, torch.device("cpu"), (SIZE, SIZE))
    assert unreadable == 0 and images.shape == (len(samples), 3, SIZE, SIZE) and images.dtype == torch.float32
    assert torch.equal(kept_labels, labels)
    flips = 0
    for i, (path, _) in enumerate(samples):
        expected = _reference(path, dataset.augmentation_seed(i), transform)
        diff = (images[i].round().int() - expected.int()).abs()
        # Same box, same decoder (libjpeg); only the resize's rounding differs (float here, fixed-point uint8 there).
        assert diff.max() <= 1, f"sample {i}"
        flips += bool(batch.flips[i])
    assert 0 < flips < len(samples)  # both branches of the flip were exercised


def test_pngs_and_unreadable_jpegs_in_a_device_decoded_batch(tmp_path):
    root = _photo_folder(tmp_path / "train", count=4)
    write_image_folder(root, {"a": 1}, size=40, seed=3)  # a PNG: decoded by the worker, joins as pixels
    truncated = root / "b" / "truncated.jpg"
    data = (root / "b" / "0.jpg").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # header readable, scan cut: the batched decode fails
    samples, _ = list_image_folder(root)
    dataset = EncodedCropDataset(samples, train_transform(SIZE, augment="none"), seed=0)
    batch, labels, _, _ = collate_encoded([dataset[i] for i in range(len(dataset))])
    png_place = [i for i, (path, _) in enumerate(samples) if path.endswith(".png")]
    assert [place for place, _ in batch.decoded] == png_place and len(batch.positions) == len(samples) - 1
    with pytest.warns(UserWarning, match="unreadable"):
        images, kept_labels, unreadable = decode_batch(batch, labels, torch.device("cpu"), (SIZE, SIZE))
    assert unreadable == 1 and images.shape[0] == len(samples) - 1
    bad = [i for i, (path, _) in enumerate(samples) if path.endswith("truncated.jpg")][0]
    assert torch.equal(kept_labels, torch.cat([labels[:bad], labels[bad + 1:]]))
    # The worker-decoded PNG keeps its place (after the dropped JPEG, if that came first) and its pixels.
    png_at = png_place[0] - (bad < png_place[0])
    assert torch.equal(images[png_at], batch.decoded[0][1].float())


def test_training_with_device_decoding(tmp_path):
    data = tmp_path / "data"
    write_image_folder(data / "train", {"ant": 12, "bee": 12, "cat": 12}, seed=1, suffix=".jpg")
    write_image_folder(data / "val", {"ant": 4, "bee": 3, "cat": 4}, seed=2, suffix=".jpg")
    trainer = Trainer(tiny_config(data, tmp_path / "run", "--data.decode_on=device", "--max_epoch=1"))
    result = trainer.fit()
    assert result["global_step"] == 36 // 8 and result["best_acc"] >= 0


def test_device_decoding_refuses_an_augment_policy(tiny_dataset, tmp_path):
    with pytest.raises(VitkitError, match="data.augment=none"):
        Trainer(tiny_config(tiny_dataset, tmp_path / "run", "--data.decode_on=device", "--data.augment=autoaugment"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (nvJPEG)")
def test_nvjpeg_batch_matches_the_cpu_decoded_batch(tmp_path):
    root = _photo_folder(tmp_path / "train")
    samples, _ = list_image_folder(root)
    dataset = EncodedCropDataset(samples, train_transform(SIZE, crop_min=0.08, augment="none"), seed=2)
    batch, labels, _, _ = collate_encoded([dataset[i] for i in range(len(dataset))])
    on_cpu, _, _ = decode_batch(batch, labels, torch.device("cpu"), (SIZE, SIZE))
    on_gpu, gpu_labels, unreadable = decode_batch(batch, labels.cuda(), torch.device("cuda"), (SIZE, SIZE))
    assert unreadable == 0 and on_gpu.is_cuda and torch.equal(gpu_labels.cpu(), labels)
    diff = (on_gpu.cpu() - on_cpu).abs()
    # nvJPEG's IDCT and chroma upsampling are not libjpeg's: a few levels apart, the same picture.
    assert diff.mean() < 2.0 and diff.max() <= 40, (diff.mean(), diff.max())
