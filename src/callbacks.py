"""Callbacks that any run can attach from the command line (`--trainer.callbacks+=src.callbacks.<Name>`).

`ExperimentMetrics` makes a run comparable with others in TensorBoard: its knobs as hyper-parameters
(HParams tab), parameters and MACs, measured training and inference throughput, and best / final
validation metrics, all written to the run's event file (tags `summary/*`).

`TrainSpeed` (attached to every `fit` of the classifier) logs training img/s as `train/img_per_s`, the compile
time of a compiled model as `compile_s`, and prints one line per epoch. Training img/s is defined once, in
`src.timing`.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, TQDMProgressBar

from src.checks import non_negative, require
from src.errors import UserError
from src.kernels import resolve_backend
from src.tb import log_hparams
from src.timing import StepTimer, synchronize

# metric columns of the HParams tab; TensorBoard shows the last value of each tag in the run
SUMMARY_METRICS = (
    "val/acc1",
    "summary/val_acc1_best",
    "summary/val_acc1_final",
    "summary/train_img_s",
    "summary/infer_img_s",
    "summary/params",
    "summary/macs",
    "summary/fit_s",
)


def batch_images(batch, world_size: int = 1) -> int:
    """Images of one training step over all processes (the same batch size on every rank)."""
    images = batch[0] if isinstance(batch, (list, tuple)) else batch
    return len(images) * world_size


def is_compiled(module: torch.nn.Module) -> bool:
    """`module` or one of its submodules was compiled in place (`nn.Module.compile`)."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


def first_step_work(module: torch.nn.Module) -> str | None:
    """What makes `module`'s first training step slow, as `TrainSpeed` prints it: "compile" (compiled in place),
    "CUDA-graph recording" (`eager_cudagraphs` on a CUDA device: the eager kernels' Triton compiles, three
    warm-up passes and the recording, src/cudagraphs.py) or None."""
    if is_compiled(module):
        return "compile"
    hparams = getattr(module, "hparams", None) or {}
    device = getattr(module, "device", torch.device("cpu"))
    return "CUDA-graph recording" if hparams.get("eager_cudagraphs") and device.type == "cuda" else None


