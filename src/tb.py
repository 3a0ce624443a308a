"""TensorBoard helpers shared by the LightningModules and callbacks."""

from __future__ import annotations

from collections.abc import Iterable

from lightning.pytorch.utilities import rank_zero_only


@rank_zero_only
def log_hparams(loggers: Iterable, hparams: dict, metric_names: Iterable[str]) -> None:
    """Write one HParams record per TensorBoard logger, declaring `metric_names` as its metric columns.

    `TensorBoardLogger.log_hyperparams(params, metrics)` would also write each metric's placeholder value
    as a scalar at step 0 (a fake `val/acc1 = 0` point in every curve); writing the record directly only
    declares the columns, and TensorBoard fills them from the run's real scalars. TensorBoard keeps the
    FIRST record of a run. Other loggers get `log_hyperparams(hparams)`. Runs on global rank 0 only (the
    other ranks' loggers have no writer).
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            from torch.utils.tensorboard.summary import hparams as hparams_summary

            writer = logger.experiment._get_file_writer()
            if writer is None:
                continue
            for record in hparams_summary(hparams, {name: 0.0 for name in metric_names}):
                writer.add_summary(record)
        else:
            logger.log_hyperparams(hparams)
