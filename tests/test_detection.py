"""Detection and instance segmentation: a generated COCO-format folder (polygons, compressed and uncompressed RLE,
crowd, an image without annotations, odd non-square sizes) end to end through main.py with resume, predict and
the TensorBoard grid; COCO AP on hand-checked cases in one process and over two gloo ranks with unequal shards;
the detector on odd sizes; bad data; the recipe configs (the T 1× one runs fast_dev_run at its real widths).
Tiny widths and images elsewhere: the whole file runs in about a minute and a half on 2 CPU cores."""

import json
import logging
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pycocotools import mask as mask_utils
from torchmetrics.detection import MeanAveragePrecision

import main
from tests.recipes import on_cpu, stopping_after
from tests.test_coco_configs import RECIPE as COCO_RECIPE, coco_run_config
from src.data.coco import COCODataModule, CocoAnnotations, CocoInstances, collate_detection, decode_masks
from src.models.detector import Detector, StepSchedule, coco_scores
from src.models.spatial_mamba import SpatialMamba

ROOT = Path(main.__file__).parent
COCO_CONFIGS = sorted((ROOT / "configs" / "coco").glob("mask_rcnn_spatial_mamba_*.yaml"))  # run files (on the recipe)
TINY = dict(dims=[8, 16, 32, 64], depths=[1, 1, 1, 1], backend="torch", drop_path_rate=0.0)
TINY_HEADS = dict(fpn_channels=16, box_head_channels=32, mask_head_channels=8, mask_head_convs=2,
                  rpn_pre_nms_train=200, rpn_post_nms_train=50, rpn_pre_nms_test=100, rpn_post_nms_test=50,
                  roi_batch_size=32, detections_per_img=20, anchor_sizes=[8, 16, 32, 64, 128])

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_detector(num_classes: int = 2, **kwargs) -> Detector:
    return Detector(SpatialMamba(features_only=True, **TINY), num_classes=num_classes, **{**TINY_HEADS, **kwargs})


# --- a generated COCO-format folder -----------------------------------------------------------------------------

def _rect_polygon(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _ellipse_mask(h, w, cy, cx, ry, rx):
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def make_coco_folder(root: Path) -> Path:
    """root/annotations/instances_{train,val}2017.json + images of odd, non-square sizes. Categories 3 ("box",
    drawn red) and 7 ("blob", drawn green), so labels 1 and 2. Per split: rectangles as polygons, ellipses as
    compressed RLE; train adds an uncompressed-RLE crowd region, an image without annotations and a degenerate
    box; val adds a crowd region and an image without annotations."""
    rng = np.random.default_rng(0)
    shapes = {"train2017": [(57, 83), (75, 45), (64, 64), (49, 97)], "val2017": [(61, 77), (45, 91), (70, 50)]}
    next_id = 1
    for split, sizes in shapes.items():
        (root / split).mkdir(parents=True)
        images, annotations = [], []
        for i, (h, w) in enumerate(sizes):
            canvas = np.full((h, w, 3), 30, np.uint8)
            image_id = 100 + i
            images.append({"id": image_id, "file_name": f"{split}_{i}.png", "height": h, "width": w})
            if i == len(sizes) - 1:  # no annotations
                Image.fromarray(canvas).save(root / split / f"{split}_{i}.png")
                continue
            bw, bh = int(rng.integers(12, 20)), int(rng.integers(12, 20))
            bx, by = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            canvas[by:by + bh, bx:bx + bw] = (220, 40, 40)
            annotations.append({"id": next_id, "image_id": image_id, "category_id": 3, "iscrowd": 0, "area": bw * bh,
                                "bbox": [bx, by, bw, bh], "segmentation": _rect_polygon(bx, by, bw, bh)})
            ellipse = _ellipse_mask(h, w, h * 0.6, w * 0.65, 8, 10)
            canvas[ellipse] = (40, 220, 40)
            ys, xs = np.nonzero(ellipse)
            rle = mask_utils.encode(np.asfortranarray(ellipse.astype(np.uint8)))
            annotations.append({"id": next_id + 1, "image_id": image_id, "category_id": 7, "iscrowd": 0,
                                "area": int(ellipse.sum()), "segmentation": {"size": [h, w], "counts": rle["counts"].decode()},
                                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]})
            next_id += 2
            if i == 0:  # a crowd region as uncompressed RLE (column-major run lengths), top-left 6×6
                crowd = np.zeros((h, w), np.uint8)
                crowd[:6, :6] = 1
                counts, flat, run, value = [], crowd.flatten(order="F"), 0, 0
                for pixel in flat:
                    if pixel != value:
                        counts.append(run)
                        run, value = 0, pixel
                    run += 1
                counts.append(run)
                annotations.append({"id": next_id, "image_id": image_id, "category_id": 3, "iscrowd": 1, "area": 36,
                                    "bbox": [0, 0, 6, 6], "segmentation": {"size": [h, w], "counts": counts}})
                next_id += 1
            if i == 1 and split == "train2017":  # degenerate: skipped in training with a log line
                annotations.append({"id": next_id, "image_id": image_id, "category_id": 3, "iscrowd": 0, "area": 0,
                                    "bbox": [5, 5, 0.5, 4], "segmentation": [[5, 5, 5.5, 5, 5.5, 9]]})
                next_id += 1
            Image.fromarray(canvas).save(root / split / f"{split}_{i}.png")
        (root / "annotations").mkdir(exist_ok=True)
        categories = [{"id": 3, "name": "box"}, {"id": 7, "name": "blob"}]
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root