class ProgressBar(TQDMProgressBar):
    """Lightning's TQDM progress bar, whose counter moves every `refresh_rate` steps as before but whose
    training metrics (the loss and whatever else is logged with `prog_bar=True`) are read at most once every
    `metrics_every_s` seconds and at each epoch end. Reading them copies the logged tensors to the host, which
    waits for the GPU to finish every queued step: Lightning's bar reads them at every refresh, every step by
    default, and so stalls the GPU once per step (the host's work before the next step then runs with the
    device idle). `main.py` puts this bar in place of Lightning's default one; a bar chosen in the config
    (another class) is kept.

    Args:
        refresh_rate: steps between updates of the counter (Lightning's).
        process_position: line of the bar, for several bars at once (Lightning's).
        leave: keep each epoch's bar on screen (Lightning's).
        metrics_every_s: seconds between two readings of the training metrics; 0 reads them at every refresh.
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False,
                 metrics_every_s: float = 2.0):
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        non_negative("ProgressBar metrics_every_s", metrics_every_s)
        self.metrics_every_s = metrics_every_s
        self._metrics_read = float("-inf")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar, n = self.train_progress_bar, batch_idx + 1
        if bar is None or bar.disable or not self._should_update(n, bar.total):
            return
        bar.n = n
        now = time.monotonic()
        if now - self._metrics_read >= self.metrics_every_s:
            self._metrics_read = now
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()


def use_progress_bar(trainer: L.Trainer) -> None:
    """Put `ProgressBar` in place of the TQDM bar that Lightning adds by default (an exact `TQDMProgressBar`,
    whose refresh rate, position and `leave` are kept); any other bar stays."""
    for i, callback in enumerate(trainer.callbacks):
        if type(callback) is TQDMProgressBar:
            trainer.callbacks[i] = ProgressBar(callback.refresh_rate, callback.process_position,
                                               leave=getattr(callback, "_leave", False))


class TrainSpeed(Callback):
    """Training speed of a run (the definition of `src.timing`):

    - `train/img_per_s` in TensorBoard: img/s over the timed steps of each logging interval
      (`trainer.log_every_n_steps`);
    - `compile_s` in TensorBoard and one printed line, once, when the model was compiled or records CUDA graphs
      (`first_step_work`): the first training step's wall time less a steady step's (the training graphs
      compile, or the eager step is recorded, in the first step; the evaluation graphs compile during the
      sanity check or the first validation);
    - one printed line per epoch (rank 0): img/s; the share of the timed time the host spent between steps
      (from the end of this callback's step hook to the start of the next step: the loader's next batch and
      its copy to the device, Lightning's loop, the later hooks, the learning-rate step; on a GPU the device
      may still be working through queued steps meanwhile); peak GPU memory of this rank. A large share with
      an idle device is a slow loader or a slow host: with in-memory batches it is the host alone.

    The timer never makes the host wait for the device during the timed steps (`src.timing`): it reads the
    device's timestamps once per logging interval.

    Args:
        warmup_steps: first training steps of the run left out of the img/s (compilation, autotuning).
    """

    def __init__(self, warmup_steps: int = 10):
        non_negative("TrainSpeed warmup_steps", warmup_steps)
        self.warmup_steps = warmup_steps
        self.timer: StepTimer | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.timer = StepTimer(self.warmup_steps, pl_module.device)
        self.compiled, self.compile_reported = first_step_work(pl_module), False
        self.window = (0, 0.0)  # timer.images, timer.seconds at the last logged value
        # also set here: a run resumed from a checkpoint written after an epoch's last batch ends that epoch
        # without starting it again
        self.epoch_start, self.wait, self.step_end, self.gap = (0, 0.0), 0.0, None, 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.timer.restart()
        self.epoch_start = (self.timer.images, self.timer.seconds)
        self.wait, self.step_end = 0.0, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.timer.begin()  # only before the first step of the fit
        # the host's time between steps: from the end of the last step's hook to here (loader, loop)
        self.gap = time.perf_counter() - self.step_end if self.step_end is not None else 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.timer.step(batch_images(batch, trainer.world_size)):
            self.wait += self.gap
        metrics = {}
        if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0 and self.timer.timed_steps:
            # reading the timer waits for the steps in flight: once per logging interval, not every step
            images, timed = self.timer.images - self.window[0], self.timer.seconds - self.window[1]
            if images:
                metrics["train/img_per_s"] = images / timed
                self.window = (self.timer.images, self.timer.seconds)
        if self.compiled and not self.compile_reported and self.timer.timed_steps:
            self.compile_reported = True  # one look, after the first timed step (it waits for the steps in flight)
            compile_s = self.timer.compile_s
            if compile_s is not None:
                metrics["compile_s"] = compile_s
                if trainer.is_global_zero:
                    print(f"{self.compiled}: first training step {self.timer.first_step_s:.1f} s, steady step "
                          f"{self.timer.steady_step_s:.3f} s: compile_s {compile_s:.1f}", flush=True)
        if metrics and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        self.step_end = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        images = self.timer.images - self.epoch_start[0]
        seconds = self.timer.seconds - self.epoch_start[1]
        if not images:
            print(f"train speed, epoch {trainer.current_epoch}: no timed step (the first {self.warmup_steps} steps "
                  "of the run and the first of each epoch are not timed)", flush=True)
            return
        memory = (f", peak GPU memory {torch.cuda.max_memory_allocated(pl_module.device) / 2**30:.1f} GiB"
                  if pl_module.device.type == "cuda" else "")
        print(f"train speed, epoch {trainer.current_epoch}: {images / seconds:.0f} img/s ({images} images in "
              f"{seconds:.1f} s), host between steps (loader, loop) {100 * self.wait / seconds:.1f} %{memory}",
              flush=True)


def _resolved_backend(backend: str, device: torch.device) -> str:
    """`auto` as the backend it runs on this device."""
    try:
        return resolve_backend(backend, device)
    except (ValueError, RuntimeError):
        return backend


def _hparam_value(v):
    """HParams accept numbers, strings and booleans; lists and None become their text."""
    return v if isinstance(v, (bool, int, float, str)) else json.dumps(v)


class ExperimentMetrics(Callback):
    """Logs a run's hyper-parameters, size, speed and results to TensorBoard's HParams tab.

    Hyper-parameters: `axis`, `variant`, the seed, the backbone's fusion / scan / backend knobs, image size,
    batch size, epochs, learning rate, parameters and MACs (one image, conv + matmul, `src.flops`).
    Metrics (scalars at the last step): best and final val/acc1, training throughput (img/s as defined in
    `src.timing`, the steps after `warmup_steps`), inference throughput
    (eval-mode forward without gradients on validation batches, after warm-up), fit wall time.

    Args:
        axis: name of the ablation axis (free text; logged as a hyper-parameter).
        variant: name of the variant on that axis.
        warmup_steps: first training steps left out of the throughput (compilation, allocator warm-up).
        infer_batches: timed validation batches for the inference throughput (after 2 warm-up batches).
        image_size: side of the images for the MAC count; default: the DataModule's `image_size`, else 224.
    """

    def __init__(
        self,
        axis: str = "",
        variant: str = "",
        warmup_steps: int = 5,
        infer_batches: int = 10,
        image_size: int | None = None,
    ):
        non_negative("ExperimentMetrics warmup_steps", warmup_steps)
        require(infer_batches >= 1, "ExperimentMetrics infer_batches", ">= 1", infer_batches)
        require(image_size is None or image_size >= 32, "ExperimentMetrics image_size", ">= 32 or null", image_size)
        self.axis, self.variant = axis, variant
        self.warmup_steps, self.infer_batches, self.image_size = warmup_steps, infer_batches, image_size
        self.params = self.macs = None
        self._reset()

    def _reset(self) -> None:
        self.timer = StepTimer(self.warmup_steps)
        self.best, self.final, self.infer = None, None, None
        self._fit_start = time.perf_counter()

    # -- size, before the LightningModule's setup (which may compile the backbone)
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.params is not None:
            return
        from src.flops import count_macs, count_params

        backbone = getattr(pl_module, "backbone", pl_module)
        data = getattr(trainer.datamodule, "hparams", {})
        self.image_size = int(self.image_size or data.get("image_size") or 224)
        self.params = count_params(backbone)
        self.macs = count_macs(backbone, self.image_size, getattr(backbone, "in_chans", 3))

    def hparams(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        backbone = getattr(pl_module, "backbone", pl_module)
        ssm = next((m for m in backbone.modules() if hasattr(m, "state_fusion")), None)
        data = getattr(trainer.datamodule, "hparams", {})
        hp = {
            "axis": self.axis,
            "variant": self.variant,
            "seed": int(os.environ.get("PL_GLOBAL_SEED", -1)),
            "image_size": self.image_size,
            "batch_size": data.get("batch_size", -1),
            "max_epochs": trainer.max_epochs if trainer.max_epochs is not None else -1,
            "lr": float(getattr(pl_module.hparams, "lr", 0.0) or 0.0),
            "params": self.params,
            "macs": self.macs,
        }
        if ssm is not None:
            hp.update(
                dilations=list(ssm.state_fusion.dilations),
                fusion_kernel_size=ssm.state_fusion.kernel_size,
                scan=ssm.scan,
                backend=_resolved_backend(ssm.backend, pl_module.device),
            )
        return {k: _hparam_value(v) for k, v in hp.items()}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs before the LightningModule's own on_fit_start: TensorBoard keeps the FIRST hparams record
        # of a run, so this one (with every knob) is what the HParams tab shows.
        self._reset()
        # short runs (tests, smoke runs) still time a step: the first has no boundary before it, the second can be timed
        self.timer = StepTimer(min(self.warmup_steps, max(0, int(trainer.estimated_stepping_batches) - 1)), pl_module.device)
        hp = self.hparams(trainer, pl_module)
        log_hparams(trainer.loggers, hp, SUMMARY_METRICS)

    # -- training throughput (src.timing)
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.timer.restart()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.timer.step(batch_images(batch, trainer.world_size))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        acc = trainer.callback_metrics.get("val/acc1")
        if acc is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.final = float(acc)
        self.best = self.final if self.best is None else max(self.best, self.final)

    # -- inference throughput at the end of training, on the training device: Lightning's teardown moves the
    # module to the CPU before `on_fit_end` (measured there, a GPU run's figure was the CPU's, and a Triton
    # backend failed); every summary metric is logged at the end of fit
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.infer = self.inference_throughput(trainer, pl_module)

    @torch.no_grad()
    def inference_throughput(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float | None:
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        if loader is None:
            return None
        batches, size = [], None
        for batch in loader:
            images = batch[0] if isinstance(batch, (list, tuple)) else batch
            if size is not None and len(images) != size:
                break  # only full batches: one shape, no recompilation
            size = len(images)
            batches.append(images.to(pl_module.device))
            if len(batches) >= self.infer_batches:
                break
        if not batches:
            return None
        was_training = pl_module.training
        pl_module.eval()
        try:
            for images in batches[:2]:  # warm-up
                pl_module(images)
            synchronize(pl_module.device)
            start, n = time.perf_counter(), 0
            for i in range(max(self.infer_batches, 1)):
                pl_module(batches[i % len(batches)])
                n += size
            synchronize(pl_module.device)
            return n / (time.perf_counter() - start)
        finally:
            pl_module.train(was_training)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = {
            "summary/params": float(self.params or 0),
            "summary/macs": float(self.macs or 0),
            "summary/fit_s": time.perf_counter() - self._fit_start,
        }
        if self.best is not None:
            metrics["summary/val_acc1_best"] = self.best
            metrics["summary/val_acc1_final"] = self.final
        if self.timer.img_per_s is not None:
            metrics["summary/train_img_s"] = self.timer.img_per_s
        if self.infer is not None:
            metrics["summary/infer_img_s"] = self.infer
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()


class FitSummary(Callback):
    """Prints one line at the end of `fit`: the best value of a validation metric (higher is better) and the
    step it was reached at, the final scores (`final`), wall time and the best checkpoint. Each task module
    attaches one with its metric (`val/acc1`, `val/mIoU`, `val/bbox_mAP`)."""

    def __init__(self, metric: str, label: str | None = None, percent: bool = True):
        self.metric, self.label, self.percent = metric, label or metric, percent
        self.start, self.best, self.best_step = time.time(), None, None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start, self.best, self.best_step = time.time(), None, None

    def on_validation_end(self, trainer, pl_module) -> None:  # the module's epoch end has logged the metric
        value = trainer.callback_metrics.get(self.metric)
        if value is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        if self.best is None or float(value) > self.best:
            self.best, self.best_step = float(value), trainer.global_step

    def score(self, value) -> str:
        return f"{100 * float(value):.2f} %" if self.percent else f"{float(value):.3f}"

    def final(self, trainer, pl_module) -> str:
        """The final scores, after the best one."""
        value = trainer.callback_metrics.get(self.metric)
        return f"final {self.score(value)}" if value is not None else ""

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        seconds = time.time() - self.start
        if self.best is None:
            print(f"Finished fit in {seconds:.0f} s ({trainer.global_step} steps); no validation was run.")
            return
        ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        final = self.final(trainer, pl_module)
        print(f"Finished fit in {seconds:.0f} s ({trainer.global_step} steps): best {self.label} "
              f"{self.score(self.best)} (step {self.best_step})" + (f", {final}" if final else "")
              + (f"; best checkpoint {ckpt}" if ckpt else ""))


class ValidationImageGrid(Callback):
    """Each validation epoch: the first `num_images` validation images as rows (e.g. input | ground truth |
    prediction, made by `add_rows` of a subclass), padded to one width and written to TensorBoard as `val/grid`
    (rank 0, not during the sanity check)."""

    def __init__(self, num_images: int = 4):
        self.num_images = num_images
        self.rows: list[torch.Tensor] = []

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.rows = []

    def add_rows(self, trainer, pl_module, outputs, batch) -> None:
        """Append (3, H, W) rows for this batch to `self.rows` (at most `num_images` in all)."""
        raise NotImplementedError

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if len(self.rows) < self.num_images and trainer.is_global_zero and isinstance(outputs, dict):
            self.add_rows(trainer, pl_module, outputs, batch)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.rows or trainer.sanity_checking or not trainer.is_global_zero:
            return
        from lightning.pytorch.loggers import TensorBoardLogger

        width = max(r.shape[-1] for r in self.rows)
        rows = [torch.nn.functional.pad(r, (0, width - r.shape[-1])) for r in self.rows]  # sizes differ: pad right
        grid = torch.cat(rows, dim=1)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("val/grid", grid, global_step=trainer.global_step)


def adopt_data_classes(module: L.LightningModule, noun: str = "classes") -> None:
    """A dense task module's set-up: atomic checkpoint saves (a kill mid-save keeps the previous file), the
    data's class count checked against `num_classes` (one line naming both keys) and its class names adopted."""
    from src.checkpoints import AtomicCheckpointIO
    from src.errors import UserError

    if module._trainer is None:
        return
    if type(module.trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO":
        module.trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    data = module.trainer.datamodule
    data_classes = getattr(data, "num_classes", None)
    if data_classes is not None and data_classes != module.hparams.num_classes:
        raise UserError(f"the data has {data_classes} {noun} but model.init_args.num_classes="
                        f"{module.hparams.num_classes}; set them equal")
    names = getattr(data, "classes", None)
    if names and len(names) == module.hparams.num_classes:
        module.class_names = list(names)


class PredictionCSVWriter(BasePredictionWriter):
    """Writes `predict` results to the datamodule's `predict_output` CSV: path, class index, class name,
    probability; rows of all ranks are gathered and written once, in path order."""

    def __init__(self):
        super().__init__(write_interval="batch")
        self.rows: list[tuple] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        data = trainer.datamodule
        if stage == "predict" and data is not None and "predict_output" not in getattr(data, "hparams", {}):
            raise UserError(
                f"predict writes its results to data.init_args.predict_output, which {type(data).__name__} does not "
                "have; use a data module that has it (src.data.ImageFolderDataModule with predict_root, "
                "src.data.DigitsDataModule)"
            )

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.rows = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if not isinstance(prediction, dict) or "path" not in prediction:
            return
        names = getattr(trainer.datamodule, "classes", None) or []
        for path, label, prob in zip(prediction["path"], prediction["label"].tolist(), prediction["probability"].tolist()):
            self.rows.append((path, label, names[label] if label < len(names) else str(label), f"{prob:.6f}"))

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        output = getattr(trainer.datamodule, "hparams", {}).get("predict_output")
        if output is None:
            return
        rows = self.rows
        if trainer.world_size > 1:
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if trainer.is_global_zero:
            folder = os.path.dirname(os.path.abspath(output))
            os.makedirs(folder, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", newline="", dir=folder, suffix=".tmp", delete=False) as f:
                writer = csv.writer(f)
                writer.writerow(["path", "class_index", "class_name", "probability"])
                writer.writerows(sorted(rows))
            os.replace(f.name, output)  # a crash mid-write never leaves a half-written file under the name
            print(f"wrote {len(rows)} predictions to {output}")
