"""Exact top-1/top-5: every image counted once, counts summed on the device (and across ranks)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from vitkit.data.archives import list_labelled
from vitkit.data.folder import ImageFolderDataset
from vitkit.data.loader import ShardSampler, build_loader, usable_workers
from vitkit.data.transforms import eval_transform, normalize_batch
from vitkit.engine.build import autocast_context, pick_device, resolve_precision, warn_on_other_normalization
from vitkit.engine.checkpoint import newest_weights
from vitkit.engine.distributed import setup_distributed
from vitkit.errors import VitkitError
from vitkit.faults import fault_point
from vitkit.progress import progress_bar
from vitkit.metrics import TopKCounts as EvalResult
from vitkit.model.loading import model_for_config, read_weights


def _is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _most_batches(batches: int, device: torch.device) -> int:
    count = torch.tensor([batches], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, loader, device: torch.device, precision: str = "fp32", normalization: str = "imagenet",
    progress: str = "plain", predictions: list | None = None,
) -> EvalResult:
    """Top-1/top-5 counts over the loader. `progress` is logging.progress (a bar on a terminal with 'auto');
    `predictions`, when given, receives one (dataset indices, labels, top-5 classes) triple of CPU tensors a batch."""
    was_training = model.training
    model.eval()
    hits_sum = torch.zeros(2, dtype=torch.int64, device=device)  # top-1 and top-5 hits, summed without a host sync
    total = failed_total = 0
    # An FSDP forward gathers each block from all ranks, so every rank must run as many forwards as the rank with
    # the most batches: a rank out of images (or with a batch of only unreadable ones) runs a blank image and
    # ignores the result. DDP and single models run their own batches alone.
    blank_forwards = _most_batches(len(loader), device) if _is_sharded(model) else 0
    bar = progress_bar(len(loader), "eval", progress, enabled=not dist.is_initialized() or dist.get_rank() == 0)
    for images, labels, indices, failed in loader:
        fault_point("eval_batch")
        bar.update(1)
        failed_total += failed
        if not images.shape[0]:
            continue
        blank_forwards -= 1
        images = normalize_batch(images.to(device, non_blocking=True), normalization=normalization)
        labels = labels.to(device, non_blocking=True)
        with autocast_context(precision, device):
            logits = model(images)
        ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = ranked == labels[:, None]
        hits_sum += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()])
        total += labels.shape[0]
        if predictions is not None:
            predictions.append((indices, labels.cpu(), ranked.cpu()))
    bar.close()
    for _ in range(max(blank_forwards, 0)):
        size = model.arch.image_size
        with autocast_context(precision, device):
            model(torch.zeros((1, 3, size, size), device=device))
    counts = torch.cat([hits_sum, torch.tensor([total, failed_total], device=device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    model.train(was_training)
    correct1, correct5, total, failed = counts.tolist()
    return EvalResult(correct1, correct5, total, failed)


def evaluate_checkpoint(cfg, model_path: str, report_dir: str = "") -> tuple[EvalResult, str]:
    """`vitkit eval`: a checkpoint of any format load_model reads, over cfg.data.val_path at cfg.eval's size.
    A run folder stands for its newest checkpoint; the file evaluated is returned with the result.
    Under torchrun each rank reads its own share of the images and every rank returns the all-reduced counts.
    `report_dir` (one process only) also gets the per-class report of vitkit.viz.eval_report."""
    if not model_path:
        raise VitkitError("no checkpoint to evaluate: pass --model PATH (or set model.pretrained / pretrained)")
    context = setup_distributed(cfg.distributed, cfg.train.device)
    if report_dir and context.world_size > 1:
        context.close()
        raise VitkitError("eval --report reads every prediction in one process: run it without torchrun")
    try:
        return _evaluate_checkpoint(cfg, model_path, context, report_dir)
    finally:
        context.close()


def _evaluate_checkpoint(cfg, model_path: str, context, report_dir: str = "") -> tuple[EvalResult, str]:
    model_path = newest_weights(model_path)
    device = pick_device(cfg.train.device, context.local_rank)
    weights = read_weights(model_path)
    if context.rank == 0:  # one warning, not one per rank
        warn_on_other_normalization(weights.source, cfg.data.normalization, model_path, stacklevel=3)
    model = model_for_config(weights, cfg.model, image_size=cfg.eval.image_size).to(device).eval()
    samples, folder_classes, source = list_labelled(cfg.data.val_path, model.arch.num_classes)
    dataset = ImageFolderDataset(
        samples, eval_transform(cfg.eval.image_size, cfg.data.interpolation, resize_size=cfg.eval.resize_size or None),
        max_image_pixels=cfg.data.max_image_pixels, source=source,
    )
    # No padding: every image is read by exactly one rank, so the summed counts equal one process's.
    sampler = ShardSampler(len(samples), rank=context.rank, world_size=context.world_size, shuffle=False, pad=False)
    workers = usable_workers(cfg.eval.num_workers, context.local_world_size)
    loader = build_loader(dataset, sampler, cfg.eval.batch_size, workers, drop_last=False)
    precision = resolve_precision(cfg.train.precision, device)
    predictions = [] if report_dir else None
    result = evaluate(model, loader, device, precision, cfg.data.normalization, cfg.logging.progress, predictions)
    if report_dir:
        from vitkit.viz.eval_report import write_eval_report

        indices, labels, top5 = (torch.cat(parts) for parts in zip(*predictions)) if predictions else (
            torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64), torch.empty((0, 1), dtype=torch.int64))
        class_names = list(weights.class_names or folder_classes)  # the model's head is the file's
        write_eval_report(report_dir, class_names, labels.numpy(), top5.numpy(),
                          [samples[index][0] for index in indices.tolist()])
    return result, model_path