def test_coco_annotations_polygon_rle_crowd_and_empty_images(tmp_path, caplog):
    root = make_coco_folder(tmp_path / "coco")
    with caplog.at_level(logging.WARNING):
        train = CocoAnnotations(str(root / "annotations" / "instances_train2017.json"), str(root / "train2017"), train=True)
    assert "skipped 1 training annotations" in caplog.text  # the degenerate box
    assert train.category_ids == [3, 7] and train.category_names == ["box", "blob"]
    assert train.image_ids.tolist() == [100, 101, 102]  # the image without annotations is not trained on
    assert [len(train.annotations(i)) for i in range(3)] == [2, 2, 2]  # crowd and degenerate left out
    val = CocoAnnotations(str(root / "annotations" / "instances_val2017.json"), str(root / "val2017"), train=False)
    assert val.image_ids.tolist() == [100, 101, 102] and [len(val.annotations(i)) for i in range(3)] == [3, 2, 0]

    # evaluation targets at the original size: the polygon is its rectangle, the RLEs decode, crowd flagged
    target = CocoInstances(val, transform=None, train=False).target(0)
    box = target["boxes"][0].tolist()
    x1, y1, x2, y2 = (int(v) for v in box)
    assert target["masks"].shape == (3, 61, 77) and target["masks"][0].sum() == (x2 - x1) * (y2 - y1)
    assert target["masks"][0, y1:y2, x1:x2].all() and target["iscrowd"].tolist() == [0, 0, 1]
    assert target["masks"][2].sum() == 36 and target["masks"][2, :6, :6].all()
    assert target["labels"].tolist() == [1, 2, 1] and target["area"][1] == target["masks"][1].sum()

    # training items: resized to fit (96, 64) keeping the aspect ratio, boxes scaled with the image, masks aligned
    data = COCODataModule(root=str(root), scale=(96, 64), hflip=1.0, num_workers=0)
    data.setup("fit")
    image, out, meta = data.train_set[(0, 0)]
    assert meta == {"image_id": 100, "original_size": (57, 83), "index": 0}
    factor = min(96 / 83, 64 / 57)
    assert image.shape == (3, round(57 * factor), round(83 * factor)) and out["masks"].shape[-2:] == image.shape[-2:]
    original = data.train_set.target(0)
    flipped = original["boxes"][0] * factor
    flipped = torch.stack([image.shape[-1] - flipped[2], flipped[1], image.shape[-1] - flipped[0], flipped[3]])
    torch.testing.assert_close(out["boxes"][0], flipped, atol=1.0, rtol=0)
    for mask, box in zip(out["masks"], out["boxes"]):  # every mask pixel inside its (flipped) box
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert xs.min() >= box[0] - 1 and xs.max() <= box[2] and ys.min() >= box[1] - 1 and ys.max() <= box[3]
    # the red rectangle is where its mask is, after resize and flip
    red = image[0] * data.std[0] + data.mean[0]
    assert red[out["masks"][0].bool()].mean() > 150 and red[~out["masks"].any(0)].mean() < 80

    batch = collate_detection([data.train_set[(i, 0)] for i in range(3)])
    assert batch["images"].shape[-2] % 32 == 0 and batch["images"].shape[-1] % 32 == 0
    assert batch["image_sizes"].tolist() == [list(data.train_set[(i, 0)][0].shape[-2:]) for i in range(3)]


