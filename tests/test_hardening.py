"""Misuse and faults: checkpoints that are killed mid-save, crafted to run code, or of another model; resume
with new optimiser values; evaluation without weights; NaN losses; odd image files and folders."""

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main
from src.checkpoints import AtomicCheckpointIO, CheckpointError, load_checkpoint, write_atomically
from tests.conftest import requires_cuda

ROOT = Path(main.__file__).parent

# A child process that saves a checkpoint through the trainer's checkpoint I/O (as ImageClassifier sets it up)
# and SIGKILLs itself from a watcher thread once half of the checkpoint's bytes have been written.
KILL_DURING_SAVE = r"""
import os, signal, sys, threading, time
import lightning as L, torch
from src.models.classifier import ImageClassifier

path, size = sys.argv[1], int(sys.argv[2])
trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
model = ImageClassifier(torch.nn.Linear(4, 10), num_classes=10)
model.trainer = trainer
model.setup("fit")
io = trainer.strategy.checkpoint_io
checkpoint = {f"w{i}": torch.full((size // 64 // 4,), float(i)) for i in range(64)}  # 64 writes of size/64 bytes

def written():
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar")).split()[1])

start = written()
def watch():
    while written() - start < size // 2:
        time.sleep(0.0002)
    os.kill(os.getpid(), signal.SIGKILL)

threading.Thread(target=watch, daemon=True).start()
io.save_checkpoint(checkpoint, path)
print("save finished before the kill")
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/io") or not os.path.isdir("/dev/shm"), reason="needs Linux /proc and /dev/shm")
def test_sigkill_during_checkpoint_save_keeps_previous_and_leaves_no_temp(tmp_path):
    """TMPDIR on another filesystem (tmpfs) than the checkpoint folder: the kill leaves the old last.ckpt loadable
    and no temporary file in either place (Lightning's save wrote under TMPDIR and copied across)."""
    folder, tmpdir = tmp_path / "ckpt", Path(os.environ.get("SHM_DIR", "/dev/shm")) / f"sm-test-{os.getpid()}"
    folder.mkdir(), tmpdir.mkdir()
    try:
        assert os.stat(folder).st_dev != os.stat(tmpdir).st_dev
        last = folder / "last.ckpt"
        AtomicCheckpointIO().save_checkpoint({"epoch": 3, "w": torch.arange(5.0)}, last)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmpdir)}
        out = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(last), str(32 << 20)], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == -signal.SIGKILL, out.stdout + out.stderr[-2000:]
        previous = load_checkpoint(last)
        assert previous["epoch"] == 3 and torch.equal(previous["w"], torch.arange(5.0))
        assert sorted(os.listdir(folder)) == ["last.ckpt"]
        assert os.listdir(tmpdir) == []
    finally:
        for f in tmpdir.iterdir():
            f.unlink()
        tmpdir.rmdir()


def test_failed_save_leaves_previous_file_and_no_temp(tmp_path, monkeypatch):
    """Also without O_TMPFILE (named temporary file in the folder): an error mid-write removes it, and a temporary
    left by a killed process (dead pid) is removed by the next save."""
    monkeypatch.delattr(os, "O_TMPFILE", raising=False)
    path = tmp_path / "last.ckpt"
    write_atomically(path, lambda f: f.write(b"old"))

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["last.ckpt"]
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    stale = tmp_path / f".last.ckpt.{os.uname().nodename}-{dead.pid}.0000.tmp"
    stale.write_bytes(b"partial")
    write_atomically(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["last.ckpt"]


class RunsCode:
    """Unpickling this calls exec, which writes a marker file: what a crafted checkpoint can do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.fixture
def crafted_checkpoint(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {"backbone.head.weight": torch.zeros(2, 2)}, "hyper_parameters": RunsCode(marker)}, path)
    return path, marker


def test_crafted_checkpoint_is_refused_without_running(crafted_checkpoint):
    from ablations.erf import load_checkpoint as erf_load
    from src.models.spatial_mamba import load_pretrained, spatial_mamba_digits

    path, marker = crafted_checkpoint
    with pytest.raises(CheckpointError, match=r"refused: it holds Python objects \(exec\) that could run code"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refused"):
        load_pretrained(spatial_mamba_digits(backend="torch"), path)
    with pytest.raises(CheckpointError, match="refused"):
        erf_load(torch.nn.Linear(2, 2), path)
    with pytest.raises(CheckpointError, match="refused"):
        AtomicCheckpointIO().load_checkpoint(path)
    assert not marker.exists()
    with open(path, "wb") as f:  # a bare pickle (no zip container) too
        pickle.dump(RunsCode(marker), f)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("content,message", [(b"", "is empty"), (b"PK\x03\x04 not really", "not a readable PyTorch file")])
def test_empty_or_corrupt_checkpoint_is_one_line(tmp_path, content, message):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def run_main_inprocess(monkeypatch, capsys, *args) -> tuple[int, str]:
    """main.main() with argv; (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["main.py", *args])
    monkeypatch.delenv("SPATIAL_MAMBA_TRACEBACK", raising=False)
    code = 0
    try:
        main.main()
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]
ONE_BATCH = 0.03  # of the 45 digits validation batches of 8 (an integer 1 would be parsed as the fraction 1.0: all)
BACKBONE = "--model.init_args.backbone.init_args."
TINY = [f"{BACKBONE}dims=[8, 16, 32, 64]", f"{BACKBONE}depths=[1, 1, 1, 1]", f"{BACKBONE}backend=torch",
        "--data.init_args.batch_size=8"]


