"""`vitkit train`: the original's recipe on image folders, with its log lines, exact eval, checkpoints and resume."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from vitkit.config import Config, config_to_dict, dump_yaml, to_flat
from vitkit.data.device_decode import EncodedCropDataset, collate_encoded, decode_batch
from vitkit.data.archives import list_labelled
from vitkit.data.folder import ImageFolderDataset
from vitkit.data.loader import ShardSampler, build_loader, usable_workers
from vitkit.data.mixup import BatchMixer
from vitkit.data.transforms import eval_transform, normalize_batch, train_transform
from vitkit.engine import checkpoint as ckpt
from vitkit.engine.build import (autocast_context, build_model, freeze_parameters, load_pretrained, pick_device,
                                 resolve_precision)
from vitkit.engine.distributed import DistContext, setup_distributed, wrap_model
from vitkit.engine.ema import ModelEma
from vitkit.engine.evaluate import evaluate
from vitkit.engine.losses import build_loss
from vitkit.engine.lr_schedule import PerStepLR, build_lr_schedule
from vitkit.engine.optim import build_optimizer, centralize_gradients
from vitkit.engine.runlog import RunLog, StepWindow, format_epoch_line, format_step_line, host_ip
from vitkit.engine.scalar_logs import open_scalar_logs
from vitkit.engine.preemption import Preempted, StopRequests, ignore_stop_signals
from vitkit.errors import VitkitError
from vitkit.faults import fault_point
from vitkit.progress import progress_bar
from vitkit.storage import RemoteFolder, prepare_training

# Under fp16 the scaler halves its scale at every overflowing step; below this no step can be finite any more.
_SMALLEST_LOSS_SCALE = 2.0**-16
# Several processes agree on a stop signal every this many steps; a preempted job has tens of seconds to stop.
_STOP_CHECK_STEPS = 10


def _mix_seed(seed: int, step: int) -> int:
    """A per-step seed for the batch mixer, so mixup draws depend on (seed, step) alone and survive a resume."""
    return (seed * 1_000_003 + step) % (2**63)


@contextlib.contextmanager
def _fsdp_gradient_sync_off(model: nn.Module):
    """FSDP2's counterpart of DDP's no_sync(): gradients stay unsharded and local until a backward with sync on."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


@dataclasses.dataclass
class Progress:
    """Where the run is: what a checkpoint must hold besides the model and optimizer to resume exactly."""

    epoch: int = 0  # 0-based index of the epoch in progress
    step_in_epoch: int = 0  # optimizer steps already done in it
    global_step: int = 0
    epoch_loss_sum: float = 0.0  # sum over this epoch's steps so far of the step loss averaged over the ranks
    epoch_failed: int = 0  # unreadable images so far in this epoch, all ranks together
    # Samples one step consumes on all ranks together (batch_size x world size) and the samples consumed so far in
    # this epoch: a checkpoint's position in these units converts to another world size's steps on resume.
    step_samples: int = 0
    epoch_samples: int = 0
    best_acc: float = -1.0
    best_stem: str = ""
    fps_history: list = dataclasses.field(default_factory=list)


