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
    from vitkit.model.loading import model_for_config, read_weights, save_model

    overrides = {key: value for key, value in (("num_heads", args.num_heads), ("image_size", args.image_size)) if value}
    cfg = _deploy_config(args)  # the run's config: its head count and components, for files that cannot say them
    weights = read_weights(_ema_or_given(args, args.src))
    model, card = model_for_config(weights, cfg.model if cfg is not None else None, with_card=True, **overrides)
    save_model(model.eval(), args.dst, card=card)
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
    from vitkit.engine.preemption import Preempted

    extra = [f"--train.resume={args.resume}"] if args.resume else []
    try:
        train(load_config(args.config_path, args.overrides + extra))
    except Preempted as stop:
        print(f"vitkit: stopped: {stop}", file=sys.stderr)
        return stop.exit_code
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json
    import time

    from vitkit.config import load_config
    from vitkit.engine.evaluate import evaluate_checkpoint
    from vitkit import storage

    extra = [f"--model.pretrained={args.model}"] if args.model else []
    extra += [f"--data.val_path={args.data}"] if args.data else []
    cfg = load_config(args.config_path, args.overrides + extra)
    storage.configure_from(cfg)  # before --ema looks for the EMA file beside a remote model
    if args.ema:
        ema_path = _ema_or_given(args, cfg.model.pretrained)
        cfg = load_config(args.config_path, args.overrides + extra + [f"--model.pretrained={ema_path}"])
    storage.localize_inputs(cfg, ("data.val_path",))  # a remote --model is fetched by the loader
    started = time.perf_counter()
    with storage.local_folder_for(args.report or "") as report_dir:
        result, model_path = evaluate_checkpoint(cfg, cfg.model.pretrained, report_dir=str(report_dir or ""))
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
    if args.report and not args.json:
        print(f"report in {args.report}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vitkit.viz.plot import plot_runs

    out = args.out or str(Path(args.runs[0]) / "curves.png")
    print(f"wrote {plot_runs(args.runs, out, names=args.names)}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from vitkit.config import load_config
    from vitkit.engine.checkpoint import newest_weights
    from vitkit.model.loading import load_model
    from vitkit.viz.explain import explain_image

    cfg = load_config(args.config_path, args.overrides)
    model, card = load_model(newest_weights(args.model), with_card=True)
    result = explain_image(model, args.image, args.out, normalization=cfg.data.normalization,
                           interpolation=cfg.data.interpolation, resize_size=cfg.eval.resize_size)
    label = card.class_names[result["top1"]] if card.class_names else result["top1"]
    print(f"wrote {result['path']}: top-1 {label} ({result['probability']:.1%})")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    _configure_endpoint(args)
    if args.dataset == "shard":
        return _cmd_data_shard(args)
    if args.dest is not None:
        raise VitkitError(f"unrecognized arguments: {args.dest}: `vitkit data fashion-mnist` takes one folder")
    from vitkit.data.fashion_mnist import write_fashion_mnist

    source = {"source_dir": args.source} if args.source else {}
    summary = write_fashion_mnist(args.out, limit_per_split=args.limit, **source)
    print(f"Fashion-MNIST in {summary['out_dir']}: {summary['train']} training images in train/, "
          f"{summary['val']} validation images in val/, {len(summary['classes'])} classes")
    return 0


def _cmd_data_shard(args: argparse.Namespace) -> int:
    from vitkit.data.archives import DEFAULT_MAX_SHARD_BYTES, write_shards

    if args.dest is None:
        raise VitkitError("`vitkit data shard SRC DEST` needs DEST: the folder (or s3://...) to write the shards to")
    summary = write_shards(args.out, args.dest, shard_size=args.shard_size,
                           max_shard_bytes=args.max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)
    skipped = f", {summary['skipped']} unreadable files skipped" if summary["skipped"] else ""
    print(f"{summary['samples']} images of {summary['classes']} classes in {summary['shards']} shards and "
          f"index.json in {summary['dest']}{skipped}")
    return 0


def _deploy_config(args: argparse.Namespace):
    """The config when one was given (a file or any override), else None. The keys it sets override the model's
    own preprocessing metadata; the rest comes from the model."""
    from vitkit.config import load_config

    from vitkit import storage

    if args.config_path is None and not args.overrides:
        return None
    cfg = load_config(args.config_path, args.overrides)
    storage.configure_from(cfg)  # --storage.endpoint_url for the remote paths that follow
    return cfg


def _cmd_export(args: argparse.Namespace) -> int:
    from vitkit import storage
    from vitkit.config import load_config

    extra = [f"--export.ckpt_file={args.model}"] if args.model else []
    cfg = load_config(args.config_path, args.overrides + extra)
    storage.configure_from(cfg)  # before --ema looks for the EMA file beside a remote model
    if args.ema:
        checkpoint = _ema_or_given(args, cfg.export.ckpt_file or cfg.model.pretrained)
        cfg = load_config(args.config_path, args.overrides + extra + [f"--export.ckpt_file={checkpoint}"])
    if cfg.export.int8 and cfg.export.file_format != "ONNX":
        raise VitkitError("export.int8 quantizes ONNX models only: set file_format=ONNX or drop export.int8")
    for note in cfg.notes:
        print(f"note: {note}")
    parent, _, name = cfg.export.file_name.rpartition("/")
    # A URL target: the file (and its int8 copy) is written and checked locally, then uploaded whole.
    with storage.local_folder_for(parent if storage.is_url(parent) else "") as folder:
        if folder:
            cfg.export.file_name = os.path.join(folder, name)
        result = _export_and_report(cfg)
    if folder:
        print(f"uploaded to {parent}/{result.path.name}")
    return 0


def _export_and_report(cfg):
    from vitkit.deploy.export import export_checkpoint

    result = export_checkpoint(cfg)
    shape = ", ".join(str(dim) for dim in result.input_shape)
    batch = result.input_shape[0]
    kind = f"ONNX opset {result.opset}" if result.file_format == "ONNX" else "torch.export program"
    print(f"wrote {result.path} ({kind}): input 'images' float32 [{shape}], {result.input_normalization} RGB, NCHW; "
          f"output 'logits' [{batch}, {result.num_classes}]")
    if result.op_counts is not None:
        ops = ", ".join(f"{name} {count}" for name, count in result.op_counts.most_common())
        print(f"ONNX ops: {ops}")
        print(f"attention: {result.attention_summary}")
    checked = ", ".join("x".join(str(d) for d in shape) for shape in result.checked_inputs)
    print(f"max |exported - pytorch| logit difference: {result.max_abs_diff:.3g} on {checked} (limit 1e-4)")
    if cfg.export.int8:
        _report_int8(result.path)
    return result


def _report_int8(path) -> None:
    from vitkit.deploy.quantize import logit_difference, quantize_int8

    target = quantize_int8(path)
    print(f"wrote {target} (int8 dynamic quantization of MatMul/Gemm): max logit difference to fp32 "
          f"{logit_difference(path, target):.3g} on a random input; run vitkit infer with each for the accuracy change")


def _cmd_infer(args: argparse.Namespace) -> int:
    import json

    from vitkit.deploy.infer import infer_folder, resolve_preprocessing
    from vitkit.deploy.onnx_runtime import OnnxModel

    cfg = _deploy_config(args)
    model = OnnxModel(_local_model(args.model), threads=args.threads)
    side = None if model.dynamic_size else model.image_size[0]
    preprocessing = resolve_preprocessing(model.card.preprocessing, cfg, side)
    batch_size = args.batch_size or model.batch_size or 32
    workers = args.workers if args.workers is not None else (cfg.eval.num_workers if cfg else 1)
    max_pixels = {"max_image_pixels": cfg.data.max_image_pixels} if cfg is not None else {}
    from vitkit import storage

    with storage.local_folder_for(args.save_logits or "") as logits_dir:
        result = infer_folder(model, storage.local_input(args.data), preprocessing, batch_size, workers,
                              logits_dir or None, **max_pixels)
    if args.json:
        record = {"images": result.images, "skipped": result.skipped, "infer_seconds": round(result.seconds, 4)}
        if result.accuracy is not None:
            accuracy = result.accuracy
            record.update(top1=accuracy.top1, top5=accuracy.top5, correct1=accuracy.correct1, correct5=accuracy.correct5)
        print(json.dumps(record))
        return 0
    if result.accuracy is not None:
        print(result.accuracy.line())
    else:
        print(f"Total data: {result.images} (a folder without class subfolders: no accuracy)")
    print(result.latency_line())
    if result.skipped:
        print(f"skipped {result.skipped} unreadable image(s)")
    if args.save_logits:
        print(f"wrote {result.images} result files <image name>_0.bin to {args.save_logits}")
    return 0


def _cmd_postprocess(args: argparse.Namespace) -> int:
    from vitkit import storage
    from vitkit.deploy.postprocess import postprocess

    _configure_endpoint(args)
    result_path = storage.local_input(args.result_path)
    print(postprocess(result_path, storage.local_input(args.label_path, is_data=False)).line())
    return 0


def _cmd_labels(args: argparse.Namespace) -> int:
    from vitkit import storage
    from vitkit.deploy.labels import write_label_file

    _configure_endpoint(args)
    total = write_label_file(storage.local_input(args.img_path), args.output)
    print(f"[INFO] Completed! Total {total} data.")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import json

    from vitkit.deploy.predict import predict, read_class_names

    names = read_class_names(args.labels) if args.labels else None
    cfg = _deploy_config(args)
    predictions = predict(_local_model(_ema_or_given(args, args.model)), args.images, cfg, names)
    if args.json:
        print(json.dumps([prediction.as_dict() for prediction in predictions]))
        return 0
    for prediction in predictions:
        print(prediction.image)
        for index, name, probability in prediction.top:
            print(f"  {probability:8.4f}  {name} ({index})")
    return 0


def _local_model(path: str) -> str:
    """A remote model file (an .onnx, a .pt2, a checkpoint) as its local copy; a local path as it is."""
    from vitkit import storage

    return storage.local_input(path, is_data=False)


def _ema_or_given(args: argparse.Namespace, path: str) -> str:
    """With --ema, the EMA weights saved beside the training checkpoint `path` names (or a run folder's newest)."""
    if not args.ema:
        return path
    if not path:
        raise VitkitError("--ema needs a training checkpoint or run folder: pass --model PATH")
    from vitkit.engine.checkpoint import ema_weights

    return ema_weights(path)


def _add_endpoint_flag(parser: argparse.ArgumentParser) -> None:
    """The config key storage.endpoint_url, for the commands that read no config."""
    parser.add_argument("--storage.endpoint_url", dest="endpoint_url", default="",
                        help="S3-compatible endpoint for s3:// and obs:// paths (default: AWS_ENDPOINT_URL)")


def _configure_endpoint(args: argparse.Namespace) -> None:
    from vitkit import storage

    storage.configure(args.endpoint_url)


def _add_ema_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ema", action="store_true",
                        help="use the EMA weights a run with train.ema_decay saved beside the checkpoint "
                        "(<name>.ema.safetensors; for a run folder, its newest checkpoint's)")


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
    evaluate.add_argument("--report", default=None, metavar="DIR",
                          help="also write a confusion matrix, per-class CSV, confused pairs and misclassified images")
    _add_ema_flag(evaluate)
    evaluate.set_defaults(run=_cmd_eval, takes_overrides=True)

    plot = commands.add_parser("plot", help="PNG curves (loss, lr, top-1/top-5, img/s) of one or more training runs")
    plot.add_argument("runs", nargs="+", help="training run folders (checkpoint.output_dir)")
    plot.add_argument("--out", default=None, help="the PNG to write (default: curves.png in the first run folder)")
    plot.add_argument("--names", nargs="+", default=None, help="legend names, one per run (default: folder names)")
    plot.set_defaults(run=_cmd_plot)

    explain = commands.add_parser("explain", help="attention rollout and the last block's head maps over an image")
    _add_config_path(explain)
    explain.add_argument("image", help="an image file")
    explain.add_argument("--model", required=True, help="checkpoint of any format vitkit reads, or a run folder")
    explain.add_argument("--out", default="explain.png", help="the PNG to write (default: explain.png)")
    explain.set_defaults(run=_cmd_explain, takes_overrides=True)

    data = commands.add_parser("data", help="write a real dataset as an image folder, or a split as WebDataset shards")
    data.add_argument("dataset", choices=["fashion-mnist", "shard"],
                      help="fashion-mnist (from the Debian package dataset-fashion-mnist), or shard: `data shard SRC "
                           "DEST` writes the split SRC (image folder, .tar or shards) as tar shards and index.json")
    data.add_argument("out", help="output folder (gets train/ and val/); for shard: SRC")
    data.add_argument("dest", nargs="?", default=None, help="shard only: DEST, a folder or s3://bucket/prefix")
    data.add_argument("--shard-size", "--shard_size", dest="shard_size", type=int, default=None,
                      help="shard only: at most this many images per shard")
    data.add_argument("--max-shard-bytes", "--max_shard_bytes", dest="max_shard_bytes", type=int, default=None,
                      help="shard only: at most this many bytes per shard (default 1 GiB)")
    data.add_argument("--limit", type=int, default=None, help="at most this many images per class and split")
    data.add_argument("--source", default=None,
                      help="folder of the four IDX .gz files (default: where the Debian package puts them)")
    _add_endpoint_flag(data)
    data.set_defaults(run=_cmd_data)

    convert = commands.add_parser("convert", help="re-save any checkpoint vitkit reads (.safetensors, .pth, .ckpt out)")
    convert.add_argument("src", help="a checkpoint: safetensors, PyTorch .pth/.pt (timm or vitkit), MindSpore .ckpt")
    convert.add_argument("dst", help="the output: .safetensors (recommended), .pth, or .ckpt (MindSpore)")
    convert.add_argument("--num-heads", type=int, default=None, help="head count, when the file cannot say it")
    convert.add_argument("--image-size", type=int, default=None, help="resample position embeddings to this size")
    _add_config_path(convert)
    _add_ema_flag(convert)
    convert.set_defaults(run=_cmd_convert)

    export = commands.add_parser(
        "export", help="export a checkpoint to ONNX or torch.export (.pt2) and check it against PyTorch",
        description="The original's export keys work as overrides: --pretrained/--ckpt_file, --batch_size, "
        "--file_name, --file_format (ONNX or PT2); and --export.opset, --export.dynamic_batch, "
        "--export.dynamic_image_size, --export.image_size, --export.int8 (see `vitkit config`).",
    )
    _add_config_path(export)
    export.add_argument("--model", default=None, help="checkpoint or run folder to export (else ckpt_file / pretrained)")
    _add_ema_flag(export)
    export.set_defaults(run=_cmd_export, takes_overrides=True)

    infer = commands.add_parser(
        "infer", help="ONNX Runtime over an image folder: the original's top-1/top-5 and latency lines",
        description="Preprocessing is the one the model was exported with, or the config's when --config_path "
        "or an override (--eval.resize_size=28) is given.",
    )
    _add_config_path(infer)
    infer.add_argument("--model", required=True, help="an .onnx file from vitkit export")
    infer.add_argument("--data", required=True, help="image folder: class subfolders (gives accuracy) or plain images")
    infer.add_argument("--batch-size", type=int, default=None, help="images per run (default: the model's, or 32)")
    infer.add_argument("--workers", type=int, default=None, help="image decoding processes (default 1)")
    infer.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default: one per usable core)")
    infer.add_argument("--save-logits", "--save_logits", dest="save_logits", default=None,
                       help="folder for the original's per-image <name>_0.bin float32 logits")
    infer.add_argument("--json", action="store_true", help="print one JSON object instead of the original's lines")
    infer.set_defaults(run=_cmd_infer, takes_overrides=True)

    post = commands.add_parser("postprocess", help="top-1/top-5 from <name>_0.bin result files and a label file")
    post.add_argument("--result_path", "--result-path", dest="result_path", required=True, help="folder of _0.bin files")
    post.add_argument("--label_path", "--label-path", dest="label_path", required=True,
                      help="label JSON from `vitkit labels` ({file name: class index})")
    post.add_argument("--dataset", default=None, help="ignored, as in the original")
    _add_endpoint_flag(post)
    post.set_defaults(run=_cmd_postprocess)

    labels = commands.add_parser("labels", help="write the original's imagenet_label.json for an image folder")
    labels.add_argument("--img_path", "--img-path", dest="img_path", required=True, help="folder of class subfolders")
    labels.add_argument("--output", default="imagenet_label.json", help="where to write it (default: as the original)")
    _add_endpoint_flag(labels)
    labels.set_defaults(run=_cmd_labels)

    predict = commands.add_parser("predict", help="top-5 classes with probabilities for images")
    _add_config_path(predict)
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--model", required=True, help="checkpoint, run folder, .onnx or .pt2")
    predict.add_argument("--labels", default=None, help="class names, one per line (default: the model's own)")
    predict.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_ema_flag(predict)
    predict.set_defaults(run=_cmd_predict, takes_overrides=True)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"vitkit: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    # Loader workers share the CPU with the training threads; spinning OpenMP threads then stall each other.
    # Sleeping waits give the cores back to the worker, which matters most on a machine with few cores.
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