def test_multiscale_and_crop_branch_pipeline(tmp_path):
    root = make_coco_folder(tmp_path / "coco")
    data = COCODataModule(root=str(root), scale=(200, 128), train_short_sides=[64, 96, 128], crop_branch=True,
                          crop_pre_short_sides=[80, 100], crop_size=(32, 48), num_workers=0)
    data.setup("fit")
    shorts = set()
    for epoch in range(12):
        image, out, _ = data.train_set[(0, epoch)]
        shorts.add(min(image.shape[-2:]))
        assert out["masks"].shape[0] == out["boxes"].shape[0] == out["labels"].shape[0]
        assert (out["boxes"][:, 2:] > out["boxes"][:, :2]).all()  # emptied boxes dropped after a crop
    assert shorts <= {64, 96, 128} and len(shorts) >= 2
    again = data.train_set[(0, 5)]
    assert torch.equal(again[0], data.train_set[(0, 5)][0])  # seeded by (seed, epoch, index)


def test_decode_masks_formats():
    h, w = 9, 7
    mask = np.zeros((h, w), np.uint8)
    mask[2:6, 1:4] = 1
    compressed = mask_utils.encode(np.asfortranarray(mask))
    masks = decode_masks([_rect_polygon(1, 2, 3, 4), {"size": [h, w], "counts": compressed["counts"].decode()},
                          {"size": [h, w], "counts": [15, 4, 5, 4, 5, 4, 26]}, [[1, 2, 3, 4]]], h, w)
    assert masks.shape == (4, h, w)
    assert masks[0].sum() >= 12 and torch.equal(masks[1], torch.from_numpy(mask))
    assert masks[2].sum() == 12 and masks[3].sum() == 0  # a 2-point "polygon" is no polygon


# --- bad data -------------------------------------------------------------------------------------------------

def _edit(root: Path, split: str, edit) -> None:
    path = root / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("case, error, match", [
    ("missing_file", FileNotFoundError, r"COCO annotation file not found: .*instances_train2017.json"),
    ("not_json", ValueError, r"instances_train2017.json' is not valid JSON"),
    ("no_images_key", ValueError, r"needs the lists 'images', 'annotations' and 'categories'"),
    ("unknown_image", ValueError, r"annotation 1 points at image_id 999, which is not among the file's images"),
    ("unknown_category", ValueError, r"annotation 1 has category_id 5, which is not among the categories \[3, 7\]"),
    ("missing_image_file", FileNotFoundError, r"1 image\(s\) of .* are missing from .*train2017', e.g. 'train2017_2.png'"),
    ("bad_bbox", ValueError, r"annotation 1 has bbox \[1, 2, 3\]; expected \[x, y, width, height\]"),
    ("negative_bbox", ValueError, r"annotation 1 has bbox \[1, 2, -3, 4\] with a negative width or height"),
    ("no_segmentation", ValueError, r"annotation 1 has no segmentation; Mask R-CNN needs polygons or an RLE mask"),
    ("rle_size", ValueError, r"annotation 2 has an RLE mask of size 10×5 \(width×height\) but its image is 83×57"),
])
def test_bad_coco_data_is_one_line(tmp_path, case, error, match):
    root = make_coco_folder(tmp_path / "coco")
    ann = root / "annotations" / "instances_train2017.json"
    if case == "missing_file":
        ann.unlink()
    elif case == "not_json":
        ann.write_text("{not json")
    elif case == "no_images_key":
        _edit(root, "train2017", lambda d: d.pop("images"))
    elif case == "unknown_image":
        _edit(root, "train2017", lambda d: d["annotations"][0].update(image_id=999))
    elif case == "unknown_category":
        _edit(root, "train2017", lambda d: d["annotations"][0].update(category_id=5))
    elif case == "missing_image_file":
        (root / "train2017" / "train2017_2.png").unlink()
    elif case == "bad_bbox":
        _edit(root, "train2017", lambda d: d["annotations"][0].update(bbox=[1, 2, 3]))
    elif case == "negative_bbox":
        _edit(root, "train2017", lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 4]))
    elif case == "no_segmentation":
        _edit(root, "train2017", lambda d: d["annotations"][0].pop("segmentation"))
    elif case == "rle_size":
        _edit(root, "train2017", lambda d: d["annotations"][1]["segmentation"].update(size=[5, 10]))
    with pytest.raises(error, match=match) as info:
        COCODataModule(root=str(root), num_workers=0).setup("fit")
    assert "\n" not in str(info.value)


