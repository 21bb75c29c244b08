"""plot_runs: training curves from hand-written run folders, and its one-line errors."""
import json
import sys

import numpy as np
import pytest
from PIL import Image

from vitkit.errors import VitkitError
from vitkit.viz import plot
from vitkit.viz.plot import plot_runs, read_run, train_series

STEPS_PER_EPOCH = 4


def _write_jsonl(path, records, tail=""):
    path.write_text("".join(json.dumps(record) + "\n" for record in records) + tail)


def _metrics(epochs, evaluated=(), base_loss=2.0, fps=100.0):
    records = []
    for epoch in range(epochs):
        record = {"epoch": epoch, "epoch_time": 10.0, "step_time": 2.5, "loss": base_loss / (epoch + 1),
                  "lr": 0.001 * (epoch + 1), "fps": fps + epoch, "failed_images": 0}
        if epoch in evaluated:
            record.update(accuracy=0.3 + 0.1 * epoch, top5=0.6 + 0.1 * epoch, eval_images=50, eval_cost=1.0)
        records.append(record)
    return records


def _steps(epochs):
    records = []
    for epoch in range(epochs):
        for step in (2, 4):
            global_step = epoch * STEPS_PER_EPOCH + step
            records.append({"epoch": epoch, "step": step, "steps": STEPS_PER_EPOCH, "global_step": global_step,
                            "loss": 2.0 / global_step, "lr": 0.0005 * global_step, "img_s": 90.0, "data_wait": 0.1,
                            "grad_norm": 1.5, "loss_scale": None, "time": float(global_step)})
    return records


@pytest.fixture
def two_runs(tmp_path):
    new, old = tmp_path / "run_new", tmp_path / "run_old"
    new.mkdir()
    old.mkdir()
    _write_jsonl(new / "metrics.jsonl", _metrics(3, evaluated=(1, 2)))
    _write_jsonl(new / "steps.jsonl", _steps(3))
    _write_jsonl(old / "metrics.jsonl", _metrics(3, evaluated=(0, 1, 2), base_loss=3.0, fps=50.0))
    return new, old


def _has_colour(pixels, hex_colour, tolerance=8):
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels.astype(int) - rgb).max(axis=-1) <= tolerance).sum())


def test_two_runs_make_one_png_of_the_expected_size_with_both_colours(two_runs, tmp_path):
    out = plot_runs(list(two_runs), tmp_path / "curves" / "runs.png", names=["new", "old"])
    assert out == tmp_path / "curves" / "runs.png"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (1200, 800)
        pixels = np.asarray(image.convert("RGB"))
    # Each run is drawn in its own colour: matplotlib's C0 (blue) and C1 (orange), in many pixels each.
    assert _has_colour(pixels, "#1f77b4") > 200
    assert _has_colour(pixels, "#ff7f0e") > 200
    assert not list((tmp_path / "curves").glob(".*.tmp"))  # written through atomic_path, nothing left over


def test_a_single_run_with_steps_is_drawn_against_the_global_step(two_runs, tmp_path):
    run = read_run(two_runs[0])
    assert run.name == "run_new"  # default name: the folder's
    series = train_series(run, by_step=True)
    assert series["loss_steps"][0] == [2, 4, 6, 8, 10, 12]
    assert series["lr_steps"][1] == pytest.approx([0.0005 * s for s in (2, 4, 6, 8, 10, 12)])
    # Per-epoch records sit at the step that ended the epoch, (epoch + 1) * steps_per_epoch.
    assert series["loss_epochs"] == ([4.0, 8.0, 12.0], pytest.approx([2.0, 1.0, 2.0 / 3]))
    out = plot_runs([two_runs[0]], tmp_path / "one.png")
    with Image.open(out) as image:
        assert image.size == (1200, 800)


def test_without_steps_every_run_is_drawn_against_epochs():
    new = plot.Run("new", None, {e: r for e, r in enumerate(_metrics(2))}, _steps(2))
    series = train_series(new, by_step=False)
    assert series["loss_steps"][0] == pytest.approx([0.5, 1.0, 1.5, 2.0])  # epoch + step / steps
    assert series["loss_epochs"][0] == [1.0, 2.0]  # an epoch's record at its end: epoch + 1


def test_resumed_records_count_once_and_a_cut_last_line_is_dropped(tmp_path):
    run_dir = tmp_path / "resumed"
    run_dir.mkdir()
    first, again = _metrics(2), _metrics(2, base_loss=5.0)
    _write_jsonl(run_dir / "metrics.jsonl", first + again[1:], tail='{"epoch": 2, "loss"')
    _write_jsonl(run_dir / "steps.jsonl", _steps(1) + _steps(1))
    run = read_run(run_dir, "r")
    assert sorted(run.epochs) == [0, 1]
    assert run.epochs[1]["loss"] == 2.5  # the later record of epoch 1 wins
    assert [record["global_step"] for record in run.steps] == [2, 4]


def test_a_missing_path_is_a_one_line_error(tmp_path):
    with pytest.raises(VitkitError, match=r"nowhere does not exist: point at a training run's output folder"):
        plot_runs([tmp_path / "nowhere"], tmp_path / "out.png")


def test_a_folder_without_records_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitkitError) as raised:
        plot_runs([tmp_path / "empty"], tmp_path / "out.png")
    assert str(raised.value) == (f"no metrics.jsonl or steps.jsonl in {tmp_path / 'empty'}: point at a training "
                                 f"run's output folder (checkpoint.output_dir)")
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "out.png").exists()


def test_a_line_that_is_not_json_names_the_file_and_line(two_runs, tmp_path):
    steps = two_runs[0] / "steps.jsonl"
    lines = steps.read_text().splitlines()
    lines[2] = "{not json"
    steps.write_text("\n".join(lines) + "\n")
    with pytest.raises(VitkitError, match=rf"{steps} line 3 is not JSON: fix or delete that line"):
        plot_runs(list(two_runs), tmp_path / "out.png")
    (two_runs[1] / "metrics.jsonl").write_text('{"epoch": 0}\n[1, 2]\n')
    with pytest.raises(VitkitError, match=r"metrics.jsonl line 2 is not a JSON object"):
        read_run(two_runs[1])


def test_names_must_match_the_runs(two_runs, tmp_path):
    with pytest.raises(VitkitError, match=r"^1 names for 2 run folders: pass one name per run folder$"):
        plot_runs(list(two_runs), tmp_path / "out.png", names=["only"])
    with pytest.raises(VitkitError, match="no run folders to plot"):
        plot_runs([], tmp_path / "out.png")


def test_an_oversized_file_is_refused_unread(two_runs, tmp_path, monkeypatch):
    monkeypatch.setattr(plot, "MAX_FILE_BYTES", 100)
    with pytest.raises(VitkitError, match=r"metrics.jsonl is 0 MiB, over the 0 MiB a plot reads"):
        plot_runs([two_runs[1]], tmp_path / "out.png")


def test_missing_matplotlib_says_how_to_install_it(two_runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(VitkitError, match=r"^plot_runs needs matplotlib: pip install 'vitkit\[viz\]'$"):
        plot_runs([two_runs[1]], tmp_path / "out.png")
