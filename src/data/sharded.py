"""Loaders shared by the folder data modules (image classes, ADE20K, COCO): a training loader whose shuffled
order depends only on (seed, epoch), sharded over ranks, seeding each sample's augmentation and resuming
mid-epoch; and evaluation loaders that read every sample exactly once over all ranks."""

from __future__ import annotations

import os
from collections.abc import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from src.errors import UserError


class ResumableSampler(DistributedSampler):
    """Training sampler: this rank's shard of a permutation that depends only on (seed, epoch), as
    (index, epoch) keys so each sample's augmentation is seeded too; `start` skips that many of this
    rank's samples at the next `__iter__` (resuming mid-epoch). A DistributedSampler, so Lightning keeps
    it as it is under DDP and calls `set_epoch` every epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, drop_last: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)
        self.start = 0

    def __iter__(self):
        indices = list(super().__iter__())[self.start:]
        self.start = 0
        return iter([(i, self.epoch) for i in indices])


class ShardedEvalSampler(DistributedSampler):
    """Evaluation sampler: rank r of R reads samples r, r+R, r+2R, ... — every sample exactly once over all
    ranks (DistributedSampler would pad with repeats), so synced metrics equal the single-process ones."""

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


class ResumableLoader(DataLoader):
    """Training DataLoader that resumes mid-epoch.

    Iteration starts lazily, at the first batch, so it uses the epoch that Lightning sets on the sampler
    after making the iterator, and it skips (in the sampler, without loading them) the batches that the
    trainer's batch progress counts as already trained in this epoch (`batches_done()`): none at an epoch
    start, k after resuming from a checkpoint written after batch k. That progress is restored by
    Lightning itself; `load_state_dict` is not relied on (Lightning 2.6 skips it when
    `configure_optimizers` reads `estimated_stepping_batches`, which builds the loader before the
    checkpoint's loop state is loaded). `state_dict` marks the loader as resumable for Lightning."""

    batches_done: Callable[[], int] = staticmethod(lambda: 0)

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches_done": self.batches_done()}

    def load_state_dict(self, state: dict) -> None:
        pass  # where to start comes from the trainer's restored batch progress

    def __iter__(self):
        self.sampler.start = self.batches_done() * self.batch_size
        yield from super().__iter__()


def _processes_sharing_cpus(trainer) -> int:
    """How many loading processes of this node share this process's CPU set: one per device, except where srun
    started each rank as a task with its own CPUs."""
    if trainer is None:
        return 1
    env = getattr(getattr(trainer, "strategy", None), "cluster_environment", None)
    if type(env).__name__ == "SLURMEnvironment" and getattr(env, "creates_processes_externally", False):
        return 1
    return max(1, getattr(trainer, "num_devices", 1))


MAX_AUTO_WORKERS = 32  # `num_workers: null` on a large host with one GPU: enough to feed it, not one per core


class ShardedDataModule(L.LightningDataModule):
    """The loaders of a data module whose hparams hold `batch_size`, `num_workers`, `pin_memory`,
    `persistent_workers`, `seed` (None: the run's seed_everything) and optionally `prefetch_factor`, and whose
    `setup` makes `train_set`, `val_set` and `predict_set`. Subclasses set `collate_fn` and the evaluation batch
    size (`eval_batch_size`)."""

    collate_fn: Callable | None = None

    def _seed(self) -> int:
        return self.hparams.seed if self.hparams.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    @property
    def train_batch_size(self) -> int:
        return self.hparams.batch_size

    def eval_batch_size(self) -> int:
        return self.hparams.val_batch_size

    def num_workers(self) -> int:
        """`num_workers`, where None means: the CPUs this process may use, shared by the processes of this node
        that load data (one per device), less one each for the process itself — e.g. 15 per GPU for 2 GPUs on
        32 cores — at most `MAX_AUTO_WORKERS`. Under srun (Lightning's SLURM environment) every rank is a task
        with its own CPUs (`--cpus-per-task`), so nothing is shared: cpus-per-task − 1."""
        workers = self.hparams.num_workers
        if workers is not None:
            return workers
        try:
            cpus = len(os.sched_getaffinity(0))  # a job's allocation (SLURM cpus-per-task, taskset), not the host's
        except AttributeError:  # not on Linux
            cpus = os.cpu_count() or 1
        local = _processes_sharing_cpus(self.trainer)
        auto = min(MAX_AUTO_WORKERS, max(0, cpus // local - 1))
        if not getattr(self, "_told_workers", False):
            self._told_workers = True
            from lightning.pytorch.utilities import rank_zero_info

            rank_zero_info(f"data: {auto} loader workers per process (num_workers null: {cpus} CPUs for {local} "
                           "process(es) on this node, one CPU each kept for the process)")
        return auto

    def _loader_kwargs(self) -> dict:
        hp = self.hparams
        workers = self.num_workers()
        return dict(
            num_workers=workers, pin_memory=hp.pin_memory and torch.cuda.is_available(),
            persistent_workers=hp.persistent_workers and workers > 0,
            prefetch_factor=hp.get("prefetch_factor") if workers > 0 else None, collate_fn=self.collate_fn,
            # its own generator: making an iterator must not draw from the global RNG (exact resume)
            generator=torch.Generator().manual_seed(self._seed()),
        )

    def train_dataloader(self) -> DataLoader:
        world, rank = self._world()
        batch = self.train_batch_size
        if len(self.train_set) < batch * world:
            raise UserError(f"{len(self.train_set)} training images are fewer than one global batch "
                            f"({batch} × {world} devices); lower data.batch_size")
        sampler = ResumableSampler(self.train_set, world, rank, seed=self._seed(), drop_last=True)
        loader = ResumableLoader(self.train_set, batch_size=batch, sampler=sampler, drop_last=True,
                                 **self._loader_kwargs())
        trainer = self.trainer
        if trainer is not None:
            loader.batches_done = lambda: trainer.fit_loop.epoch_loop.batch_progress.current.ready
        return loader

    def _eval_loader(self, dataset) -> DataLoader:
        world, rank = self._world()  # every sample once over all ranks (no padding with repeats)
        return DataLoader(dataset, batch_size=self.eval_batch_size(), sampler=ShardedEvalSampler(dataset, world, rank),
                          **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader(self.predict_set)