def test_image_of_another_size_than_annotated_and_cli_error_line(tmp_path, capsys, monkeypatch):
    root = make_coco_folder(tmp_path / "coco")
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(root / "train2017" / "train2017_1.png")
    data = COCODataModule(root=str(root), num_workers=0)
    data.setup("fit")
    with pytest.raises(ValueError, match=r"train2017_1.png' is 12×10 but its annotation file says 45×75"):
        data.train_set[1]
    # through the command line: one line on stderr, exit code 2
    config = coco_config(tmp_path, root)
    monkeypatch.setattr("sys.argv", ["main.py", "validate", "--config", str(config), "--data.init_args.root",
                                     str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit) as info:
        main.main()
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: data.root not found: ") and "nowhere" in err[-1]


# --- COCO AP: hand-checked cases ------------------------------------------------------------------------------

def _box_mask(box, size=(40, 40)):
    mask = torch.zeros(size, dtype=torch.bool)
    x1, y1, x2, y2 = box
    mask[y1:y2, x1:x2] = True
    return mask


def ap_case(shift: int):
    """Two objects of one class in one image; detections: the first exactly (score 0.9), the second shifted
    right by `shift` pixels (score 0.8). Boxes and masks are the same rectangles, so box and mask AP agree."""
    truth = [(2, 2, 12, 12), (20, 20, 30, 30)]
    found = [truth[0], (20 + shift, 20, 30 + shift, 30)]
    target = {"boxes": torch.tensor(truth, dtype=torch.float32), "labels": torch.tensor([1, 1]),
              "masks": torch.stack([_box_mask(b) for b in truth]), "iscrowd": torch.tensor([0, 0]),
              "area": torch.tensor([100.0, 100.0])}
    pred = {"boxes": torch.tensor(found, dtype=torch.float32), "labels": torch.tensor([1, 1]),
            "scores": torch.tensor([0.9, 0.8]), "masks": torch.stack([_box_mask(b) for b in found])}
    return pred, target


# Shifted by 2 px: IoU = (8 × 10) / (10 × 10 + 10 × 10 − 80) = 2/3, so the second detection matches at the IoU
# thresholds 0.50, 0.55, 0.60, 0.65 (AP 1 there) and not at 0.70 ... 0.95 (6 thresholds). There only the first
# detection is right: precision 1 up to recall 1/2, nothing beyond, i.e. 51 of COCO's 101 recall points:
# AP = 51/101. mAP = (4 + 6 × 51/101) / 10; AP50 = 1; AP75 = 51/101.
SHIFTED_MAP = (4 + 6 * 51 / 101) / 10


def _map_metric():
    return MeanAveragePrecision(iou_type=("bbox", "segm"), backend="pycocotools", sync_on_compute=False)


def test_ap_perfect_predictions_and_one_shifted_box():
    metric = _map_metric()
    metric.update(*([x] for x in ap_case(shift=0)))
    scores = coco_scores(metric, [0])
    for kind in ("bbox", "segm"):
        assert scores[f"{kind}_mAP"] == pytest.approx(1.0) and scores[f"{kind}_mAP_s"] == pytest.approx(1.0)
        assert scores[f"{kind}_mAP_m"] == -1 and scores[f"{kind}_mAP_l"] == -1  # 10×10 objects are all small
    metric.update(*([x] for x in ap_case(shift=2)))
    scores = coco_scores(metric, [0])
    for kind in ("bbox", "segm"):
        assert scores[f"{kind}_mAP"] == pytest.approx(SHIFTED_MAP, abs=1e-6)
        assert scores[f"{kind}_mAP_50"] == pytest.approx(1.0) and scores[f"{kind}_mAP_75"] == pytest.approx(51 / 101)


def _several_images():
    """Five images with the hand-checked cases, an empty image and a crowd region in a varying order."""
    items = [ap_case(0), ap_case(2), ap_case(2), ap_case(0)]
    empty_pred = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0),
                  "masks": torch.zeros(0, 40, 40, dtype=torch.bool)}
    crowd_pred, crowd_target = ap_case(2)
    crowd_target = {**crowd_target, "iscrowd": torch.tensor([0, 1])}  # the shifted detection lies in a crowd region
    return items + [(empty_pred, ap_case(0)[1]), (crowd_pred, crowd_target)]


