"""src/compiling.py `CompileCache` (the LightningModules' `compile_cache`): torch.compile's artifacts written to a
file by one process are loaded by a fresh one (empty inductor cache), whose compile then hits them; unreadable
files and unwritable places get clear outcomes."""

import json
import os
import subprocess
import sys

import pytest

from src.compiling import CompileCache
from src.errors import NotWritableError
from tests.test_imagenet import ROOT, SUBPROCESS_ENV

SCRIPT = """
import json, sys
import torch
from torch._dynamo.utils import counters
from src.compiling import CompileCache
cache = CompileCache(sys.argv[1])
loaded = cache.load()
f = torch.compile(lambda x: torch.sin(x) * 2 + 1)
f(torch.randn(8))
print("RESULT", json.dumps(dict(loaded=loaded, hits=counters["inductor"]["fxgraph_cache_hit"], written=cache.save())))
"""


def _fresh_process(path, cache_dir) -> dict:
    env = dict(SUBPROCESS_ENV, TORCHINDUCTOR_CACHE_DIR=str(cache_dir))
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(next(line[7:] for line in out.stdout.splitlines() if line.startswith("RESULT ")))


@pytest.mark.slow
def test_artifacts_written_by_one_process_are_hit_by_a_fresh_one(tmp_path):
    path = tmp_path / "cache" / "compile.bin"  # the folder does not exist yet
    first = _fresh_process(path, tmp_path / "inductor-1")
    assert first["loaded"] == 0 and first["hits"] == 0 and first["written"] > 0 and path.is_file()
    stamp = path.stat().st_mtime_ns
    second = _fresh_process(path, tmp_path / "inductor-2")  # an empty inductor cache, as on a new machine
    assert second["loaded"] == first["written"] and second["hits"] >= 1
    assert second["written"] is None and path.stat().st_mtime_ns == stamp  # nothing new: the file is left alone
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary file left behind


def test_unreadable_file_warns_and_compiles_from_scratch(tmp_path):
    path = tmp_path / "compile.bin"
    path.write_bytes(b"not a cache")
    with pytest.warns(UserWarning, match="could not be loaded"):
        assert CompileCache(path).load() == 0


def test_unwritable_places_are_refused_by_name(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotWritableError, match="model.init_args.compile_cache"):
        CompileCache(tmp_path / "a_file" / "compile.bin", key="model.init_args.compile_cache")
    with pytest.raises(NotWritableError, match="file path"):
        CompileCache(tmp_path)  # a folder, not a file
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(NotWritableError):
            CompileCache(locked / "compile.bin")


def test_fit_loads_before_compiling_and_writes_after_the_first_step_and_validation(tmp_path, monkeypatch):
    """The classifier's wiring, without compiling on the CPU: the cache is loaded in setup (before the compile),
    saved after the first training step and at the end of each validation, by rank 0."""
    import main
    import src.compiling as compiling
    import src.models.classifier as classifier
    from tests.test_hardening import ONE_BATCH, QUIET, TINY

    calls = []

    class Recorder:
        def __init__(self, path, key):
            self.path = path
            calls.append(("init", str(path), key))

        def load(self):
            calls.append("load")
            return 0

        def save(self):
            calls.append("save")
            return 3

    monkeypatch.setattr(compiling, "CompileCache", Recorder)
    monkeypatch.setattr(classifier, "compile_for_training", lambda *a, **k: calls.append("compile"))
    monkeypatch.chdir(tmp_path)
    cli = main.cli([*QUIET, *TINY, "--trainer.accelerator=cpu", "--trainer.max_steps=3",
                    "--trainer.val_check_interval=2", f"--trainer.limit_val_batches={ONE_BATCH}",
                    "--model.init_args.compile=true", f"--model.init_args.compile_cache={tmp_path / 'c.bin'}"],
                   run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert calls[:3] == [("init", str(tmp_path / "c.bin"), "model.init_args.compile_cache"), "load", "compile"]
    # after step 1; after the validations at step 2 and at the end (max_steps 3 ends the epoch: no more)
    assert calls[3:] == ["save"] * (len(calls) - 3) and len(calls) - 3 >= 2


def test_segmenter_loads_the_cache_before_compiling_and_writes_it_through_its_callback(tmp_path, monkeypatch):
    import src.compiling as compiling
    import src.models.segmenter as segmenter
    from tests.test_segmentation import tiny_segmenter

    calls = []

    class Recorder:
        def __init__(self, path, key):
            self.path = path
            calls.append("init")

        def load(self):
            calls.append("load")
            return 5

        def save(self):
            calls.append("save")
            return None  # nothing new: nothing written

    monkeypatch.setattr(compiling, "CompileCache", Recorder)
    monkeypatch.setattr(segmenter, "compile_for_training", lambda *a, **k: calls.append("compile"))
    model = tiny_segmenter(compile=True, compile_cache=str(tmp_path / "c.bin"))
    model.setup("fit")
    assert calls == ["init", "load", "compile"]
    writers = [c for c in model.configure_callbacks() if isinstance(c, compiling.CompileCacheWriter)]
    assert len(writers) == 1

    class Trainer:
        is_global_zero = True

    writers[0].on_train_batch_end(Trainer(), model, None, None, 0)
    writers[0].on_train_batch_end(Trainer(), model, None, None, 1)  # only after the first step
    writers[0].on_validation_end(Trainer(), model)
    assert calls[3:] == ["save", "save"]