def test_ckpt_path_with_code_is_refused_in_one_line(tmp_path, monkeypatch, capsys, crafted_checkpoint):
    path, marker = crafted_checkpoint
    monkeypatch.chdir(tmp_path)
    code, err = run_main_inprocess(monkeypatch, capsys, "validate", "--ckpt_path", str(path), *QUIET, *TINY,
                                   f"--trainer.limit_val_batches={ONE_BATCH}")
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith(f"error: checkpoint {str(path)!r} refused: it holds Python objects")
    assert not marker.exists()


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """last.ckpt of 1 step of a narrow digits model (TINY), one validation batch, lr 3e-3."""
    folder = tmp_path_factory.mktemp("run")
    cli = main.cli(["fit", *QUIET, f"--trainer.default_root_dir={folder}", "--trainer.max_steps=1",
                    f"--trainer.limit_val_batches={ONE_BATCH}", *TINY])
    path = folder / "checkpoints" / "last.ckpt"
    assert cli.trainer.global_step == 1 and path.is_file()
    return path


def test_checkpoint_records_architecture_and_refuses_another(trained_checkpoint, tmp_path, monkeypatch, capsys):
    arch = load_checkpoint(trained_checkpoint)["architecture"]
    assert arch["dims"] == [8, 16, 32, 64] and arch["depths"] == [1, 1, 1, 1] and arch["dilations"] == [1, 3, 5] and arch["scan"] == "row"
    assert arch["backend"] == "torch" and arch["num_classes"] == 10 and arch["fusion_kernel_size"] == 3
    monkeypatch.chdir(tmp_path)
    # same shapes, another function: dilations and scan order
    code, err = run_main_inprocess(monkeypatch, capsys, "validate", "--ckpt_path", str(trained_checkpoint), *QUIET, *TINY,
                                   f"{BACKBONE}dilations=[1, 2, 3]", f"{BACKBONE}scan=cross")
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("error: checkpoint") and "is of another architecture" in line, err
    assert f"{BACKBONE[2:]}dilations: checkpoint [1, 3, 5], config [1, 2, 3]" in line and "scan: checkpoint 'row'" in line
    assert "mlp_ratio" not in line


