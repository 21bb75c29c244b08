"""Shared test helpers: small real image folders written with PIL, a tiny training config, a killed-and-resumed
run, the one-line error check and a free loopback port."""
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitkit.config import load_config
from vitkit.errors import VitkitError

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


def whole_and_resumed_runs(data: Path, tmp_path: Path, monkeypatch, extra: tuple, die_at_call: int):
    """Trains tiny_config plus `extra` twice: once whole, into tmp_path/whole, and once into tmp_path/killed,
    interrupted (KeyboardInterrupt) at the die_at_call-th training step and continued with --resume auto. Returns the
    two output folders, whose final checkpoints an exact resume makes equal."""
    from vitkit.engine.trainer import Trainer, train

    train(tiny_config(data, tmp_path / "whole", *extra))
    original_step = Trainer._train_step
    calls = {"n": 0}

    def dying_step(self, images, labels):
        calls["n"] += 1
        if calls["n"] == die_at_call:
            raise KeyboardInterrupt
        return original_step(self, images, labels)

    monkeypatch.setattr(Trainer, "_train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(data, tmp_path / "killed", *extra))
    monkeypatch.setattr(Trainer, "_train_step", original_step)
    train(tiny_config(data, tmp_path / "killed", *extra, "--train.resume=auto"))
    return tmp_path / "whole", tmp_path / "killed"


def one_line_error(call) -> str:
    """The message of the VitkitError that call() raises, which must be one line."""
    with pytest.raises(VitkitError) as raised:
        call()
    message = str(raised.value)
    assert "\n" not in message
    return message


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server the test starts on loopback."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
