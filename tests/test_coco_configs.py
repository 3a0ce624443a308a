"""The COCO configs are one recipe (configs/coco/recipe.yaml) and a run file per size and schedule given as a second
--config. Each of the five runs resolves to exactly the config of the single file it replaced: the T 1× file is
kept in tests/data and the other four are rebuilt from it with the values in which they differed (listed below)."""

import contextlib
import copy
import io
from pathlib import Path

import pytest
import yaml

import main

ROOT = Path(main.__file__).parent
COCO = ROOT / "configs" / "coco"
RECIPE = COCO / "recipe.yaml"
T_1X_BEFORE = ROOT / "tests" / "data" / "coco_t_1x_before_split.yaml"

S_DEPTHS = {"model.init_args.backbone.init_args.depths": [2, 4, 21, 5]}
SCHEDULE_3X = {"trainer.max_epochs": 36, "model.init_args.milestones": [27, 33],
               "data.init_args.train_short_sides": [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800],
               "data.init_args.crop_branch": True, "data.init_args.crop_pre_short_sides": [400, 500, 600],
               "data.init_args.crop_size": [384, 600]}
# (size, schedule) -> where that run's single file differed from the T 1× one, besides its run folder
DIFFERED = {
    ("t", "1x"): {},
    ("s", "1x"): {**S_DEPTHS, "model.init_args.backbone.init_args.drop_path_rate": 0.3},
    ("b", "1x"): {"model.init_args.backbone.init_args.dims": [96, 192, 384, 768], **S_DEPTHS,
                  "model.init_args.backbone.init_args.drop_path_rate": 0.5},
    ("t", "3x"): SCHEDULE_3X,
    ("s", "3x"): {**S_DEPTHS, "model.init_args.backbone.init_args.drop_path_rate": 0.3, **SCHEDULE_3X},
}
RUNS = sorted(DIFFERED)


def run_file(size: str, schedule: str) -> Path:
    return COCO / f"mask_rcnn_spatial_mamba_{size}_{schedule}.yaml"


def run_folder(size: str, schedule: str) -> dict:
    """The run's logger name and fixed checkpoint folder (the three ModelCheckpoint callbacks)."""
    name = f"coco_mask_rcnn_spatial_mamba_{size}_{schedule}"
    return {"trainer.logger.init_args.name": name,
            **{f"trainer.callbacks.{i}.init_args.dirpath": f"logs/{name}/checkpoints" for i in range(3)}}


def set_dotted(cfg: dict, key: str, value) -> None:
    """cfg[a][b][0][c] = value for key "a.b.0.c" (a number is a list position)."""
    *parents, last = key.split(".")
    for part in parents:
        cfg = cfg[int(part)] if isinstance(cfg, list) else cfg[part]
    cfg[last] = value


def before_split(size: str, schedule: str) -> dict:
    """The content of the single config file the run had before the split."""
    cfg = yaml.safe_load(T_1X_BEFORE.read_text())
    for key, value in {**run_folder(size, schedule), **DIFFERED[(size, schedule)]}.items():
        set_dotted(cfg, key, value)
    return cfg


def merged(base: dict, top: dict) -> dict:
    """`top` given as a --config after `base`: mappings merge key by key, anything else (lists included) is
    replaced."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def coco_run_config(path: Path) -> dict:
    """A run file on top of the recipe, as one dict (what `--config recipe.yaml --config <path>` reads)."""
    return merged(yaml.safe_load(RECIPE.read_text()), yaml.safe_load(path.read_text()))


def resolved(*configs: Path) -> dict:
    """`main.py fit --config ... --print_config`: the whole config LightningCLI would run, defaults filled in."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as info:
        main.cli(["fit", *[arg for c in configs for arg in ("--config", str(c))], "--print_config"])
    assert info.value.code == 0
    return yaml.safe_load(out.getvalue())


def flat(cfg, prefix: str = "") -> dict:
    """Dotted key -> value of every leaf (lists of mappings by position, other lists as values)."""
    if isinstance(cfg, dict):
        return {k: v for key, value in cfg.items() for k, v in flat(value, f"{prefix}{key}.").items()}
    if isinstance(cfg, list) and cfg and all(isinstance(item, dict) for item in cfg):
        return {k: v for i, item in enumerate(cfg) for k, v in flat(item, f"{prefix}{i}.").items()}
    return {prefix[:-1]: cfg}


def test_the_run_files_are_the_five_runs():
    assert sorted(COCO.glob("*.yaml")) == sorted([RECIPE] + [run_file(*run) for run in RUNS])


@pytest.mark.parametrize("size,schedule", RUNS, ids=lambda v: v)
def test_recipe_and_run_file_resolve_to_the_single_file_they_replaced(size, schedule, tmp_path):
    before = tmp_path / "before.yaml"
    before.write_text(yaml.safe_dump(before_split(size, schedule), sort_keys=False))
    assert resolved(RECIPE, run_file(size, schedule)) == resolved(before)
    assert coco_run_config(run_file(size, schedule)) == before_split(size, schedule)  # what the tests merge


def test_the_recipe_on_its_own_is_the_t_1x_run():
    assert resolved(RECIPE) == resolved(T_1X_BEFORE)


@pytest.mark.parametrize("size,schedule", RUNS, ids=lambda v: v)
def test_a_run_file_states_only_what_differs_between_runs(size, schedule):
    """Sizes, schedule and run folder; its callbacks are the recipe's with its own checkpoint folder (a list in a
    later --config replaces the whole list)."""
    differing = {key for run in RUNS for key in {**run_folder(*run), **DIFFERED[run]}}
    run = yaml.safe_load(run_file(size, schedule).read_text())
    assert {key for key in flat(run) if not key.startswith("trainer.callbacks.")} <= differing
    recipe = yaml.safe_load(RECIPE.read_text())
    for key, value in run_folder(size, schedule).items():
        set_dotted(recipe, key, value)
    assert run["trainer"]["callbacks"] == recipe["trainer"]["callbacks"]