def test_other_backend_is_allowed_and_reported(trained_checkpoint, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO"):
        cli = main.cli(["validate", "--ckpt_path", str(trained_checkpoint), *QUIET, f"--trainer.limit_val_batches={ONE_BATCH}",
                        *TINY, f"{BACKBONE}backend=auto"])
    assert "val/acc1" in cli.trainer.callback_metrics
    assert "written with backend 'torch', running with 'auto'" in caplog.text


def test_resume_takes_new_optimiser_values(trained_checkpoint, tmp_path, monkeypatch, caplog):
    """`--model.init_args.lr` on resume was replaced by the checkpoint's value (LightningCLI copied the stored
    hyper-parameters over the command line, and the restored scheduler kept the old base lr)."""
    monkeypatch.chdir(tmp_path)
    with caplog.at_level("INFO"):
        cli = main.cli(["fit", "--ckpt_path", str(trained_checkpoint), *QUIET, f"--trainer.default_root_dir={tmp_path}",
                        "--trainer.max_steps=2", "--trainer.limit_val_batches=0", *TINY,
                        "--model.init_args.lr=1e-3", "--model.init_args.weight_decay=0.01"])
    assert cli.trainer.global_step == 2 and cli.model.hparams.lr == 1e-3
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == [1e-3, 1e-3]
    groups = cli.trainer.optimizers[0].param_groups
    assert groups[0]["weight_decay"] == 0.01 and groups[1]["weight_decay"] == 0.0
    assert groups[0]["lr"] == pytest.approx(1e-3 * scheduler.lr_lambdas[0](scheduler.last_epoch))
    assert "peak lr 0.003 -> 0.001" in caplog.text and "weight_decay 0.05 -> 0.01" in caplog.text


@pytest.mark.parametrize("command", ["validate", "predict"])
def test_evaluating_random_weights_warns(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED weights"):
        main.cli([command, *QUIET, f"--trainer.limit_val_batches={ONE_BATCH}", f"--trainer.limit_predict_batches={ONE_BATCH}", *TINY])


def test_pretrained_lightning_checkpoint_of_another_architecture_is_refused(trained_checkpoint):
    from src.models.spatial_mamba import load_pretrained, spatial_mamba_digits

    tiny = {"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1)}
    with pytest.raises(CheckpointError, match=r"scan: checkpoint 'row', config 'column'"):
        load_pretrained(spatial_mamba_digits(backend="torch", scan="column", **tiny), trained_checkpoint)
    load_pretrained(spatial_mamba_digits(backend="torch", num_classes=7, **tiny), trained_checkpoint)  # fine-tuning: new head


@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=[pytest.mark.gpu, requires_cuda,
                                                                        pytest.mark.minutes(1.25)])])
