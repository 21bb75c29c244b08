"""The picture commands end to end: `vitkit plot`, `vitkit eval --report` and `vitkit explain` on a trained run."""
import csv

import pytest
from PIL import Image

from conftest import tiny_config
from vitkit.cli import main
from vitkit.engine.trainer import Trainer

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import write_image_folder

    root = tmp_path_factory.mktemp("viz")
    write_image_folder(root / "data" / "train", {"ant": 12, "bee": 12, "cat": 12}, seed=1)
    write_image_folder(root / "data" / "val", {"ant": 4, "bee": 3, "cat": 4}, seed=2)
    Trainer(tiny_config(root / "data", root / "run", "--logging.log_interval=2")).fit()
    return root


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vitkit: error: "), err
    return err[0]


def test_plot_writes_the_runs_curves(run, capsys):
    assert main(["plot", str(run / "run")]) == 0
    with Image.open(run / "run" / "curves.png") as picture:
        assert picture.size == (1200, 800)


def test_plot_of_a_folder_without_a_run_is_one_error_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl or steps.jsonl" in one_error_line(capsys)


def test_eval_report_counts_every_validation_image(run, tmp_path, capsys):
    report = tmp_path / "report"
    assert main(["eval", "--model", str(run / "run"), "--data", str(run / "data" / "val"), "--report", str(report),
                 "--eval_image_size=32", "--eval_num_workers=0"]) == 0
    top1 = float(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("accuracy="))[9:])
    with open(report / "per_class.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["class"] for row in rows] == ["ant", "bee", "cat"]
    assert [int(row["support"]) for row in rows] == [4, 3, 4]
    assert sum(int(row["correct"]) for row in rows) / 11 == pytest.approx(top1, abs=1e-6)
    for name in ("confusion_matrix.png", "misclassified.png"):
        with Image.open(report / name) as picture:
            picture.load()


def test_explain_writes_the_attention_picture(run, tmp_path, capsys):
    image = next((run / "data" / "val" / "bee").iterdir())
    out = tmp_path / "explain.png"
    assert main(["explain", str(image), "--model", str(run / "run"), "--out", str(out)]) == 0
    assert "top-1" in capsys.readouterr().out
    with Image.open(out) as picture:
        assert picture.size == (1400, 600)


def test_explain_of_a_file_that_is_no_image_is_one_error_line(run, tmp_path, capsys):
    fake = tmp_path / "notes.png"
    fake.write_text("not an image")
    assert main(["explain", str(fake), "--model", str(run / "run")]) == 2
    assert "notes.png" in one_error_line(capsys)