def _map_rank(rank: int, world: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    metric, items = _map_metric(), _several_images()
    indices = list(range(rank, len(items), world))  # as ShardedEvalSampler: rank 0 gets 3 images, rank 1 gets 3 of 6
    if rank == 1:
        indices = indices[:2]  # unequal shards: 5 images in all
    for i in indices:
        metric.update([items[i][0]], [items[i][1]])
    torch.save(coco_scores(metric, indices), os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_map_two_gloo_ranks_with_unequal_shards_equal_one_process(tmp_path):
    items = _several_images()
    metric = _map_metric()
    for i in (0, 1, 2, 3, 4):  # the images the two ranks score together
        metric.update([items[i][0]], [items[i][1]])
    single = coco_scores(metric, list(range(5)))
    assert 0 < single["bbox_mAP"] < 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_map_rank, args=(2, port, str(tmp_path)), nprocs=2, start_method="fork")
    for rank in (0, 1):
        assert torch.load(tmp_path / f"rank{rank}.pt") == single


# --- the detector ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes", [[(45, 77), (61, 33)], [(37, 91)]])
def test_detector_on_odd_non_square_images(sizes):
    model = tiny_detector(num_classes=3)
    items = []
    for h, w in sizes:
        target = {"boxes": torch.tensor([[3.0, 4.0, 20.0, 30.0]]), "labels": torch.tensor([2]),
                  "masks": _box_mask((3, 4, 20, 30), (h, w))[None].to(torch.uint8)}
        items.append((torch.randn(3, h, w), target, {"image_id": len(items), "original_size": (2 * h + 1, w), "index": 0}))
    batch = collate_detection(items)
    _, losses = model.train()(batch["images"], batch["image_sizes"], batch["targets"])
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    predictions = model.eval().predict_instances(batch)
    for pred, (h, w) in zip(predictions, sizes):  # mapped back to the original size (twice as high + 1)
        assert pred["masks"].shape[1:] == (2 * h + 1, w) and pred["masks"].dtype == torch.bool
        assert len(pred["boxes"]) <= 20 and (pred["boxes"][:, 2] <= w).all() and (pred["boxes"][:, 3] <= 2 * h + 1).all()


def test_bf16_autocast_keeps_box_decoding_in_float32():
    model = tiny_detector().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = model.model.backbone(torch.randn(1, 3, 64, 64))
        logits, deltas = model.model.rpn.head(list(features.values()))
    assert features["0"].dtype == torch.bfloat16 and deltas[0].dtype == logits[0].dtype == torch.float32


def test_weight_decay_groups_and_step_schedule():
    model = tiny_detector()
    decay, keep = (set(map(id, group)) for group in model.parameter_groups())
    named = dict(model.named_parameters())
    body = "model.backbone.body."
    for name in (body + "feature_norms.0.weight", body + "stages.0.0.norm1.bias", body + "stem.conv1.norm.weight"):
        assert name in named and id(named[name]) in keep, name
    for name in (body + "stages.0.0.ssm.A_log", "model.backbone.fpn.inner_blocks.0.0.bias",
                 "model.roi_heads.box_head.fc6.weight", body + "stages.0.0.ssm.in_proj.weight"):
        assert id(named[name]) in decay, name  # the recipe decays everything but normalisation layers
    strict = tiny_detector(no_decay="norms_biases_ssm")
    decay, keep = (set(map(id, group)) for group in strict.parameter_groups())
    named = dict(strict.named_parameters())
    assert id(named[body + "stages.0.0.ssm.A_log"]) in keep and id(named["model.backbone.fpn.inner_blocks.0.0.bias"]) in keep
    schedule = StepSchedule(warmup_iters=10, warmup_ratio=1e-3, milestones=[80, 110], gamma=0.1)
    assert schedule(0) == pytest.approx(1e-3) and schedule(5) == pytest.approx(1e-3 + 0.999 * 0.5)
    assert schedule(10) == 1.0 and schedule(79) == 1.0 and schedule(80) == pytest.approx(0.1)
    assert schedule(110) == pytest.approx(0.01)


def test_detector_rejects_bad_backbones_and_knobs():
    with pytest.raises(ValueError, match="features_only: true"):
        Detector(SpatialMamba(num_classes=5, **TINY))
    with pytest.raises(ValueError, match=r"out_indices must be \[0, 1, 2, 3\], got \[1, 2, 3\]"):
        Detector(SpatialMamba(features_only=True, out_indices=[1, 2, 3], **TINY))
    with pytest.raises(ValueError, match=r"model.init_args.anchor_sizes must be 5 positive sizes"):
        tiny_detector(anchor_sizes=[32, 64])
    with pytest.raises(ValueError, match=r"model.init_args.score_thresh must be a probability"):
        tiny_detector(score_thresh=1.5)


# --- the recipe configs ---------------------------------------------------------------------------------------

def test_coco_configs_are_the_paper_recipe():
    names = sorted(p.stem for p in COCO_CONFIGS)
    assert names == [f"mask_rcnn_spatial_mamba_{s}" for s in ("b_1x", "s_1x", "s_3x", "t_1x", "t_3x")]
    for path in COCO_CONFIGS:
        cfg = coco_run_config(path)
        model, data, trainer = cfg["model"]["init_args"], cfg["data"]["init_args"], cfg["trainer"]
        backbone = model["backbone"]["init_args"]
        size, schedule = path.stem.split("_")[-2:]
        assert backbone["drop_path_rate"] == {"t": 0.2, "s": 0.3, "b": 0.5}[size]
        assert backbone["depths"] == {"t": [2, 4, 8, 4], "s": [2, 4, 21, 5], "b": [2, 4, 21, 5]}[size]
        assert model["lr"] == 1e-4 and model["weight_decay"] == 0.05 and model["no_decay"] == "norms"
        assert model["warmup_iters"] == 1000 and model["warmup_ratio"] == 1e-3 and model["gamma"] == 0.1
        assert (trainer["max_epochs"], model["milestones"]) == ((12, [8, 11]) if schedule == "1x" else (36, [27, 33]))
        assert data["batch_size"] * trainer["devices"] == 16 and trainer["precision"] == "bf16-mixed"
        assert model["rpn_post_nms_train"] == 1000 and model["roi_sampling_ratio"] == 0 and model["fpn_channels"] == 256
        assert data["crop_branch"] == (schedule == "3x") and data["scale"] == [1333, 800]
        if schedule == "3x":
            assert data["train_short_sides"] == list(range(480, 801, 32))


@pytest.mark.parametrize("path", COCO_CONFIGS, ids=lambda p: p.stem)
def test_coco_config_parses_with_every_knob(path, capsys):
    with pytest.raises(SystemExit) as info:
        main.cli(["fit", "--config", str(COCO_RECIPE), "--config", str(path), "--print_config"])
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "src.models.Detector" and "mask_head_convs" in printed["model"]["init_args"]
    assert printed["data"]["init_args"]["scale"] == [1333, 800]


def coco_config(tmp_path: Path, root: Path, config: Path = None, tiny: bool = True, **trainer) -> Path:
    """A configs/coco run (the recipe + a run file, T 1× by default) as one file, on the CPU with small images (tiny
    widths unless `tiny` is False)."""
    cfg = coco_run_config(config or ROOT / "configs" / "coco" / "mask_rcnn_spatial_mamba_t_1x.yaml")
    on_cpu(cfg, tmp_path, **{"max_epochs": 2, **trainer})
    model = cfg["model"]["init_args"]
    model.update(num_classes=2, warmup_iters=2, milestones=[1])
    if tiny:
        model.update(TINY_HEADS)
        model["backbone"]["init_args"].update(TINY)
    cfg["data"]["init_args"].update(root=str(root), scale=[96, 64], num_workers=0, persistent_workers=False,
                                    pin_memory=False, crop_pre_short_sides=[48, 64], crop_size=[32, 48])
    if cfg["data"]["init_args"].get("train_short_sides"):
        cfg["data"]["init_args"]["train_short_sides"] = [32, 48, 64]
    path = tmp_path / "coco.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_t_1x_recipe_fast_dev_run_at_real_widths_and_3x_pipeline(tmp_path, monkeypatch):
    """The T 1× config as it is (widths, heads, proposals; CPU, float32, small images), and the T 3× config
    (multi-scale + crop branch) with tiny widths: one training and one validation batch each."""
    root = make_coco_folder(tmp_path / "coco")
    monkeypatch.chdir(tmp_path)
    for name, tiny in (("mask_rcnn_spatial_mamba_t_1x", False), ("mask_rcnn_spatial_mamba_t_3x", True)):
        (tmp_path / name).mkdir()
        config = coco_config(tmp_path / name, root, ROOT / "configs" / "coco" / f"{name}.yaml", tiny=tiny)
        cli = main.cli(["fit", "--config", str(config), "--trainer.fast_dev_run", "true"])
        assert cli.trainer.global_step == 1 and "val/bbox_mAP" in cli.trainer.callback_metrics
        assert cli.model.backbone.dims == ([8, 16, 32, 64] if tiny else [64, 128, 256, 512])


# --- end to end through main.py -------------------------------------------------------------------------------

def test_coco_folder_end_to_end_fit_resume_test_predict(tmp_path, monkeypatch):
    root = make_coco_folder(tmp_path / "coco")
    monkeypatch.chdir(tmp_path)
    # 2 epochs of 1 batch of 2 (3 training images), validation each epoch, lr step after epoch 1
    (tmp_path / "a").mkdir()
    config = coco_config(tmp_path / "a", root)
    ref = main.cli(["fit", "--config", str(config)])
    assert ref.trainer.global_step == 2
    metrics = ref.trainer.callback_metrics
    for kind in ("bbox", "segm"):
        for key in ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l"):
            assert f"val/{kind}_{key}" in metrics
    assert ref.model.class_names == ["box", "blob"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "a" / "logs").rglob("events.out.tfevents*")))).Reload()
    grids = events.Images("val/grid")  # image | ground truth | prediction of the 3 validation images, original sizes
    assert [g.step for g in grids] == [1, 2] and grids[0].width == 3 * 91 and grids[0].height == 61 + 45 + 70
    assert {"val/bbox_mAP", "val/segm_mAP", "train/loss_mask", "lr"} <= set(events.Tags()["scalars"])

    # the same run stopped after step 1 and resumed from its last.ckpt ends with the same weights
    (tmp_path / "b").mkdir()
    config_b = coco_config(tmp_path / "b", root)
    stopped = stopping_after(config_b, 1)
    first = main.cli(["fit", "--config", str(stopped)])
    assert first.trainer.global_step == 1
    resumed = main.cli(["fit", "--config", str(config_b), "--ckpt_path", str(tmp_path / "b" / "ckpt" / "last.ckpt")])
    assert resumed.trainer.global_step == 2
    a, b = ref.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert resumed.trainer.callback_metrics["val/bbox_mAP"] == metrics["val/bbox_mAP"]

    ckpt = str(tmp_path / "a" / "ckpt" / "last.ckpt")
    tested = main.cli(["test", "--config", str(config), "--ckpt_path", ckpt])
    assert tested.trainer.callback_metrics["test/segm_mAP"] == metrics["val/segm_mAP"]
    with pytest.raises(ValueError, match=r"another architecture: model.init_args.backbone.init_args.depths"):
        main.cli(["validate", "--config", str(config), "--ckpt_path", ckpt,
                  "--model.init_args.backbone.init_args.depths", "[1, 1, 2, 1]"])

    # predict: the validation split to COCO results JSON (original category ids), a folder of images drawn
    out = tmp_path / "results.json"
    main.cli(["predict", "--config", str(config), "--ckpt_path", ckpt, "--data.init_args.predict_output", str(out)])
    results = json.loads(out.read_text())
    assert results and {r["image_id"] for r in results} <= {100, 101, 102}
    assert {r["category_id"] for r in results} <= {3, 7} and all(len(r["bbox"]) == 4 for r in results)
    decoded = mask_utils.decode({**results[0]["segmentation"], "counts": results[0]["segmentation"]["counts"].encode()})
    assert decoded.shape == {100: (61, 77), 101: (45, 91), 102: (70, 50)}[results[0]["image_id"]]
    with pytest.raises(FileExistsError, match="predict_output .* exists"):
        main.cli(["predict", "--config", str(config), "--ckpt_path", ckpt, "--data.init_args.predict_output", str(out)])
    drawn = tmp_path / "drawn"
    main.cli(["predict", "--config", str(config), "--ckpt_path", ckpt, "--data.init_args.root", str(tmp_path / "none"),
              "--data.init_args.predict_root", str(root / "val2017"), "--data.init_args.predict_output",
              str(tmp_path / "folder.json"), "--data.init_args.predict_draw_dir", str(drawn),
              "--data.init_args.predict_score_threshold", "0.0"])
    assert sorted(p.name for p in drawn.iterdir()) == ["val2017_0.png", "val2017_1.png", "val2017_2.png"]
    assert Image.open(drawn / "val2017_1.png").size == (91, 45)
    folder = json.loads((tmp_path / "folder.json").read_text())
    assert {r["file_name"] for r in folder} <= {"val2017_0.png", "val2017_1.png", "val2017_2.png"}
    assert {r["category_id"] for r in folder} <= {3, 7}  # category ids from the checkpoint, no annotation file


