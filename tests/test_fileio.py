"""Atomic writes: the file appears whole or not at all, with the permissions any other new file would get."""
import os

import pytest

from vitkit.fileio import atomic_path


def test_an_atomic_write_gets_the_umasks_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "weights.safetensors") as partial:
            partial.write_bytes(b"x")
        (tmp_path / "plain").write_bytes(b"x")  # what open() gives under the same umask
    finally:
        os.umask(previous)
    assert (tmp_path / "weights.safetensors").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    assert (tmp_path / "weights.safetensors").stat().st_mode & 0o777 == 0o644


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.json") as partial:
            partial.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
