"""Shared test helpers: small real image folders written with PIL, and a tiny training config."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitkit.config import load_config

# A ViT small enough to train for a few steps in a second on 2 CPU cores.
TINY_MODEL = [
    "--backbone=vit_tiny_patch16", "--model.patch_size=8", "--model.embed_dim=32", "--model.depth=2",
    "--model.num_heads=2", "--model.mlp_dim=64", "--train_image_size=32", "--eval_image_size=32",
]


def write_image_folder(root: Path, counts: dict[str, int], size: int = 40, seed: int = 0, suffix: str = ".png") -> Path:
    """Class folders of images whose colour depends on the class, so a model can learn them."""
    rng = np.random.default_rng(seed)
    palette = [(220, 40, 40), (40, 200, 60), (50, 60, 220), (200, 200, 40)]
    for class_index, (name, count) in enumerate(counts.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            base = np.array(palette[class_index % len(palette)], dtype=np.int16)
            pixels = base + rng.integers(-40, 40, size=(size, size, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{name}_{i:03d}{suffix}")
    return root


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    write_image_folder(tmp_path / "data" / "train", {"ant": 12, "bee": 12, "cat": 12}, seed=1)
    write_image_folder(tmp_path / "data" / "val", {"ant": 4, "bee": 3, "cat": 4}, seed=2)
    return tmp_path / "data"


def tiny_config(data: Path, out: Path, *extra: str):
    """The original's flat keys where they exist, so the tests also exercise that path."""
    return load_config(None, [
        *TINY_MODEL,
        f"--dataset_path={data / 'train'}", f"--eval_path={data / 'val'}", f"--save_checkpoint_path={out}",
        "--class_num=3", "--batch_size=8", "--eval_batch_size=5", "--train_num_workers=0", "--eval_num_workers=0",
        "--max_epoch=2", "--warmup_epochs=1", "--lr_max=0.001", "--save_checkpoint_epochs=1", "--autoaugment=0",
        "--logging.progress=plain", *extra,
    ])