@pytest.mark.parametrize("checkpoint_every_step", [False, True])
def test_nan_loss_stops_the_run_naming_the_step(tmp_path, monkeypatch, accelerator, checkpoint_every_step):
    """On the CPU the NaN step itself stops the run; on a GPU the verdict is read one step late (no per-step
    wait for the device), but a checkpoint due at the NaN step is refused before it is written. The backbone runs
    eager: the verdict is the training step's, outside the backbone, and a compile of it (the GPU default) cost
    each GPU case about 2.5 minutes of the GPU suite's compiles (the compiled paths have their own tests)."""
    from src.models.classifier import NonFiniteLossError

    monkeypatch.chdir(tmp_path)
    every = ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
             "--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.save_top_k=-1"]
    cli = main.cli([*QUIET, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=6", "--trainer.limit_val_batches=0",
                    f"--trainer.accelerator={accelerator}", "--trainer.precision=32-true",
                    "--model.init_args.compile=false",
                    *(every if checkpoint_every_step else []), *TINY], run=False)
    class NaNAtSecondStep(torch.nn.Module):
        def __init__(self, criterion):
            super().__init__()
            self.criterion, self.calls = criterion, 0

        def forward(self, logits, targets):
            self.calls += 1
            loss = self.criterion(logits, targets)
            return loss * float("nan") if self.calls == 2 else loss

    cli.model.criterion = NaNAtSecondStep(cli.model.criterion)
    with pytest.raises(NonFiniteLossError, match=r"the training loss is nan at optimizer step 2 .*try a lower model"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    stopped_at = 2 if accelerator == "cpu" or checkpoint_every_step else 3
    assert cli.trainer.global_step == stopped_at and not list(tmp_path.rglob("*.ckpt"))
    assert issubclass(NonFiniteLossError, RuntimeError)  # main prints it as one line


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    from PIL import Image

    from src.data.imagefolder import ImageFolderDataset

    levels = torch.tensor([[0, 257 * 64], [257 * 128, 65535]], dtype=torch.int32).repeat_interleave(4, 0)
    Image.fromarray(levels.numpy().astype("uint16")).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode.startswith("I")  # read as 16-bit
    rgb, _ = ImageFolderDataset([str(tmp_path / "deep.png")], [0]).load(0)
    assert rgb.mode == "RGB" and [rgb.getpixel((x, 0)) for x in (0, 1)] == [(0, 0, 0), (64, 64, 64)]
    assert [rgb.getpixel((x, 4)) for x in (0, 1)] == [(128, 128, 128), (255, 255, 255)]


def test_class_folders_with_symlink_loops_list_each_file_once(tmp_path):
    from PIL import Image

    from src.data.imagefolder import scan_class_folders, scan_images

    cat = tmp_path / "train" / "cat"
    (cat / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.png"):
        Image.new("RGB", (4, 4)).save(cat / name)
    (cat / "sub" / "loop").symlink_to(cat)  # cat/sub/loop -> cat: endless when links are followed blindly
    (cat / "again").symlink_to(cat / "sub")
    (cat / "a_link.png").symlink_to(cat / "a.png")
    classes, files = scan_class_folders(str(tmp_path / "train"))
    assert classes == ["cat"] and [Path(p).relative_to(cat).as_posix() for p in files[0]] == ["a.png", "again/b.png"]
    assert len(scan_images(str(tmp_path / "train"))) == 2


def test_predict_on_digits_writes_predictions(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="RANDOMLY"):
        main.cli(["predict", *QUIET, *TINY, f"--trainer.limit_predict_batches={ONE_BATCH}",
                  "--data.init_args.predict_output=out/digits.csv"])
    rows = (tmp_path / "out" / "digits.csv").read_text().splitlines()
    assert rows[0] == "path,class_index,class_name,probability" and len(rows) == 1 + 8
    assert rows[1].startswith("val/0000,")
    code, err = run_main_inprocess(monkeypatch, capsys, "predict", *QUIET, *TINY,
                                   "--data.init_args.predict_output=out/digits.csv")
    assert code == 2 and "error: data.init_args.predict_output 'out/digits.csv' exists" in err


def test_predict_with_a_data_module_without_output_is_refused(tmp_path, monkeypatch):
    import lightning as L

    from src.data import DigitsDataModule
    from src.models import ImageClassifier, spatial_mamba_digits

    class NoOutput(L.LightningDataModule):
        def predict_dataloader(self):
            return DigitsDataModule(batch_size=8).predict_dataloader()

    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    model = ImageClassifier(spatial_mamba_digits(backend="torch", dims=(8, 16, 32, 64), depths=(1, 1, 1, 1)), num_classes=10)
    with pytest.raises(ValueError, match="predict writes its results to data.init_args.predict_output, which NoOutput"):
        trainer.predict(model, datamodule=NoOutput())


def _classifier(**kwargs):
    from src.models import ImageClassifier

    return ImageClassifier(torch.nn.Linear(4, 10), num_classes=10, **kwargs)


def _backbone(**kwargs):
    from src.models.spatial_mamba import spatial_mamba_digits

    return spatial_mamba_digits(backend="torch", **kwargs)


def _digits(**kwargs):
    from src.data import DigitsDataModule

    return DigitsDataModule(**kwargs)


def _folders(**kwargs):
    from src.data import ImageFolderDataModule

    return ImageFolderDataModule(**kwargs)


def _metrics(**kwargs):
    from src.callbacks import ExperimentMetrics

    return ExperimentMetrics(**kwargs)


@pytest.mark.parametrize("build,kwargs,message", [
    (_classifier, {"weight_decay": -0.1}, "model.init_args.weight_decay must be >= 0, got -0.1"),
    (_classifier, {"betas": (1.5, 0.9)}, r"model.init_args.betas must be two numbers in \[0, 1\), got \[1.5, 0.9\]"),
    (_classifier, {"eps": 0.0}, "model.init_args.eps must be > 0, got 0.0"),
    (_classifier, {"warmup_epochs": -1.0}, "model.init_args.warmup_epochs must be >= 0"),
    (_classifier, {"label_smoothing": 1.5}, r"model.init_args.label_smoothing must be in \[0, 1\), got 1.5"),
    (_classifier, {"mixup": -0.2}, "model.init_args.mixup must be >= 0"),
    (_classifier, {"mixup_prob": 2.0}, r"model.init_args.mixup_prob must be a probability in \[0, 1\], got 2.0"),
    (_classifier, {"mesa_start": float("nan")}, "model.init_args.mesa_start must be a probability"),
    (_classifier, {"mixup_mode": "pairs"}, "model.init_args.mixup_mode must be 'batch', 'pair' or 'elem'"),
    (_backbone, {"mlp_ratio": 0.0}, "mlp_ratio must be > 0, got 0.0"),
    (_backbone, {"in_chans": 0}, "in_chans must be >= 1, got 0"),
    (_backbone, {"num_classes": -1}, "num_classes must be >= 0"),
    (_digits, {"batch_size": 0}, "data.init_args.batch_size must be >= 1, got 0"),
    (_digits, {"num_workers": -1}, "data.init_args.num_workers must be >= 0, got -1"),
    (_folders, {"hflip": 1.5}, r"data.init_args.hflip must be a probability in \[0, 1\], got 1.5"),
    (_folders, {"re_prob": -0.1}, "data.init_args.re_prob must be a probability"),
    (_folders, {"scale": (0.9, 0.1)}, r"data.init_args.scale must be \(min, max\) with 0.0 < min <= max <= 1.0, got \[0.9, 0.1\]"),
    (_folders, {"ratio": (0.0, 1.0)}, r"data.init_args.ratio must be \(min, max\)"),
    (_folders, {"std": (0.2, 0.0, 0.2)}, "data.init_args.mean/std must be three numbers each"),
    (_folders, {"val_batch_size": 0}, "data.init_args.val_batch_size must be >= 1 or null"),
    (_metrics, {"infer_batches": 0}, "ExperimentMetrics infer_batches must be >= 1, got 0"),
    (_metrics, {"warmup_steps": -1}, "ExperimentMetrics warmup_steps must be >= 0, got -1"),
])
def test_numeric_knobs_are_range_checked_where_declared(build, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build(**kwargs)


def test_out_of_range_knob_is_one_line_from_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run_main_inprocess(monkeypatch, capsys, "fit", *QUIET, "--model.init_args.label_smoothing=1.5")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: model.init_args.label_smoothing must be in [0, 1)")


def test_fit_ckpt_path_last_continues_the_last_run_of_the_default_config(tmp_path, monkeypatch):
    """Runs of the default config log to logs/default/version_N: `--ckpt_path last` looked only in a new, empty
    version folder and started from scratch."""
    monkeypatch.chdir(tmp_path)
    args = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.limit_val_batches=0", *TINY]
    first = main.cli(["fit", *args, "--trainer.max_steps=1"])
    assert first.trainer.logger.version == 0 and first.trainer.global_step == 1
    resumed = main.cli(["fit", *args, "--trainer.max_steps=2", "--ckpt_path", "last"])
    assert resumed.trainer.ckpt_path == str(tmp_path / "logs/default/version_0/checkpoints/last.ckpt")
    assert resumed.trainer.logger.version == 0 and resumed.trainer.global_step == 2
    assert sorted(p.name for p in (tmp_path / "logs" / "default").iterdir()) == ["version_0"]


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("CUDA error: out of memory")])
def test_out_of_memory_keeps_its_traceback(monkeypatch, error):
    """The one-line handler is for bad input; running out of memory is not, and was printed as `error: ...`."""
    def failing_cli():
        raise error

    monkeypatch.setattr(main, "cli", failing_cli)
    monkeypatch.setattr(sys, "argv", ["main.py", "fit"])
    monkeypatch.delenv("SPATIAL_MAMBA_TRACEBACK", raising=False)
    with pytest.raises(type(error), match="out of memory"):
        main.main()


def test_unwritable_checkpoint_folder_is_refused_before_training(tmp_path, monkeypatch):
    """A checkpoint folder under a file: the first save, after an epoch of training, failed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("a file, not a folder")
    callback = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": "taken/ckpt", "every_n_epochs": 2}}
    cli = main.cli([*QUIET, "--trainer.max_steps=1", f"--trainer.callbacks+={json.dumps(callback)}", *TINY], run=False)
    with pytest.raises(PermissionError, match=r"checkpoints cannot be written to .*taken.* is not a writable folder"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 0


def test_erf_tool_refuses_an_existing_output_before_any_work(tmp_path, capsys, monkeypatch):
    from ablations import erf

    out = tmp_path / "erf.png"
    out.write_bytes(b"a figure the user keeps")
    monkeypatch.setattr(erf, "build_backbone", lambda configs: pytest.fail("the model was built before the check"))
    assert erf.main(["--config", str(ROOT / "configs" / "default.yaml"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {str(out)!r} exists and would be overwritten; pass --overwrite"), err
    assert out.read_bytes() == b"a figure the user keeps"
