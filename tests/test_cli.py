"""The `vitkit` command as a user runs it: the real entry point, its output and its exit codes."""
import subprocess
import sys
from pathlib import Path

import yaml

from vitkit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_models_lists_every_preset_with_the_originals_parameter_count(capsys):
    assert main(["models", "--num-classes", "1001"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:-1]}
    assert len(rows) == 10
    name, patch, width, depth, heads, image, params, gmacs, gflops = rows["vit_base_patch32"]
    assert (patch, width, depth, heads, image, params) == ("32", "768", "12", "12", "224", "88,225,001")
    assert float(gflops) == 2 * float(gmacs)


def test_python_dash_m_config_resolves_an_original_file_with_a_flat_override():
    result = subprocess.run(
        [sys.executable, "-m", "vitkit", "config", "--config_path",
         "configs/vit_patch32_imagenet2012_config_standalone.yml", "--batch_size=64"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert resolved["data"]["batch_size"] == 64
    assert resolved["schedule"]["lr_max"] == 0.00044375 and resolved["data"]["num_workers"] == 4


def test_usage_mistakes_are_one_line_with_exit_status_2():
    result = subprocess.run([sys.executable, "-m", "vitkit", "trian"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("vitkit: error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
