"""benchmarks/gpu_check.sh in its CPU smoke mode: every step runs at toy sizes and writes its figures."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vitkit.data.fashion_mnist import DEFAULT_SOURCE_DIR

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not Path(DEFAULT_SOURCE_DIR).is_dir(), reason="needs apt-get install dataset-fashion-mnist")
def test_gpu_check_smoke_mode_runs_every_step(tmp_path):
    pytest.importorskip("skimage")  # benchmarks/make_jpegs.py's photographs
    env = {**os.environ, "SMOKE": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "skipped" in summary["cuda_tests"] and "failed" not in summary["cuda_tests"]  # no GPU here: all skipped
    (step,) = summary["train_step"]
    assert step["model"] == "vit_tiny_patch16" and step["vitkit_img_s"] > 0 and step["timm_img_s"] > 0
    end_to_end = summary["end_to_end"]
    assert end_to_end["workers_img_s"] > 0 and end_to_end["device_img_s"] > 0 and end_to_end["synthetic_img_s"] > 0
    (inference,) = summary["inference"]
    assert inference["img_s"]["vitkit eager"] > 0 and inference["mode"] == "eager" and inference["ratio"] > 0
    demo = summary["demo"]
    assert demo["epochs"] == 1 and 0 <= demo["top1"] <= 1
    # One evaluated epoch: 88 % is reached after its training time, or not at all.
    assert demo["seconds_to_88"] == (demo["train_seconds"] if demo["top1"] >= 0.88 else None)
    memory = summary["memory"]
    assert [row["grad_checkpointing"] for row in memory] == [False, True]
    assert all(row["peak_rss_mib"] >= row["rss_before_step_mib"] > 0 for row in memory)
    log = (tmp_path / "log.txt").read_text()
    assert "== 5. Fashion-MNIST demo" in log and "Traceback" not in log