def test_digits_detection_set_is_coco_and_split_by_scan(tmp_path):
    from src.data.digits_detection import DigitsDetectionDataModule

    kwargs = dict(root=str(tmp_path), image_size=32, train_images=12, val_images=6, digit_size=(10, 16))
    data = DigitsDetectionDataModule(**kwargs)
    data.setup("fit")
    folder = Path(data.data_root)
    settings = json.loads((folder / "settings.json").read_text())
    assert not set(settings["train_scans"]) & set(settings["val_scans"])  # no scan in both splits
    assert len(settings["train_scans"]) + len(settings["val_scans"]) == 1797
    coco = json.loads((folder / "annotations" / "instances_train.json").read_text())
    assert [c["id"] for c in coco["categories"]] == list(range(1, 11)) and len(coco["images"]) == 12
    image, target, _ = data.val_set[0]
    assert image.shape == (3, 32, 32) and data.num_classes == 10
    for mask, box, area in zip(target["masks"], target["boxes"], target["area"]):
        ys, xs = torch.nonzero(mask, as_tuple=True)  # box = tight box of the visible mask, area = its pixels
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] and area == mask.sum()
    assert not (target["masks"].sum(0) > 1).any()  # occlusion: every pixel belongs to at most one digit
    again = DigitsDetectionDataModule(**kwargs)
    assert again.data_root == data.data_root  # same settings: the folder is reused
    assert DigitsDetectionDataModule(**{**kwargs, "max_digits": 2}).data_root != data.data_root
    with pytest.raises(ValueError, match=r"data.digit_size must be"):
        DigitsDetectionDataModule(root=str(tmp_path), image_size=32, digit_size=(10, 40))


def test_detection_digits_config_prints_its_knobs(capsys):
    with pytest.raises(SystemExit):
        main.cli(["fit", "--config", str(ROOT / "configs" / "detection_digits.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    model, data = printed["model"]["init_args"], printed["data"]["init_args"]
    for knob in ("fpn_channels", "anchor_sizes", "rpn_post_nms_train", "roi_batch_size", "roi_sampling_ratio",
                 "box_head_channels", "mask_head_convs", "no_decay", "milestones", "grid_images"):
        assert knob in model, knob
    for knob in ("image_size", "max_digits", "max_occlusion", "digit_size", "generator_seed", "predict_output"):
        assert knob in data, knob
