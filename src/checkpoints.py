"""Reading and writing checkpoint files without losing data and without running code from them.

- `load_checkpoint` reads any checkpoint (this project's, Lightning's, the authors') with
  `torch.load(weights_only=True)`: tensors, numbers, strings, lists, tuples and dicts only. A file that
  needs other Python objects (a pickle can call any function while it is read) is refused with one line,
  before anything in it runs. The project's own checkpoints need nothing beyond that: hyper-parameters
  are plain values and the RNG streams are stored as tensors and tuples (`ImageClassifier`).
  `SAFE_GLOBALS` lists the few harmless extra types a checkpoint may carry (paths).
- `AtomicCheckpointIO` is Lightning's checkpoint I/O with an atomic save: the file is written next to
  its destination and renamed over it, so a process killed during a save leaves the previous file intact
  and no temporary file (Lightning's own save writes a temporary file under TMPDIR and *copies* it when
  TMPDIR is on another filesystem: a kill during the copy truncates the only checkpoint). Its load is
  `load_checkpoint`. `ImageClassifier` installs it on every trainer it runs under.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import pickle
import re
import socket
import zipfile
from collections.abc import Callable
from typing import Any, BinaryIO

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from src.errors import InputNotFoundError, NotWritableError, UserError

# harmless types a checkpoint may hold besides tensors and plain values: constructing them runs no code
SAFE_GLOBALS = [pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath]


class CheckpointError(UserError):
    """A checkpoint file that cannot be used as given: empty, corrupt, holding code, or of another model."""


class CheckpointKeysError(CheckpointError, KeyError):
    """A checkpoint whose tensor names do not fit the model (missing or unexpected keys)."""


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """`torch.load(path, weights_only=True)` with `SAFE_GLOBALS` allowed; an empty, corrupt or unsafe
    file is a `CheckpointError` naming the file and what is wrong with it."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a folder; give a checkpoint file")
    if not os.path.isfile(path):
        raise InputNotFoundError(f"checkpoint not found: {path!r}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path!r} is empty (0 bytes); was its save interrupted?")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(e))))
        what = f"Python objects ({', '.join(found)})" if found else "Python objects other than tensors and plain values"
        raise CheckpointError(
            f"checkpoint {path!r} refused: it holds {what} that could run code when loaded; only tensors and plain "
            "values are read (re-save its state_dict with torch.save if you trust it)"
        ) from None
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, EOFError, zipfile.BadZipFile, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path!r} is not a readable PyTorch file (truncated or corrupt?): {first}") from None


def check_checkpoint_folder(folder: str | os.PathLike) -> None:
    """Refuse, before training, a checkpoint folder that cannot be created or written: the first save, an epoch
    or more later, would fail and lose that work."""
    existing = os.path.abspath(os.fspath(folder))
    while not os.path.exists(existing):  # the nearest part that exists must be a folder we can write in
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise NotWritableError(
            f"checkpoints cannot be written to {os.fspath(folder)!r} ({existing!r} is not a writable folder); set the "
            "ModelCheckpoint dirpath, trainer.default_root_dir or the logger's save_dir to a writable place"
        )


def check_architecture(saved: dict, current: dict, path: str | os.PathLike, ignore: tuple[str, ...] = (),
                       key_prefix: str = "model.init_args.backbone.init_args.") -> None:
    """Stop with one line naming every knob whose value in the checkpoint (`saved`) differs from the model's
    (`current`): weights of another architecture would load into the wrong function, or not at all. `backend`
    computes the same function and may differ (it is logged). Knobs that only one side records are not compared
    (older checkpoints, newer knobs)."""
    differ = [f"{key_prefix}{k}: checkpoint {saved[k]!r}, config {current[k]!r}" for k in current
              if k in saved and k != "backend" and k not in ignore and plain(saved[k]) != plain(current[k])]
    if differ:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} is of another architecture: {'; '.join(differ)} "
                              "(set these to the checkpoint's values)")
    if saved.get("backend", current.get("backend")) != current.get("backend"):
        rank_zero_info(f"checkpoint {os.fspath(path)!r} was written with backend {saved['backend']!r}, running with "
                       f"{current['backend']!r} (the same function)")