class Trainer:
    def __init__(self, cfg: Config, mirrors: Sequence[RemoteFolder] = ()):
        self.cfg = cfg
        self.mirrors = list(mirrors)  # remote output folders (storage.prepare_training), synced after each save
        self.dist: DistContext = setup_distributed(cfg.distributed, cfg.train.device)
        self.device = pick_device(cfg.train.device, self.dist.local_rank)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.output_dir = Path(cfg.checkpoint.output_dir)
        self.is_main = self.dist.rank == 0
        # torchrun --max-restarts starts the same command again after a process died: it continues this job from
        # its newest checkpoint, not from the one the command first resumed from.
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        resume = "auto" if restarted and ckpt.list_checkpoints(self.output_dir) else cfg.train.resume
        if self.is_main:
            ckpt.remove_leftovers(self.output_dir)
        resume_path, resume_state = ckpt.load_resume_state(resume, self.output_dir)
        if resume_path is None and self.is_main:
            self._refuse_to_overwrite()
        self.log = RunLog(cfg.logging.log_dir or self.output_dir, rank=self.dist.rank, console=self.is_main,
                          jsonl=cfg.logging.jsonl, fresh=resume_state is None)
        torch.manual_seed(cfg.train.seed)
        self._build_data()
        self._build_model()
        self._build_optimization()
        self.progress = Progress()
        self.resumed = resume_state is not None
        if self.resumed:
            self._resume(resume_path, resume_state)
            self.log.forget_after(self.progress.epoch, self.progress.global_step)
        self.scalar_logs = None
        self.stops = StopRequests()
        self._run_started = time.perf_counter()

    # ---- set-up -----------------------------------------------------------------------------------------------
    def _refuse_to_overwrite(self) -> None:
        if ckpt.list_checkpoints(self.output_dir) and not self.cfg.checkpoint.overwrite:
            raise VitkitError(
                f"'{self.output_dir}' already holds another run's checkpoints: continue it with --resume auto, "
                "pick another checkpoint.output_dir, or set checkpoint.overwrite=true"
            )

    def _build_data(self) -> None:
        cfg, data = self.cfg, self.cfg.data
        # Each split is an image folder, a .tar of class folders or shards; `*_source` says where its bytes lie.
        train_samples, self.class_names, train_source = list_labelled(data.train_path, cfg.model.num_classes)
        val_samples, val_classes, val_source = list_labelled(data.val_path, cfg.model.num_classes)
        if val_classes != self.class_names:
            raise VitkitError(
                f"validation classes differ from training classes ({len(val_classes)} vs {len(self.class_names)} folders): "
                "give train and val the same class folders"
            )
        transform = train_transform(cfg.model.image_size, crop_min=data.crop_min, interpolation=data.interpolation,
                                    augment=data.augment, randaugment_ops=data.randaugment_ops,
                                    randaugment_magnitude=data.randaugment_magnitude,
                                    random_erasing=data.random_erasing, random_crop=data.random_crop,
                                    normalization=data.normalization)
        self.decode_on_device = data.decode_on == "device"
        dataset_class = EncodedCropDataset if self.decode_on_device else ImageFolderDataset
        self.train_set = dataset_class(train_samples, transform, seed=cfg.train.seed,
                                       max_image_pixels=data.max_image_pixels, source=train_source)
        self.train_sampler = ShardSampler(len(train_samples), rank=self.dist.rank, world_size=self.dist.world_size,
                                          shuffle=True, seed=cfg.train.seed, pad=True, repeats=data.repeated_aug)
        # Optimizer steps: each takes train.accum_steps micro-batches; the epoch's last few that fill no step are left.
        accum = cfg.train.accum_steps
        self.steps_per_epoch = len(self.train_sampler) // (data.batch_size * accum)
        if self.steps_per_epoch == 0:
            raise VitkitError(
                f"the training set has {len(train_samples)} images, fewer than one step of {data.batch_size} x "
                f"{accum} (data.batch_size x train.accum_steps) per process: lower data.batch_size or train.accum_steps"
            )
        self.train_loader = build_loader(self.train_set, self.train_sampler, data.batch_size,
                                         self._workers(data.num_workers), drop_last=True,
                                         collate_fn=collate_encoded if self.decode_on_device else None,
                                         worker_init_fn=ignore_stop_signals)
        val_set = ImageFolderDataset(val_samples, eval_transform(cfg.eval.image_size, interpolation=data.interpolation,
                                                                 resize_size=cfg.eval.resize_size or None),
                                     seed=cfg.train.seed, max_image_pixels=data.max_image_pixels, source=val_source)
        val_sampler = ShardSampler(len(val_samples), rank=self.dist.rank, world_size=self.dist.world_size,
                                   shuffle=False, seed=cfg.train.seed, pad=False)
        self.val_loader = build_loader(val_set, val_sampler, cfg.eval.batch_size, self._workers(cfg.eval.num_workers),
                                       drop_last=False, worker_init_fn=ignore_stop_signals)

    def _workers(self, wanted: int) -> int:
        usable = usable_workers(wanted, self.dist.local_world_size)
        if usable < wanted:
            self.log.info(f"using {usable} loader workers instead of {wanted}: one per CPU core of this process")
        return usable

    def _build_model(self) -> None:
        cfg = self.cfg
        self.model = build_model(cfg.model).to(self.device)
        if cfg.model.pretrained:
            skipped = load_pretrained(self.model, cfg.model.pretrained, normalization=cfg.data.normalization)
            note = f" (left freshly initialised: {', '.join(skipped)})" if skipped else ""
            self.log.info(f"loaded pretrained weights from {cfg.model.pretrained}{note}")
        frozen = freeze_parameters(self.model, cfg.train.freeze)
        if frozen:
            kept = sum(param.numel() for param in self.model.parameters() if param.requires_grad)
            self.log.info(f"train.freeze={cfg.train.freeze}: {len(frozen)} parameter tensors frozen, {kept:,} "
                          "parameters train")
        self.model.grad_checkpointing = cfg.model.grad_checkpointing
        self.ema = None
        if cfg.train.ema_decay > 0:
            if self.dist.world_size > 1 and cfg.distributed.strategy == "fsdp":
                raise VitkitError("train.ema_decay averages full weights, which FSDP shards across processes: use "
                                  "distributed.strategy=ddp with the EMA, or set train.ema_decay=0")
            # Copied before the model is wrapped: every rank holds the same weights, so each averages its own copy.
            self.ema = ModelEma(self.model, cfg.train.ema_decay, warmup=cfg.train.ema_warmup)
        self.train_model = wrap_model(self.model, self.dist, self.device, cfg.distributed.strategy, self.precision)
        if cfg.train.compile:
            self.train_model = torch.compile(self.train_model)

    def _build_optimization(self) -> None:
        cfg = self.cfg
        opt, sched = cfg.optimizer, cfg.schedule
        self.optimizer = build_optimizer(self.model, opt.name, sched.lr_max, (opt.beta1, opt.beta2), opt.eps,
                                         opt.weight_decay, opt.no_weight_decay_filter, opt.gc_flag,
                                         layer_decay=opt.layer_decay)
        self.lrs = build_lr_schedule(sched.lr_decay_mode, sched.lr_init, sched.lr_max, sched.lr_min,
                                     sched.warmup_epochs, sched.max_epoch, self.steps_per_epoch, sched.poly_power)
        self.scheduler = PerStepLR(self.optimizer, self.lrs)
        smoothing = cfg.loss.label_smooth_factor if cfg.loss.use_label_smooth else 0.0
        self.criterion = build_loss(cfg.loss.name, cfg.model.num_classes, smoothing)
        self.mix_generator = torch.Generator()
        self.mixer = BatchMixer(cfg.model.num_classes, mixup_alpha=cfg.data.mixup, cutmix_alpha=cfg.data.cutmix,
                                generator=self.mix_generator)
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=cfg.train.loss_scale,
                                           enabled=self.precision == "fp16")
        # Where the current optimizer step is: micro-batches of it done, and whether any of them left gradients.
        self._micro_index = 0
        self._window_has_grads = False

    # ---- checkpoints --------------------------------------------------------------------------------------------
    def _state(self, stem: str) -> tuple[dict, dict]:
        """The checkpoint's content and the full model weights. A collective: every rank calls it, and FSDP's
        shards are gathered to rank 0 (consolidated) or written by each rank into `stem.dcp` (sharded)."""
        if self.cfg.checkpoint.sharded:
            tensors = {"shards": ckpt.save_shards(self.output_dir, stem, self.model, self.optimizer)}
            weights = ckpt.gather_full_weights(self.model)
        else:
            weights, optimizer_state = ckpt.gather_full_state(self.model, self.optimizer)
            tensors = {"model": weights, "optimizer": optimizer_state}
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": "vitkit-train",
            "arch": ckpt.arch_dict(self.model),
            "class_names": self.class_names,
            # The eval preprocessing, saved with the weights so that predict and export apply it unasked.
            "preprocessing": {
                "image_size": self.cfg.eval.image_size, "resize_size": self.cfg.eval.resize_size,
                "interpolation": self.cfg.data.interpolation, "normalization": self.cfg.data.normalization,
            },
            **tensors,
            "scaler": self.scaler.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "progress": dataclasses.asdict(dataclasses.replace(
                self.progress, step_samples=self._step_samples(),
                epoch_samples=self.progress.step_in_epoch * self._step_samples())),
            "rng": rng,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "config": config_to_dict(self.cfg),
        }, weights

    def _save(self) -> Path | None:
        """Every rank calls it at the same steps; rank 0 alone writes files (besides FSDP's own shards). Returns
        the checkpoint's .pt (written by rank 0), or None when checkpoints are off."""
        if not self.cfg.checkpoint.save_checkpoint:
            return None
        stem = ckpt.checkpoint_stem(self.cfg.model.name, self.progress.epoch + 1, self.progress.step_in_epoch)
        path = self.output_dir / f"{stem}{ckpt.FULL_SUFFIX}"
        state, weights = self._state(stem)
        if not self.is_main:
            return path
        if self.progress.step_in_epoch == self.steps_per_epoch:
            # At an epoch's end the position is the start of the next one; the name keeps the original's `-{e}_{steps}`.
            state["progress"].update(epoch=self.progress.epoch + 1, step_in_epoch=0, epoch_loss_sum=0.0, epoch_failed=0,
                                     epoch_samples=0)
        ckpt.save_training_checkpoint(self.output_dir, stem, state, self.model, weights,
                                      ema_model=self.ema.module if self.ema is not None else None)
        ckpt.prune_checkpoints(self.output_dir, self.cfg.checkpoint.keep_checkpoint_max, protect=self.progress.best_stem)
        self.publish()
        return path

    def publish(self) -> None:
        """Upload what is new in the output folders to their URLs, each checkpoint's .pt after its other files;
        rank 0 alone deletes what pruning removed (another machine's leader only adds its own files)."""
        for mirror in self.mirrors:
            mirror.sync(delete=self.is_main)

    def _resume(self, path: Path, state: dict) -> None:
        if state["arch"] != ckpt.arch_dict(self.model):
            raise VitkitError(f"'{path}' was trained with another architecture: resume with the config it was made with")
        if "shards" in state:
            ckpt.load_shards(path.parent, state["shards"], self.model, self.optimizer)
        else:
            ckpt.restore_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
        if state["scaler"]:  # empty when the run that wrote it had no scaler (fp32, bf16): this one starts afresh
            self.scaler.load_state_dict(state["scaler"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.progress = self._position_for_this_world(path, Progress(**state["progress"]))
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        if self.ema is not None:
            if state.get("ema"):
                self.ema.load_state_dict(state["ema"])
            else:
                self.ema = ModelEma(self.model, self.cfg.train.ema_decay, warmup=self.cfg.train.ema_warmup)
                self.log.info(f"'{path}' holds no EMA weights: the average starts from the resumed weights")
        self.log.info(f"resumed from {path} at epoch {self.progress.epoch}, step {self.progress.step_in_epoch}")

    def _step_samples(self) -> int:
        return self.cfg.data.batch_size * self.cfg.train.accum_steps * self.dist.world_size

    def _position_for_this_world(self, path: Path, saved: Progress) -> Progress:
        """The saved position in this run's steps. Ranks read interleaved positions of one permutation per epoch,
        so after G samples of an epoch every world size has consumed the same first G positions: a run with S
        samples a step continues at step G / S, exactly, when S divides G."""
        step_samples = self._step_samples()
        if not saved.step_samples or saved.step_samples == step_samples:
            return dataclasses.replace(saved, step_samples=step_samples)  # same steps (or a checkpoint from before)
        steps = saved.epoch_samples // step_samples
        if saved.epoch_samples % step_samples or steps > self.steps_per_epoch:
            raise VitkitError(
                f"'{path}' stopped {saved.epoch_samples} samples into epoch {saved.epoch}, which is no whole number "
                f"of this run's steps of {step_samples} samples ({self.dist.world_size} processes x batch_size "
                f"{self.cfg.data.batch_size} x accum_steps {self.cfg.train.accum_steps}): resume with the world "
                "size, batch_size and accum_steps that wrote it "
                f"({saved.step_samples} samples a step), or from a checkpoint written at an epoch's end"
            )
        # The schedule is rebuilt for this run's steps per epoch: restart it at the same fraction of training.
        global_step = saved.epoch * self.steps_per_epoch + steps
        self.scheduler.load_state_dict({"steps_done": global_step})
        # The epoch's loss so far is a sum of per-step means: keep its mean over the converted step count.
        loss_sum = saved.epoch_loss_sum * steps / saved.step_in_epoch if saved.step_in_epoch else 0.0
        return dataclasses.replace(saved, step_in_epoch=steps, global_step=global_step, epoch_loss_sum=loss_sum,
                                   step_samples=step_samples)

    # ---- the loop -----------------------------------------------------------------------------------------------
    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One micro-batch: forward and backward, its gradients added to those of the step's earlier micro-batches,
        and the optimizer step after the last of train.accum_steps (after every call when it is 1). Returns the
        micro-batch's mean loss."""
        empty = images.shape[0] == 0
        accum = self.cfg.train.accum_steps
        if empty:
            # Every image of this rank's batch was unreadable, but the other ranks' backward waits for this rank's
            # gradients: a zero loss over one blank image joins the all-reduce with zero gradients.
            size = self.cfg.model.image_size
            images = torch.zeros((1, 3, size, size), dtype=torch.uint8)
        images = normalize_batch(images.to(self.device, non_blocking=True),
                                 normalization=self.cfg.data.normalization)
        labels = labels.to(self.device, non_blocking=True)
        if self.mixer.enabled and not empty:
            micro_batch = self.progress.global_step * accum + self._micro_index
            self.mix_generator.manual_seed(_mix_seed(self.cfg.train.seed, micro_batch))
            images, targets = self.mixer(images, labels)
        else:
            targets = labels
        if not self._window_has_grads:
            self.optimizer.zero_grad(set_to_none=True)
        # DDP decides in the forward pass whether the backward all-reduces: both run inside the context.
        with self._gradient_sync(self._micro_index + 1 == accum):
            with autocast_context(self.precision, self.device):
                logits = self.train_model(images)
            loss = logits.float().sum() * 0.0 if empty else self.criterion(logits.float(), targets)
            # The mean over the step's micro-batches: the gradient of one batch accum times the size.
            self.scaler.scale(loss / accum).backward()
        self._window_has_grads = True
        fault_point("step_backward")
        self._end_micro_batch()
        return loss.detach()

    def _end_micro_batch(self) -> None:
        self._micro_index += 1
        if self._micro_index < self.cfg.train.accum_steps:
            return
        self._micro_index = 0
        if self._window_has_grads:
            self._optimizer_step()
        self._window_has_grads = False
        self.scheduler.step()  # the schedule counts optimizer steps, skipped ones included

    def _gradient_sync(self, sync: bool):
        """Several processes average the gradients in the backward pass; within a step's micro-batches only the last
        backward needs to, over the gradients summed so far."""
        if sync or self.dist.world_size <= 1:
            return contextlib.nullcontext()
        if self.cfg.distributed.strategy == "fsdp":
            return _fsdp_gradient_sync_off(self.model)
        return self.train_model.no_sync()

    def _optimizer_step(self) -> None:
        if self.cfg.optimizer.gc_flag:
            centralize_gradients(self.optimizer.param_groups)  # linear, so it commutes with the loss scale
        if self.cfg.optimizer.clip_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optimizer.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)

    def _first_compiled_step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The first step under train.compile, timed for the original's compile line: torch.compile traces and
        compiles the forward and backward graphs as this step first runs them, so its wall time is the compile
        time plus one step."""
        started = time.perf_counter()
        loss = self._train_step(images, labels)
        float(loss)  # waits for the step
        self._compile_unmeasured = False
        self.log.info(f"compile time used={time.perf_counter() - started:.2f}s")
        return loss

    def _should_evaluate(self, epoch: int) -> bool:
        interval, offset = self.cfg.eval.interval, self.cfg.eval.offset
        if offset < 0:
            offset = self.cfg.schedule.max_epoch % interval
        return (epoch + 1) % interval == offset

    def _run_epoch(self, profiler=None) -> tuple[float, float]:
        """Train the rest of the current epoch; returns (mean loss, wall seconds)."""
        progress, batch, accum = self.progress, self.cfg.data.batch_size, self.cfg.train.accum_steps
        self.train_loader.set_epoch(progress.epoch)
        self.train_sampler.skip(progress.step_in_epoch * batch * accum)
        self._micro_index, self._window_has_grads = 0, False  # a step never spans epochs
        self.train_model.train()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        failed_sum = 0
        started = time.perf_counter()
        steps_total = self.steps_per_epoch
        bar = progress_bar(steps_total - progress.step_in_epoch, f"epoch {progress.epoch}", self.cfg.logging.progress,
                           enabled=self.is_main)
        save_every = self.cfg.checkpoint.save_checkpoint_steps
        window = StepWindow(progress.step_in_epoch)
        # Per step, on the device (no host sync): the first global step whose loss was not finite, and the images
        # this rank trained on. Both are read where the run stops anyway (step lines, saves, the epoch's end).
        first_nonfinite = torch.full((), -1, dtype=torch.int64, device=self.device)
        trained = 0
        batches = iter(self.train_loader)
        while progress.step_in_epoch < steps_total:
            with window.waiting():
                batch_or_end = next(batches, None)
            if batch_or_end is None:
                break
            fault_point("batch_fetched")
            images, labels, _, failed = batch_or_end
            if self.decode_on_device:
                size = (self.cfg.model.image_size,) * 2
                images, labels, unreadable = decode_batch(images, labels, self.device, size)
                failed += unreadable
            window.images += len(labels)
            trained += len(labels)
            if images.shape[0] or self.dist.world_size > 1:
                step = self._first_compiled_step if self._compile_unmeasured else self._train_step
                loss = step(images, labels)
                loss_sum += loss / accum
                first_nonfinite = torch.where((first_nonfinite < 0) & ~torch.isfinite(loss),
                                              progress.global_step + 1, first_nonfinite)
            else:
                # Every image of the micro-batch was unreadable: nothing to learn, but it keeps its place in the step
                # (whose optimizer step is skipped if none of its micro-batches had an image) and the schedule's.
                self._end_micro_batch()
            failed_sum += failed
            if self._micro_index:
                continue  # the optimizer step waits for the rest of its micro-batches
            progress.step_in_epoch += 1
            progress.global_step += 1
            bar.update(1)
            if profiler is not None:
                profiler.step()
            fault_point("step_end")
            interval = self.cfg.logging.log_interval
            if interval and progress.step_in_epoch % interval == 0:
                self._stop_if_diverged(first_nonfinite)
                self._log_step(window, loss_sum)
                window = StepWindow(progress.step_in_epoch)
            at_save = save_every and progress.global_step % save_every == 0 and progress.step_in_epoch < steps_total
            stop_signal = self._stop_signal() if progress.step_in_epoch < steps_total else 0
            if at_save or stop_signal:
                self._stop_if_diverged(first_nonfinite)
                self._add_to_epoch_totals(loss_sum, failed_sum)
                loss_sum.zero_()
                failed_sum = 0
                saved = self._save()
                if stop_signal:
                    raise Preempted(stop_signal, saved)
        bar.close()
        self._stop_if_diverged(first_nonfinite)
        self._add_to_epoch_totals(loss_sum, failed_sum, trained)
        elapsed = time.perf_counter() - started
        return progress.epoch_loss_sum / max(progress.step_in_epoch, 1), elapsed

    def _stop_signal(self, always: bool = False) -> int:
        """SIGTERM/SIGUSR1 received (by any rank). One process looks at every step. Several agree (an all-reduce,
        which waits for the step) every _STOP_CHECK_STEPS global steps, and `always` at an epoch's end: every rank
        asks at the same steps, so all stop at the same one."""
        if self.dist.world_size > 1 and not always and self.progress.global_step % _STOP_CHECK_STEPS:
            return 0
        return self.stops.agreed(self.device, self.dist.world_size)

    def _stop_if_diverged(self, first_nonfinite: torch.Tensor) -> None:
        """A non-finite loss ends the run before anything of it is saved. Under fp16 the loss scaler skips such
        steps and halves its scale; the run stops only once the scale has fallen below any useful value."""
        if self.precision == "fp16":
            scale = self.scaler.get_scale()
            if scale >= _SMALLEST_LOSS_SCALE:
                return
            problem = f"the fp16 loss scale fell to {scale:.3g}: every step overflows"
        else:
            step = int(first_nonfinite)  # waits for the steps so far
            if step < 0:
                return
            problem = f"the training loss was not finite at step {step}"
        saved = ckpt.list_checkpoints(self.output_dir)
        last = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was written"
        raise VitkitError(f"{problem} (epoch {self.progress.epoch}): the run stopped and saved nothing of it; {last}; "
                          f"lower schedule.lr_max ({self.cfg.schedule.lr_max:g}) or check the data")

    def _log_step(self, window: StepWindow, loss_sum: torch.Tensor) -> None:
        """The step line: this rank's running loss of the epoch, the window's speed and data wait, the ETAs."""
        progress, cfg = self.progress, self.cfg
        # The loss since the last mid-epoch save is this rank's; what was flushed before is the ranks' mean.
        loss = (progress.epoch_loss_sum + float(loss_sum)) / progress.step_in_epoch  # float() waits for the step
        seconds = window.seconds()
        step_seconds = seconds / max(progress.step_in_epoch - window.first_step, 1)
        left_in_epoch = self.steps_per_epoch - progress.step_in_epoch
        left_in_run = left_in_epoch + (cfg.schedule.max_epoch - progress.epoch - 1) * self.steps_per_epoch
        lr = self.scheduler.current_lr  # the scheduled rate, which layer-wise decay scales per param group
        loss_scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        grad_norm = self._grad_norm()
        record = {"epoch": progress.epoch, "step": progress.step_in_epoch, "steps": self.steps_per_epoch,
                  "global_step": progress.global_step, "loss": loss, "lr": lr, "img_s": window.images / seconds,
                  "data_wait": window.wait / seconds, "grad_norm": grad_norm, "loss_scale": loss_scale,
                  "time": time.perf_counter() - self._run_started}
        self.log.info(format_step_line(record, eta_epoch=left_in_epoch * step_seconds,
                                       eta_run=left_in_run * step_seconds))
        self.log.step(record)
        if self.scalar_logs is not None:
            self.scalar_logs.scalars({"train/loss": loss, "train/lr": lr, "train/img_s": record["img_s"],
                                "train/data_wait": record["data_wait"], "train/grad_norm": grad_norm,
                                "train/loss_scale": loss_scale}, progress.global_step)

    def _grad_norm(self) -> float | None:
        """The global L2 norm of the last step's (unscaled) gradients; None where they are sharded (FSDP)."""
        grads = [param.grad for param in self.model.parameters() if param.grad is not None]
        if not grads or self.cfg.distributed.strategy == "fsdp" and self.dist.world_size > 1:
            return None
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def _add_to_epoch_totals(self, loss_sum: torch.Tensor, failed: int, trained: int | None = None) -> None:
        """Adds the step losses since the last call, averaged over the ranks, and the unreadable images, summed over
        them. Every rank calls it at the same steps (checkpoint saves and epoch ends), so this is one all-reduce
        there rather than a host sync every step, and rank 0 saves the same totals every rank holds. At the epoch's
        end, `trained` (the images this rank trained on in it) must add up to more than none over the ranks."""
        counts = [float(failed), float(trained or 0)]
        sums = torch.cat([loss_sum.reshape(1), torch.tensor(counts, dtype=torch.float64, device=self.device)])
        if self.dist.world_size > 1:
            dist.all_reduce(sums)
        loss_total, failed_total, trained_total = sums.tolist()
        self.progress.epoch_loss_sum += loss_total / self.dist.world_size
        self.progress.epoch_failed += round(failed_total)
        if trained is not None and trained_total == 0 and self.progress.step_in_epoch > 0:
            raise VitkitError(
                f"no image of epoch {self.progress.epoch} could be read ({self.progress.epoch_failed} unreadable, "
                f"see the warnings): check data.train_path"
            )

    def fit(self) -> dict:
        cfg, progress = self.cfg, self.progress
        # Every rank logs to its own file (RunLog prints rank 0's alone and keeps rank 0's metrics alone), so each
        # rank's file shows its own epoch times.
        self.log.args(to_flat(cfg))
        self._compile_unmeasured = cfg.train.compile  # the original's compile line comes after the first step
        self.log.info(f"device {self.device}, precision {self.precision} (train.precision={cfg.train.precision})")
        if self.is_main:
            self.scalar_logs, lines = open_scalar_logs(cfg.logging, self.log.log_dir, config_to_dict(cfg),
                                                 resume_step=progress.global_step if self.resumed else None)
            for line in lines:
                self.log.info(line)
            if not self.resumed:
                self.scalar_logs.text("config", dump_yaml(cfg))
        run_started = self._run_started = time.perf_counter()
        profiler = self._start_profiler()
        while progress.epoch < cfg.schedule.max_epoch:
            epoch = progress.epoch
            mean_loss, epoch_time = self._run_epoch(profiler)
            if profiler is not None:
                profiler.stop()
                self.log.info(f"profiler trace written to {self._profile_path}")
                profiler = None
            lr = float(self.lrs[min((epoch + 1) * self.steps_per_epoch, len(self.lrs)) - 1])
            fps = self._step_samples() * self.steps_per_epoch / epoch_time
            progress.fps_history.append(fps)
            record = {"epoch": epoch, "epoch_time": epoch_time, "step_time": epoch_time / self.steps_per_epoch,
                      "loss": mean_loss, "lr": lr, "fps": fps, "failed_images": progress.epoch_failed}
            accuracy = eval_cost = None
            improved = False
            if self._should_evaluate(epoch):
                eval_started = time.perf_counter()
                result = evaluate(self.model, self.val_loader, self.device, self.precision, cfg.data.normalization)
                eval_cost = time.perf_counter() - eval_started
                accuracy = result.top1
                record.update(accuracy=result.top1, top5=result.top5, eval_images=result.total, eval_cost=eval_cost)
                if self.ema is not None:
                    ema_started = time.perf_counter()
                    ema_result = evaluate(self.ema.module, self.val_loader, self.device, self.precision,
                                          cfg.data.normalization)
                    record.update(ema_accuracy=ema_result.top1, ema_top5=ema_result.top5,
                                  ema_eval_cost=time.perf_counter() - ema_started)
                improved = accuracy > progress.best_acc
                if improved:
                    progress.best_acc = accuracy
                    progress.best_stem = ckpt.checkpoint_stem(cfg.model.name, epoch + 1, self.steps_per_epoch)
            line = format_epoch_line(epoch, epoch_time, epoch_time / self.steps_per_epoch, mean_loss, lr, fps,
                                     accuracy, eval_cost)
            if "ema_accuracy" in record:
                line += f", ema_accuracy={record['ema_accuracy']:.6f}"
            if progress.epoch_failed:
                line += f", skipped_images={progress.epoch_failed}"
            self.log.info(line)
            self.log.metrics(record)
            if self.scalar_logs is not None:
                self.scalar_logs.scalars({"epoch/loss": mean_loss, "epoch/img_s": fps, "epoch/lr": lr,
                                    "eval/top1": accuracy, "eval/top5": record.get("top5"),
                                    "eval/ema_top1": record.get("ema_accuracy"), "eval/ema_top5": record.get("ema_top5")},
                                   progress.global_step)
                self.scalar_logs.flush()
            progress.step_in_epoch = self.steps_per_epoch
            # The best epoch is saved too, so that pruning can keep it; a stop signal saves the epoch's end as well.
            stop_signal = self._stop_signal(always=True) if epoch + 1 < cfg.schedule.max_epoch else 0
            saved = None
            if ((epoch + 1) % cfg.checkpoint.save_checkpoint_epochs == 0 or epoch + 1 == cfg.schedule.max_epoch
                    or improved or stop_signal):
                saved = self._save()
            fault_point("epoch_saved")
            if stop_signal:
                raise Preempted(stop_signal, saved)
            progress.epoch += 1
            progress.step_in_epoch = 0
            progress.epoch_loss_sum = 0.0
            progress.epoch_failed = 0
        return self._finish(time.perf_counter() - run_started)

    def _finish(self, training_time: float) -> dict:
        progress = self.progress
        if self.scalar_logs is not None:
            self.scalar_logs.close()
        mean_fps = sum(progress.fps_history) / len(progress.fps_history) if progress.fps_history else 0.0
        self.log.info(f"training time used={training_time:.2f}s")
        self.log.info(f"last_metric[{progress.best_acc}]")
        self.log.info(f"ip[{host_ip()}], mean_fps[{mean_fps:.2f}]")
        self.log.close()
        return {"best_acc": progress.best_acc, "mean_fps": mean_fps, "training_time": training_time,
                "global_step": progress.global_step}

    def _start_profiler(self):
        if not self.cfg.train.open_profiler or not self.is_main:
            return None
        self._profile_path = self.output_dir / f"profile_rank{self.dist.rank}.json"
        path = self._profile_path

        def write_trace(prof):
            prof.export_chrome_trace(str(path))

        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(activities=activities, on_trace_ready=write_trace,
                                          schedule=torch.profiler.schedule(wait=1, warmup=1, active=3, repeat=1))
        profiler.start()
        return profiler


def train(cfg: Config) -> dict:
    """Train as the config says. SIGTERM or SIGUSR1 ends it with a checkpoint and `Preempted` (see preemption.py)."""
    trainer = Trainer(cfg, prepare_training(cfg, ckpt.is_checkpoint_marker))
    trainer.stops.install()
    try:
        result = trainer.fit()
        trainer.dist.wait_for_all()
        trainer.publish()
        return result
    except Preempted as stop:
        trainer.log.info(str(stop))
        trainer.publish()
        raise
    except VitkitError:
        # The log that explains the failure reaches the bucket too; if the bucket is what failed, that error stands.
        with contextlib.suppress(VitkitError):
            trainer.publish()
        raise
    finally:
        trainer.stops.uninstall()
        trainer.dist.close()
