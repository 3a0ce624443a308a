"""Command line of the project: `python main.py {fit,validate,test,predict} [--config FILE] [--key value ...]`.

LightningCLI in subclass mode: any LightningModule and LightningDataModule can be chosen from YAML by
`class_path`. With no --config, configs/default.yaml is used (Spatial-Mamba on the embedded digits).
`python main.py flops --config FILE [--image_size N]` prints parameters and MACs of a config's model.
"""

import os
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from src.errors import reports_user_errors

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "default.yaml")


class CLI(LightningCLI):
    """LightningCLI whose config is the record of a run, also with `--ckpt_path`.

    Lightning's CLI unpickles a `--ckpt_path` file itself and copies the hyper-parameters stored in it over the
    config, so a new value on the command line (`--model.init_args.lr` on resume) was silently replaced by the
    checkpoint's. Here the file is read only by the trainer, through `src.checkpoints` (weights only), and the
    config is used as given: `ImageClassifier` lists the values that differ from the checkpoint's, checks the
    backbone's architecture against it and applies new optimiser values on resume."""

    def _parse_ckpt_path(self) -> None:
        pass

    def before_instantiate_classes(self) -> None:
        if self.subcommand == "fit" and self.config.fit.get("ckpt_path") == "last":
            continue_last_run(self.config.fit)

    def instantiate_trainer(self, **kwargs):
        from src.callbacks import use_progress_bar

        trainer = super().instantiate_trainer(**kwargs)
        use_progress_bar(trainer)  # a bar that does not wait for the GPU at every step
        return trainer


def continue_last_run(config) -> None:
    """`fit --ckpt_path last` where the logger numbers its runs (`version_0`, `version_1`, ...) and checkpoints are
    kept in the run's folder (no fixed `dirpath`): log to the newest run that holds a last checkpoint, so Lightning
    finds that checkpoint and the run goes on in its own folder (it would look in a new, empty version folder and
    start from scratch)."""
    logger = config.trainer.get("logger")
    if not hasattr(logger, "init_args") or not str(logger.class_path).endswith("TensorBoardLogger"):
        return
    if logger.init_args.get("version") is not None:
        return
    if any(getattr(c, "init_args", None) and c.init_args.get("dirpath") for c in config.trainer.get("callbacks") or []):
        return
    folder = Path(logger.init_args.get("save_dir") or ".") / (logger.init_args.get("name") or "")
    runs = []
    for run in folder.glob("version_*"):
        number = run.name.removeprefix("version_")
        saved = [p.stat().st_mtime for p in (run / "checkpoints").glob("*last*.ckpt")]
        if number.isdigit() and saved:
            runs.append((max(saved), int(number)))
    if runs:
        logger.init_args.version = max(runs)[1]


def cli(args=None, run: bool = True) -> LightningCLI:
    uses_config = any(a == "--config" or a.startswith("--config=") for a in (sys.argv[1:] if args is None else args))
    parser_kwargs = {"default_config_files": [] if uses_config else [DEFAULT_CONFIG]}
    return CLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs=parser_kwargs if not run else {cmd: parser_kwargs for cmd in LightningCLI.subcommands()},
        args=args,
        run=run,
    )


@reports_user_errors
def run_command(argv: list[str]) -> None:
    if argv and argv[0] == "flops":
        from src.flops import flops_main

        flops_main(argv[1:], cli)
    else:
        cli()


def main() -> None:
    """Bad input (a `src.errors.UserError`: config value, data path, checkpoint, output file) ends with one
    line `error: ...` and exit code 2; anything else, out of memory included, keeps its traceback."""
    code = run_command(sys.argv[1:])
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
