"""The `vitkit` command: parses arguments, runs one subcommand, turns user errors into one line and exit status 2."""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from vitkit.errors import VitkitError


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line naming the fix rather than the whole usage text."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # an override like --class_num must never match an option's prefix
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise VitkitError(f"{message}: see `{self.prog} --help`")


def _cmd_models(args: argparse.Namespace) -> int:
    from vitkit.model.summary import preset_rows

    header = f"{'name':<20} {'patch':>5} {'width':>5} {'depth':>5} {'heads':>5} {'image':>5} {'params':>12} {'GMACs':>8} {'GFLOPs':>8}"
    print(header)
    print("-" * len(header))
    for row in preset_rows(num_classes=args.num_classes):
        print(
            f"{row['name']:<20} {row['patch']:>5} {row['width']:>5} {row['depth']:>5} {row['heads']:>5} "
            f"{row['image']:>5} {row['params']:>12,} {row['gmacs']:>8.2f} {row['gflops']:>8.2f}"
        )
    print(f"parameters with a {args.num_classes}-class head; GMACs/GFLOPs per image at the default size (1 MAC = 2 FLOPs)")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from vitkit.config import dump_yaml, load_config

    print(dump_yaml(load_config(args.config_path, args.overrides)), end="")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from vitkit.model.loading import load_model, save_model

    overrides = {key: value for key, value in (("num_heads", args.num_heads), ("image_size", args.image_size)) if value}
    model = load_model(args.src, **overrides)
    save_model(model, args.dst)
    params = sum(p.numel() for p in model.parameters())
    arch = model.arch
    print(
        f"wrote {args.dst}: ViT patch {arch.patch_size}, width {arch.embed_dim}, depth {arch.depth}, "
        f"heads {arch.num_heads}, image {arch.image_size}, {arch.num_classes} classes, {params:,} parameters"
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from vitkit.config import load_config
    from vitkit.engine.trainer import train

    # Options that are config keys under another name join the overrides, so the config checks them once.
    extra = [f"--train.resume={args.resume}"] if args.resume else []
    train(load_config(args.config_path, args.overrides + extra))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json
    import time

    from vitkit.config import load_config
    from vitkit.engine.evaluate import evaluate_checkpoint

    extra = [f"--model.pretrained={args.model}"] if args.model else []
    extra += [f"--data.val_path={args.data}"] if args.data else []
    cfg = load_config(args.config_path, args.overrides + extra)
    started = time.perf_counter()
    result, model_path = evaluate_checkpoint(cfg, cfg.model.pretrained)
    cost = time.perf_counter() - started
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun every rank holds the same all-reduced result: rank 0 alone prints it
    if args.json:
        print(json.dumps({**result.as_dict(), "eval_cost": round(cost, 3), "model": model_path}))
    else:
        print(f"model={model_path}")
        print(f"accuracy={result.top1:.6f}")
        print(f"top5 accuracy={result.top5:.6f}")
        print(f"images={result.total}, skipped={result.failed}, eval_cost={cost:.2f}s")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from vitkit.data.fashion_mnist import write_fashion_mnist

    summary = write_fashion_mnist(args.out, limit_per_split=args.limit)
    print(f"Fashion-MNIST in {summary['out_dir']}: {summary['train']} training images in train/, "
          f"{summary['val']} validation images in val/, {len(summary['classes'])} classes")
    return 0


def _add_config_path(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config_path", "--config-path", "-c", dest="config_path", default=None,
                        help="a YAML config: the original's flat form or the nested one")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="vitkit", description="Train, evaluate and deploy Vision Transformers.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    commands.required = True

    models = commands.add_parser("models", help="list the model presets with their size and cost")
    models.add_argument("--num-classes", type=int, default=1000, help="head size used for the parameter count")
    models.set_defaults(run=_cmd_models)

    config = commands.add_parser(
        "config",
        help="print the fully resolved config as YAML",
        description="Resolve defaults, a YAML file (the original's flat form or the nested one) and overrides "
        "such as --batch_size=64 or --data.batch_size=64, then print the result.",
    )
    _add_config_path(config)
    config.set_defaults(run=_cmd_config, takes_overrides=True)

    train = commands.add_parser(
        "train", help="train a ViT on an image folder",
        description="Train from a config with overrides (--key=value, flat or dotted); see `vitkit config`.",
    )
    _add_config_path(train)
    train.add_argument("--resume", default=None, help="'auto' (newest checkpoint in the output folder) or a .pt path")
    train.set_defaults(run=_cmd_train, takes_overrides=True)

    evaluate = commands.add_parser("eval", help="top-1/top-5 of a checkpoint over a validation image folder")
    _add_config_path(evaluate)
    evaluate.add_argument("--model", default=None, help="checkpoint of any format vitkit reads (else model.pretrained)")
    evaluate.add_argument("--data", default=None, help="validation image folder (else data.val_path)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of the original's lines")
    evaluate.set_defaults(run=_cmd_eval, takes_overrides=True)

    data = commands.add_parser("data", help="write a real dataset as an image folder")
    data.add_argument("dataset", choices=["fashion-mnist"], help="the dataset (from the Debian package dataset-fashion-mnist)")
    data.add_argument("out", help="output folder; gets train/ and val/")
    data.add_argument("--limit", type=int, default=None, help="at most this many images per class and split")
    data.set_defaults(run=_cmd_data)

    convert = commands.add_parser("convert", help="re-save any checkpoint vitkit reads (.safetensors, .pth, .ckpt out)")
    convert.add_argument("src", help="a checkpoint: safetensors, PyTorch .pth/.pt (timm or vitkit), MindSpore .ckpt")
    convert.add_argument("dst", help="the output: .safetensors (recommended), .pth, or .ckpt (MindSpore)")
    convert.add_argument("--num-heads", type=int, default=None, help="head count, when the file cannot say it")
    convert.add_argument("--image-size", type=int, default=None, help="resample position embeddings to this size")
    convert.set_defaults(run=_cmd_convert)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"vitkit: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    # Loader workers share the CPU with the training threads; spinning OpenMP threads then stall each other.
    # Sleeping waits measured 1.44x more training images/s on 2 cores with a loader worker (BENCHMARKS.md).
    # It only takes effect before torch is imported, which is why nothing above imports it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    warnings.showwarning = _show_warning
    try:
        args, rest = parser.parse_known_args(argv)
        if rest and not getattr(args, "takes_overrides", False):
            raise VitkitError(f"unrecognized arguments: {' '.join(rest)}: see `vitkit {args.command} --help`")
        args.overrides = rest
        return args.run(args)
    except VitkitError as exc:
        print(f"vitkit: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("vitkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
