"""Semantic segmentation: features backbone, UperNet shapes, mIoU against a hand-computed confusion matrix (one
process and two gloo ranks), paired transforms, an ADE20K-layout folder end to end through main.py, bad data,
resume. Tiny widths and images: the whole file runs in about a minute on 2 CPU cores."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision import tv_tensors

import main
from tests.recipes import on_cpu, stopping_after
from src.data.ade20k import ADE20KDataModule, load_pair, scan_pairs
from src.models.segmenter import SemanticSegmenter, iou_from_confusion
from src.models.spatial_mamba import SpatialMamba
from src.models.upernet import UperNetHead

ROOT = Path(main.__file__).parent
T_CONFIG = ROOT / "configs" / "ade20k" / "upernet_spatial_mamba_t.yaml"
SUBPROCESS_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
TINY = dict(dims=[8, 16, 32, 64], depths=[1, 1, 1, 1], backend="torch")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_segmenter(num_classes: int = 5, **kwargs) -> SemanticSegmenter:
    backbone = SpatialMamba(features_only=True, drop_path_rate=0.0, **TINY)
    return SemanticSegmenter(backbone, num_classes=num_classes, decode_channels=16, aux_channels=8, **kwargs)


def make_ade20k_folder(root: Path, sizes=((60, 90), (96, 64), (64, 64), (70, 100)), val_sizes=((50, 80), (64, 96), (45, 45))):
    """root/images/{training,validation}/*.jpg and root/annotations/... /*.png: blocks of labels 0..150 and an
    image whose colour follows the label (so a model can learn something)."""
    rng = np.random.default_rng(0)
    for split, shapes in (("training", sizes), ("validation", val_sizes)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i, (h, w) in enumerate(shapes):
            labels = rng.choice([0, 1, 2, 3, 150], size=(h // 8 + 1, w // 8 + 1))
            mask = np.kron(labels, np.ones((8, 8), dtype=np.int64))[:h, :w]
            image = np.stack([mask * 1.6, 255 - mask, (mask * 7) % 256], -1).astype(np.uint8)
            mask = mask.astype(np.uint8)
            name = f"ADE_{split[:5]}_{i:08d}"
            Image.fromarray(image).save(root / "images" / split / f"{name}.jpg", quality=95)
            Image.fromarray(mask).save(root / "annotations" / split / f"{name}.png")
    return root


# --- backbone features ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(64, 96), (96, 32), (32, 32)])
def test_features_strides_on_non_square_inputs(size):
    model = SpatialMamba(features_only=True, out_indices=[0, 1, 2, 3], **TINY).eval()
    H, W = size
    with torch.no_grad():
        feats = model(torch.randn(1, 3, H, W))
    assert [tuple(f.shape) for f in feats] == [(1, c, H // s, W // s) for c, s in zip(TINY["dims"], (4, 8, 16, 32))]
    sub = SpatialMamba(features_only=True, out_indices=[1, 2], **TINY).eval()
    assert sorted(sub.feature_norms.keys()) == ["1", "2"]
    with torch.no_grad():
        assert [f.shape[1] for f in sub(torch.randn(1, 3, H, W))] == [16, 32]


def test_out_indices_rejected_with_one_line():
    with pytest.raises(ValueError, match="out_indices must be increasing stage indices"):
        SpatialMamba(features_only=True, out_indices=[2, 1], **TINY)
    with pytest.raises(ValueError, match="needs features_only=True"):
        SpatialMamba(out_indices=[0, 1], **TINY)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        SpatialMamba(features_only=True, **TINY)(torch.randn(1, 3, 64, 80))


def test_imagenet_checkpoint_loads_into_features_backbone(tmp_path, caplog):
    classifier = SpatialMamba(num_classes=7, **TINY)
    torch.save({"state_dict": {"backbone." + k: v for k, v in classifier.state_dict().items()}}, tmp_path / "c.ckpt")
    with caplog.at_level("INFO"):
        features = SpatialMamba(features_only=True, pretrained=str(tmp_path / "c.ckpt"), **TINY)
    assert "classifier head (head.*, norm.*) is dropped" in caplog.text
    own = features.state_dict()
    assert not any(k.startswith(("head.", "norm.")) for k in own)
    for k, v in classifier.state_dict().items():
        if not k.startswith(("head.", "norm.")):
            assert torch.equal(own[k], v), k
    # a checkpoint of another architecture still fails loudly
    with pytest.raises(KeyError, match="does not fit this model"):
        SpatialMamba(features_only=True, pretrained=str(tmp_path / "c.ckpt"), **{**TINY, "depths": [1, 1, 2, 1]})


# --- heads ----------------------------------------------------------------------------------------------------

def test_upernet_and_segmenter_shapes_on_non_square_inputs():
    head = UperNetHead([8, 16, 32, 64], num_classes=5, channels=16).eval()
    feats = [torch.randn(2, c, 48 // s, 80 // s) for c, s in zip([8, 16, 32, 64], (4, 8, 16, 32))]
    assert head(feats).shape == (2, 5, 12, 20)
    model = tiny_segmenter(test_scales=(0.75, 1.0, 1.25), test_flip=True).eval()
    assert model(torch.randn(2, 3, 64, 96)).shape == (2, 5, 16, 24)
    assert model.aux_head(model.backbone(torch.randn(2, 3, 64, 96))[2]).shape == (2, 5, 4, 6)
    # whole-image inference pads to a multiple of 32 and resizes to the label's size; scales and flips averaged
    probs = model.predict_probs(torch.randn(1, 3, 50, 70), (100, 140))
    assert probs.shape == (1, 5, 100, 140)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 100, 140))
    single = tiny_segmenter().eval()
    assert single.predict_probs(torch.randn(1, 3, 45, 45), (45, 45)).shape == (1, 5, 45, 45)


def test_segmenter_rejects_a_classifier_backbone():
    with pytest.raises(ValueError, match="features_only: true"):
        SemanticSegmenter(SpatialMamba(num_classes=5, **TINY), num_classes=5)


def test_no_weight_decay_on_norms_biases_a_and_d():
    model = tiny_segmenter()
    model.trainer = type("T", (), {"estimated_stepping_batches": 10})()
    optimizer = model.configure_optimizers()["optimizer"]
    decay, keep = ({id(p) for p in g["params"]} for g in optimizer.param_groups)
    named = dict(model.named_parameters())
    for name in ("backbone.stages.0.0.ssm.A_log", "backbone.stages.0.0.ssm.D", "backbone.feature_norms.0.weight",
                 "decode_head.fuse.norm.weight", "decode_head.classifier.bias"):
        assert id(named[name]) in keep, name
    for name in ("backbone.stages.0.0.ssm.in_proj.weight", "decode_head.fuse.conv.weight", "aux_head.classifier.weight"):
        assert id(named[name]) in decay, name
    assert optimizer.param_groups[1]["weight_decay"] == 0.0 and optimizer.param_groups[0]["weight_decay"] == 0.01


def test_warmup_then_poly_schedule():
    model = tiny_segmenter(lr=1.0, warmup_iters=10, warmup_ratio=1e-6)
    model.trainer = type("T", (), {"estimated_stepping_batches": 110})()
    schedule = model.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert schedule(0) == pytest.approx(1e-6) and schedule(5) == pytest.approx(0.5, abs=1e-5)
    assert schedule(10) == 1.0 and schedule(60) == pytest.approx(0.5) and schedule(110) == 0.0


# --- mIoU -----------------------------------------------------------------------------------------------------

# 4 classes; ground truth (rows) against prediction (columns), 255 = ignored. Built pixel by pixel below.
CONFUSION = np.array([
    [3, 1, 0, 0],   # class 0: 3 right, 1 called class 1
    [2, 4, 0, 0],   # class 1: 4 right, 2 called class 0
    [0, 1, 0, 0],   # class 2: never right, 1 called class 1
    [0, 0, 0, 0],   # class 3: absent from labels and predictions -> left out of the mean
])
# IoU = tp / (row + column - tp): class 0: 3 / (4 + 5 - 3) = 1/2; class 1: 4 / (6 + 6 - 4) = 1/2;
# class 2: 0 / (1 + 0 - 0) = 0; mIoU = (1/2 + 1/2 + 0) / 3 = 1/3; pixel accuracy 7 / 11
HAND_MIOU, HAND_AACC = 1 / 3, 7 / 11


def confusion_pixels():
    preds, targets = [], []
    for gt, row in enumerate(CONFUSION):
        for pred, count in enumerate(row):
            preds += [pred] * count
            targets += [gt] * count
    preds += [3, 0, 2]  # ignored pixels: whatever is predicted there counts nowhere
    targets += [255, 255, 255]
    return torch.tensor(preds).view(1, 1, -1), torch.tensor(targets).view(1, 1, -1)


def test_miou_equals_the_hand_computed_confusion_matrix():
    model = tiny_segmenter(num_classes=4)
    preds, targets = confusion_pixels()
    model.val_miou.update(preds[:, :, :7], targets[:, :, :7])  # two batches: one matrix over the whole set
    model.val_miou.update(preds[:, :, 7:], targets[:, :, 7:])
    model.val_confmat.update(preds, targets)
    assert float(model.val_miou.compute()) == pytest.approx(HAND_MIOU)
    confmat = model.val_confmat.compute()
    assert confmat.tolist() == CONFUSION.tolist()
    scores = iou_from_confusion(confmat)
    assert scores["iou"][:3].tolist() == pytest.approx([0.5, 0.5, 0.0]) and torch.isnan(scores["iou"][3])
    assert float(scores["mIoU"]) == pytest.approx(HAND_MIOU) and float(scores["aAcc"]) == pytest.approx(HAND_AACC)


def _miou_rank(rank: int, world: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = tiny_segmenter(num_classes=4)
    preds, targets = confusion_pixels()
    model.val_miou.update(preds[..., rank::world], targets[..., rank::world])  # each rank half of the pixels
    model.val_confmat.update(preds[..., rank::world], targets[..., rank::world])
    result = (float(model.val_miou.compute()), model.val_confmat.compute().tolist())
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_miou_two_gloo_ranks_equal_one_process(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_miou_rank, args=(2, port, str(tmp_path)), nprocs=2, start_method="fork")
    for rank in (0, 1):
        miou, confmat = torch.load(tmp_path / f"rank{rank}.pt")
        assert miou == pytest.approx(HAND_MIOU) and confmat == CONFUSION.tolist()


# --- paired transforms ----------------------------------------------------------------------------------------

def coded_pair(h=64, w=96):
    """An image whose red channel is 10 × the mask's label, with an asymmetric layout of labels."""
    mask = torch.zeros(h, w, dtype=torch.uint8)
    mask[:, : w // 3] = 1
    mask[: h // 2, w // 3: w // 2] = 2
    mask[h // 2:, -8:] = 3
    image = torch.stack([mask * 10, torch.full_like(mask, 100), torch.full_like(mask, 50)])
    return tv_tensors.Image(image), tv_tensors.Mask(mask[None])


def red_channel(data: ADE20KDataModule, image: torch.Tensor) -> torch.Tensor:
    return image[0] * data.std[0] + data.mean[0]


def test_paired_transforms_keep_image_and_mask_aligned():
    data = ADE20KDataModule(crop_size=(32, 64), scale=(96, 64), ratio_range=(1.0, 1.0), hflip=1.0, photometric=False)
    image, mask = coded_pair()
    torch.manual_seed(0)
    out_image, out_mask = data.train_transform()(image, mask)
    assert out_image.shape == (3, 32, 64) and out_mask.shape == (1, 32, 64)
    red, labels = red_channel(data, out_image), out_mask[0]
    # no rescale (ratio 1 at the image's own size): crop + flip must keep every pixel's label exactly
    torch.testing.assert_close(red, labels.float() * 10, atol=1e-3, rtol=0)
    # the flip happened (class 1 is on the left of the source, so on the right after flipping)
    assert labels[:, -1].eq(1).all() and not labels[:, 0].eq(1).any()
    # flipping the mask alone breaks the alignment that the test above checks
    assert not torch.allclose(red, labels.flip(-1).float() * 10, atol=1e-3)


def test_rescale_resizes_masks_with_nearest_and_pads_with_ignore():
    data = ADE20KDataModule(crop_size=(96, 160), scale=(96, 64), ratio_range=(1.5, 1.5), hflip=0.0, photometric=False)
    image, mask = coded_pair()
    out_image, out_mask = data.train_transform()(image, mask)  # rescaled ×1.5 to 96×144, padded to 96×160
    labels = out_mask[0]
    assert set(labels.unique().tolist()) <= {0, 1, 2, 3, 255}  # nearest: no in-between labels
    assert labels[:, 144:].eq(255).all() and labels[:, :144].ne(255).all()
    red = red_channel(data, out_image)[:, :144]
    agree = (red - labels[:, :144].float() * 10).abs() < 2
    assert agree.float().mean() > 0.95  # bilinear image vs nearest mask differ only along label edges


def test_crop_avoids_one_class_dominating():
    from src.data.ade20k import RandomCropCatMax

    mask = torch.zeros(64, 64, dtype=torch.uint8)
    mask[:, 48:] = 1  # class 0 covers 3/4 of the image; crops of 32×32 from the left are all class 0
    crop = RandomCropCatMax((32, 32), cat_max_ratio=0.75)
    torch.manual_seed(0)
    for _ in range(5):
        out = crop(tv_tensors.Mask(mask[None]))[0]
        share = out.flatten().bincount(minlength=2).max() / out.numel()
        assert share < 0.75, share


def test_photometric_distortion_leaves_masks_alone():
    from src.data.ade20k import PhotometricDistortion

    image, mask = coded_pair()
    torch.manual_seed(1)
    out_image, out_mask = PhotometricDistortion()(image, mask)
    assert torch.equal(out_mask, mask) and out_image.dtype == torch.uint8 and not torch.equal(out_image, image)


# --- ADE20K layout: labels, bad data, end to end ----------------------------------------------------------------

def test_reduce_zero_label(tmp_path):
    root = make_ade20k_folder(tmp_path / "ade")
    images, masks = scan_pairs(str(root), "training")
    raw = np.asarray(Image.open(masks[0]))
    _, mask = load_pair(images[0], masks[0], 150, reduce_zero_label=True)
    assert mask[torch.from_numpy(raw == 0)].eq(255).all()
    assert torch.equal(mask[torch.from_numpy(raw == 150)], torch.full_like(mask[torch.from_numpy(raw == 150)], 149))
    assert torch.equal(mask[torch.from_numpy(raw == 2)], torch.full_like(mask[torch.from_numpy(raw == 2)], 1))


def test_bad_data_gives_one_line_naming_the_file(tmp_path):
    root = make_ade20k_folder(tmp_path / "ade")
    ann = root / "annotations" / "training"
    with pytest.raises(FileNotFoundError, match="images/nothing"):
        scan_pairs(str(root), "nothing")
    images, masks = scan_pairs(str(root), "training")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks[1])  # wrong size
    with pytest.raises(ValueError, match=r"ADE_train_00000001.png' is 10×10 but its image .* is 64×96"):
        load_pair(images[1], masks[1], 150, True)
    Image.fromarray(np.full((96, 64), 151, np.uint8)).save(masks[1])  # label out of range
    with pytest.raises(ValueError, match=r"ADE_train_00000001.png' has labels \[151\] outside 0..150"):
        load_pair(images[1], masks[1], 150, True)
    Image.fromarray(np.zeros((96, 64, 3), np.uint8)).save(masks[1])  # colour mask
    with pytest.raises(ValueError, match="is a RGB image; expected a single-channel PNG"):
        load_pair(images[1], masks[1], 150, True)
    os.remove(ann / "ADE_train_00000002.png")  # image without annotation
    with pytest.raises(FileNotFoundError, match=r"ADE_train_00000002.jpg' has no annotation: expected .*ADE_train_00000002.png"):
        scan_pairs(str(root), "training")
    # through the command line: one line on stderr, exit code 2
    config = ade_config(tmp_path, root)
    out = subprocess.run([sys.executable, str(ROOT / "main.py"), "fit", "--config", str(config)], cwd=tmp_path,
                         env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: image ") and "has no annotation" in out.stderr


def ade_config(tmp_path: Path, root: Path, **trainer) -> Path:
    """configs/ade20k T recipe with a tiny backbone on the CPU (everything else as in the file)."""
    cfg = yaml.safe_load(T_CONFIG.read_text())
    on_cpu(cfg, tmp_path, **{"max_steps": 4, "val_check_interval": 2, **trainer})
    model = cfg["model"]["init_args"]
    model.update(decode_channels=16, aux_channels=8, warmup_iters=2)
    model["backbone"]["init_args"].update(**TINY)
    cfg["data"]["init_args"].update(root=str(root), crop_size=[32, 64], scale=[128, 64], num_workers=0,
                                    persistent_workers=False, pin_memory=False)
    path = tmp_path / "ade.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_ade20k_configs_parse_and_differ_only_in_size():
    configs = {s: yaml.safe_load((ROOT / "configs" / "ade20k" / f"upernet_spatial_mamba_{s}.yaml").read_text())
               for s in "tsb"}
    backbones = {s: c["model"]["init_args"]["backbone"]["init_args"] for s, c in configs.items()}
    assert [backbones[s]["drop_path_rate"] for s in "tsb"] == [0.2, 0.3, 0.5]
    assert backbones["b"]["dims"] == [96, 192, 384, 768] and backbones["s"]["depths"] == [2, 4, 21, 5]
    for s in "tsb":
        model, data, trainer = (configs[s][k] for k in ("model", "data", "trainer"))
        assert model["init_args"]["lr"] == 6e-5 and model["init_args"]["weight_decay"] == 0.01
        assert trainer["max_steps"] == 160000 and trainer["precision"] == "bf16-mixed"
        assert data["init_args"]["batch_size"] * trainer["devices"] == 16
        assert backbones[s]["backend"] == "auto" and backbones[s]["features_only"]


def test_ade20k_folder_end_to_end_fit_test_predict_and_resume(tmp_path, monkeypatch):
    root = make_ade20k_folder(tmp_path / "ade")
    monkeypatch.chdir(tmp_path)
    # fit 4 steps (2 epochs of 2 batches) with validation every 2 steps; no dropout or drop path (global RNG)
    common = ["--model.init_args.dropout", "0.0", "--model.init_args.backbone.init_args.drop_path_rate", "0.0"]
    (tmp_path / "a").mkdir()
    config = ade_config(tmp_path / "a", root)
    ref = main.cli(["fit", "--config", str(config), *common])
    assert ref.trainer.global_step == 4
    assert 0 <= float(ref.trainer.callback_metrics["val/mIoU"]) <= 1
    assert "val/aAcc" in ref.trainer.callback_metrics
    assert any(k.startswith("val_iou/class_") for k in ref.trainer.callback_metrics)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "a" / "logs").rglob("events.out.tfevents*")))).Reload()
    grids = events.Images("val/grid")  # input | ground truth | prediction of the 3 validation images (widest 96)
    assert [g.step for g in grids] == [2, 4] and grids[0].width == 3 * 96 and grids[0].height == 50 + 64 + 45
    assert [round(e.value, 6) for e in events.Scalars("val/mIoU")][-1] == round(float(ref.trainer.callback_metrics["val/mIoU"]), 6)

    # the same run stopped after step 2 and resumed from its last.ckpt ends with the same weights
    (tmp_path / "b").mkdir()
    config_b = ade_config(tmp_path / "b", root)
    stopped = stopping_after(config_b, 2)
    first = main.cli(["fit", "--config", str(stopped), *common])
    assert first.trainer.global_step == 2
    resumed = main.cli(["fit", "--config", str(config_b), *common, "--ckpt_path", str(tmp_path / "b" / "ckpt" / "last.ckpt")])
    assert resumed.trainer.global_step == 4
    a, b = ref.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)

    # multi-scale + flip test, then predict: colourised PNG masks under the inputs' names, at their sizes
    ckpt = str(tmp_path / "a" / "ckpt" / "last.ckpt")
    tested = main.cli(["test", "--config", str(config), "--ckpt_path", ckpt, "--model.init_args.test_scales",
                       "[0.75, 1.0, 1.25]", "--model.init_args.test_flip", "true"])
    assert 0 <= float(tested.trainer.callback_metrics["test/mIoU"]) <= 1
    # a checkpoint of another backbone architecture is refused with one line naming the knob
    with pytest.raises(ValueError, match=r"another architecture: model.init_args.backbone.init_args.depths"):
        main.cli(["validate", "--config", str(config), "--ckpt_path", ckpt,
                  "--model.init_args.backbone.init_args.depths", "[1, 1, 2, 1]"])
    out = tmp_path / "masks"
    main.cli(["predict", "--config", str(config), "--ckpt_path", ckpt, "--data.init_args.predict_root",
              str(root / "images" / "validation"), "--data.init_args.predict_output", str(out)])
    written = sorted(p.name for p in out.iterdir())
    assert written == ["ADE_valid_00000000.png", "ADE_valid_00000001.png", "ADE_valid_00000002.png"]
    png = Image.open(out / "ADE_valid_00000001.png")
    assert png.mode == "P" and png.size == (96, 64)


def test_digits_segmentation_split_by_scan():
    from src.data.digits_segmentation import DigitsSegmentationDataModule

    data = DigitsSegmentationDataModule(train_images=20, val_images=10, image_size=32, digit_size=(12, 20))
    data.setup("fit")
    images, labels = data.train_set.tensors
    assert images.shape == (20, 3, 32, 32) and labels.shape == (20, 32, 32)
    assert labels.max() <= 10 and labels.min() == 0 and (labels > 0).any()
    again = DigitsSegmentationDataModule(train_images=20, val_images=10, image_size=32, digit_size=(12, 20))
    again.setup("fit")
    assert torch.equal(again.train_set.tensors[1], labels)  # fixed seed: the same canvases
    assert not set(data.train_scans) & set(data.val_scans)  # no scan in both sets
    assert len(data.train_scans) + len(data.val_scans) == 1797
    with pytest.raises(ValueError, match="multiple of 32"):
        DigitsSegmentationDataModule(image_size=48)


@pytest.mark.parametrize("root,message", [
    (None, r"data.init_args.root is not set: give the ADE20K folder holding images/ and annotations/ "
           r"\(--data.init_args.root /data/ADEChallengeData2016\)"),
    ("missing", r"data.root not found: '.*missing' \(expected .*missing/images/training/\*.jpg and "
                r".*missing/annotations/training/\*.png\)"),
])
def test_unset_or_missing_ade20k_root_is_refused_naming_the_layout(tmp_path, root, message):
    from src.errors import UserError

    data = ADE20KDataModule(root=None if root is None else str(tmp_path / root))
    with pytest.raises(UserError, match=message):
        data.setup("fit")
