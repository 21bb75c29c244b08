"""Hostile configs: YAML bombs, absurd numbers and huge values must each give one short `vitkit: error:` line, fast."""
import time

import pytest

from vitkit.cli import main
from vitkit.config import OPTIONS

# The longest error line any of these probes may print: the message, never the value in full.
MAX_LINE = 600
# How long one refusal may take. The bound is there to catch unbounded work (a YAML bomb expanded, a huge number
# converted or a range looped over takes minutes or never ends), not to time the check: a CI machine shared with
# other jobs takes several seconds for a refusal that takes a fraction of one alone.
REFUSAL_SECONDS = 30.0


def one_error_line(argv, capsys, seconds=REFUSAL_SECONDS) -> str:
    started = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 2, err[:MAX_LINE]
    assert err.startswith("vitkit: error: ") and err.count("\n") == 1, err[:MAX_LINE]
    assert len(err) <= MAX_LINE, err[:MAX_LINE]
    assert elapsed < seconds, elapsed
    return err


def config_file(tmp_path, text: str, name: str = "hostile.yml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def laughs(levels: int = 9) -> str:
    """The billion laughs as a flow sequence: each level is nine aliases of the one before, 9**levels leaves."""
    parts = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    parts += [f"&l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]" for level in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


def test_a_billion_laughs_value_is_refused_not_expanded(tmp_path, capsys):
    path = config_file(tmp_path, f"batch_size: {laughs()}\n")
    err = one_error_line(["config", "--config_path", path], capsys)
    assert "alias" in err and "line 1" in err
    # On the command line a value YAML does not read stays text ('*.onnx' is a name, not an alias): not a number.
    err = one_error_line(["config", f"--batch_size={laughs()}"], capsys)
    assert "expects an integer" in err and "--batch_size" in err
    assert main(["config", "--export.file_name=*.onnx"]) == 0 and "file_name: '*.onnx'" in capsys.readouterr().out


def test_anchors_and_aliases_are_refused_even_where_small(tmp_path, capsys):
    path = config_file(tmp_path, "batch_size: &size 64\neval_batch_size: *size\n")
    err = one_error_line(["config", "--config_path", path], capsys)
    assert "alias" in err and "line 2" in err


@pytest.mark.parametrize("nested", ["[" * 20000 + "]" * 20000, "{a: " * 20000 + "1" + "}" * 20000,
                                    "\n" + "- " * 20000 + "1"], ids=["lists", "mappings", "block"])
def test_deep_nesting_is_refused(tmp_path, capsys, nested):
    path = config_file(tmp_path, f"batch_size: {nested}\n")
    assert "nested deeper than 64" in one_error_line(["config", "--config_path", path], capsys)
    assert "expects an integer" in one_error_line(["config", f"--batch_size={nested}"], capsys)
    assert main(["config", "--config_path", config_file(tmp_path, "data:\n  batch_size: 8\n", "ok.yml")]) == 0


def test_a_config_file_over_a_mebibyte_is_refused(tmp_path, capsys):
    path = config_file(tmp_path, "batch_size: 64\n" + "# padding\n" * 120_000)
    assert "1 MiB" in one_error_line(["config", "--config_path", path], capsys)
    small = config_file(tmp_path, "batch_size: 64\n" + "# pad\n" * 1000, "ok.yml")
    assert main(["config", "--config_path", small]) == 0


def test_errors_never_echo_a_long_value_or_key(tmp_path, capsys):
    long = "x" * 100_000
    probes = [
        ["config", f"--batch_size={long}"],
        ["config", f"--data.augment={long}"],
        ["config", f"--{long}=1"],
        ["config", f"--{long}"],
        ["config", long],
        ["config", "--batch_size=" + "9" * 5000],  # past Python's 4300-digit int conversion limit
        ["config", f"--backbone={long}"],
        ["config", "--config_path", config_file(tmp_path, f"batch_size: '{long}'\n", "a.yml")],
        ["config", "--config_path", config_file(tmp_path, f"{long}: 1\n", "b.yml")],
        ["config", "--config_path", config_file(tmp_path, f"data: '{long}'\n", "c.yml")],
        ["config", "--config_path", config_file(tmp_path, f"{long}:\n  a: 1\n", "d.yml")],
        ["config", "--config_path", config_file(tmp_path, "batch_size: " + "9" * 5000 + "\n", "e.yml")],
        ["config", "--config_path", config_file(tmp_path, f"batch_size: [{', '.join(['1'] * 50_000)}]\n", "f.yml")],
    ]
    for argv in probes:
        one_error_line(argv, capsys)


# (override, key named in the error): values the options used to take, which allocate or loop without end.
ABSURD = [
    ("--max_epoch=1000000000000000000", "schedule.max_epoch"),
    ("--warmup_epochs=1e18", "schedule.warmup_epochs"),
    ("--model.image_size=2240000000", "model.image_size"),
    ("--eval_image_size=2240000000", "eval.image_size"),
    ("--eval.resize_size=2240000000", "eval.resize_size"),
    ("--export.image_size=2240000000", "export.image_size"),
    ("--batch_size=1000000000000", "data.batch_size"),
    ("--eval_batch_size=1000000000000", "eval.batch_size"),
    ("--export.batch_size=1000000000", "export.batch_size"),
    ("--train_num_workers=100000", "data.num_workers"),
    ("--eval_num_workers=100000", "eval.num_workers"),
    ("--class_num=1000000000000", "model.num_classes"),
    ("--model.patch_size=1000000", "model.patch_size"),
    ("--model.embed_dim=1000000000", "model.embed_dim"),
    ("--model.depth=1000000000", "model.depth"),
    ("--model.num_heads=1000000000", "model.num_heads"),
    ("--model.mlp_dim=1000000000", "model.mlp_dim"),
    ("--data.randaugment_ops=1000000000", "data.randaugment_ops"),
    ("--data.max_image_pixels=1000000000000", "data.max_image_pixels"),
    ("--distributed.timeout_s=" + "9" * 30, "distributed.timeout_s"),
    ("--train.seed=" + "9" * 30, "train.seed"),
]


@pytest.mark.parametrize("override, key", ABSURD, ids=[key for _, key in ABSURD])
def test_options_that_allocate_or_loop_have_upper_bounds(capsys, override, key):
    err = one_error_line(["config", override], capsys)
    assert key in err and ("<=" in err or "in [" in err or "in (" in err), err
    option = OPTIONS[key]
    bound = option.le if option.le is not None else option.lt
    assert bound is not None and f"{bound}" in err


def test_the_bounds_themselves_are_accepted(capsys):
    at_bounds = [f"--{key}={option.le}" for key, option in OPTIONS.items() if option.le is not None]
    assert "--schedule.max_epoch=100000" in at_bounds and "--model.image_size=16384" in at_bounds
    assert main(["config", *at_bounds]) == 0, capsys.readouterr().err


def test_every_option_that_sizes_memory_or_a_loop_is_bounded():
    sizing = ["model.num_classes", "model.image_size", "model.patch_size", "model.embed_dim", "model.depth",
              "model.num_heads", "model.mlp_dim", "data.batch_size", "data.num_workers", "data.randaugment_ops",
              "data.max_image_pixels", "schedule.max_epoch", "schedule.warmup_epochs", "eval.image_size",
              "eval.resize_size", "eval.batch_size", "eval.num_workers", "export.batch_size", "export.image_size",
              "distributed.timeout_s", "train.seed"]
    assert [key for key in sizing if OPTIONS[key].le is None and OPTIONS[key].lt is None] == []
    assert OPTIONS["schedule.max_epoch"].le <= 100_000 and OPTIONS["model.image_size"].le <= 16384