def plain(value: Any) -> Any:
    """Lists and tuples as lists (nested), for comparing a config's values with those stored in a checkpoint."""
    return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write a file by `write(f)` so that `path` is always either the old file or the complete new one.

    The data go to an unnamed file in the destination folder (Linux `O_TMPFILE`), which is given a name
    only once written and synced, then renamed over `path` (a rename within one filesystem is atomic). A
    process killed while writing leaves nothing behind: the unnamed file vanishes with it. Where
    `O_TMPFILE` is missing, a named temporary file in the same folder is used instead and removed on any
    error; one left by a killed process is removed by the next save to the same path on that host."""
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    prefix = f".{name}.{socket.gethostname()}-"
    _remove_stale_temporaries(folder, prefix)
    tmp = os.path.join(folder, f"{prefix}{os.getpid()}.{os.urandom(4).hex()}.tmp")
    folder_fd = os.open(folder, os.O_RDONLY)
    fd = _open_unnamed(folder)
    try:
        if fd is None:  # no O_TMPFILE: a named temporary file, removed below on failure
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            fd = None
            write(f)
            f.flush()
            os.fsync(f.fileno())
            if not os.path.exists(tmp):  # name the unnamed file, complete and synced (linkat, following /proc's link)
                os.link(f"/proc/self/fd/{f.fileno()}", os.path.basename(tmp), dst_dir_fd=folder_fd)
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # the rename itself on disk (some filesystems cannot sync folders)
            os.fsync(folder_fd)
    except BaseException:
        if fd is not None:
            os.close(fd)
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        os.close(folder_fd)


def _open_unnamed(folder: str) -> int | None:
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(folder, flag | os.O_WRONLY, 0o666)
    except OSError:  # filesystems without O_TMPFILE support
        return None


def _remove_stale_temporaries(folder: str, prefix: str) -> None:
    """Named temporary files of earlier saves on this host whose process no longer runs."""
    for entry in os.scandir(folder):
        if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")):
            continue
        pid = entry.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                pass


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_local(path: Any) -> bool:
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else ""
    return bool(text) and ("://" not in text or text.startswith("file://"))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O: atomic local saves (`write_atomically`) and safe loads (`load_checkpoint`).
    Remote paths (s3://, gs://, ...) keep Lightning's own handling for saving."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        local = os.fspath(path).removeprefix("file://")
        write_atomically(local, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None):
        if weights_only is False:  # an explicit opt-in of the caller (`--weights_only false`): the file is trusted
            return super().load_checkpoint(path, map_location, weights_only=False)
        if not _is_local(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return load_checkpoint(os.fspath(path).removeprefix("file://"), map_location)


def rng_states(trainer, with_numpy: bool = True) -> list[dict]:
    """Every rank's random streams (Python, torch CPU and CUDA, optionally NumPy) as plain types and tensors, in
    rank order — gathered on all ranks, written once by rank 0 — for an exact resume (`restore_rng_state`)."""
    import random

    import numpy as np

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if with_numpy:  # the state tuple as plain types: checkpoints are read with weights_only=True
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():
        states = [None] * trainer.world_size
        torch.distributed.all_gather_object(states, state)
        return states
    return [state]


def restore_rng_state(trainer, states: list[dict] | None) -> None:
    """Restore this rank's streams from `rng_states` of a checkpoint (a warning, and nothing restored, when the
    checkpoint was written by another number of ranks)."""
    import random

    import numpy as np
    from lightning.pytorch.utilities import rank_zero_warn

    if not states:
        return
    if len(states) != trainer.world_size:
        rank_zero_warn(f"the checkpoint holds RNG streams of {len(states)} ranks, this run has {trainer.world_size}; "
                       "not restored")
        return
    state = states[trainer.global_rank]
    random.setstate(state["python"])
    if "numpy" in state:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
