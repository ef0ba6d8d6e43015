"""data=image_folder: reading any image as the weights' transforms do, the folder layouts and splits,
the decode-once store, device-side augmentation, every bad input, and parity with Fashion-MNIST."""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin
from torchvision.transforms import v2

from fmnist_tl.config import check_config
from fmnist_tl.core import FmnistError
from fmnist_tl.data import (
    BadImage,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    ImagePreprocess,
    image_store,
    load_rgb,
)
from fmnist_tl.data.image_folder import SKIPPED_LIST, per_class_counts, random_resized_crop_flip, scan
from fmnist_tl.features.extraction import split_entry
from tests.commands.test_predict import bad_files
from tests.helpers import DEBIAN_MIRROR, compose_cfg, make_cfg, needs_real_data, run_cli


def noise(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def make_folder(root: Path, classes=("cat", "dog", "eel"), per_class: int = 10, ext: str = "png") -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(noise(40 + i, 50, seed=100 * c + i)).save(root / name / f"{i:03d}.{ext}")
    return root


def datamodule(root: Path, tmp: Path, **kw) -> ImageFolderDataModule:
    kw = {
        "stored_size": 16,
        "cache_dir": str(tmp / "store"),
        "progress": False,
        "val_size": 0.25,
        "test_size": 0.25,
        **kw,
    }
    return ImageFolderDataModule(str(root), **kw)


# --- one image, as the weights' transforms cut it ----------------------------------------------


def test_load_rgb_is_the_weights_transforms_resize_and_centre_crop(tmp_path):
    Image.fromarray(noise(60, 90)).save(tmp_path / "a.png")
    weights_cut = v2.Compose([v2.Resize(24), v2.CenterCrop(24), v2.PILToTensor()])  # as ImageClassification
    with Image.open(tmp_path / "a.png") as im:
        want = weights_cut(im.convert("RGB"))
    got = load_rgb(tmp_path / "a.png", 24)
    assert got.dtype == torch.uint8 and got.shape == (3, 24, 24)
    assert torch.equal(got, want)


def test_load_rgb_replicates_grey_and_puts_transparency_on_white(tmp_path):
    Image.fromarray(noise(20, 20, channels=1), "L").save(tmp_path / "grey.png")
    grey = load_rgb(tmp_path / "grey.png", 20)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert torch.equal(grey[0], torch.from_numpy(noise(20, 20, channels=1)))  # same size: pixels untouched
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[..., 0] = 200  # red where opaque; the stored colour of transparent pixels is black
    rgba[5:15, 5:15, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    t = load_rgb(tmp_path / "alpha.png", 20)
    assert t[:, 0, 0].tolist() == [255, 255, 255]
    assert t[:, 10, 10].tolist() == [200, 0, 0]
    sixteen = (np.arange(400, dtype=np.uint16).reshape(20, 20) * 160).astype(np.uint16)
    Image.fromarray(sixteen).save(tmp_path / "16bit.png")
    assert load_rgb(tmp_path / "16bit.png", 20).max() > 200  # scaled from 16 bits, not clamped


def test_load_rgb_applies_exif_orientation(tmp_path):
    image = Image.fromarray(noise(30, 60))  # landscape pixels, tagged "rotate 90" (orientation 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    upright = load_rgb(tmp_path / "rot.jpg", 30)
    with Image.open(tmp_path / "rot.jpg") as im:
        im = im.transpose(Image.Transpose.ROTATE_270)  # what orientation 6 means
        plain = torch.from_numpy(np.asarray(im.crop((0, 15, 30, 45))).transpose(2, 0, 1).copy())
    assert (upright.int() - plain.int()).abs().float().mean() < 2


def test_load_rgb_uses_jpeg_draft_mode_for_a_small_stored_size(tmp_path, monkeypatch):
    Image.fromarray(noise(400, 600)).save(tmp_path / "big.jpg")
    decoded_at = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        decoded_at.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    assert load_rgb(tmp_path / "big.jpg", 32).shape == (3, 32, 32)
    assert decoded_at == [(75, 50)]  # 1/8 scale: the shorter side still >= 32


@pytest.mark.parametrize("kind", ["not an image file", "empty file", "truncated", "decompression-bomb"])
def test_load_rgb_refuses_bad_files(tmp_path, kind):
    path = bad_files(tmp_path)[kind]
    with pytest.raises(BadImage, match="not an image|empty|truncated|corrupt|decompression-bomb"):
        load_rgb(path, 32)


# --- layouts and splits ------------------------------------------------------------------------


def test_imagefolder_layout_sorted_classes_and_drawn_stratified_seeded_splits(tmp_path):
    root = make_folder(tmp_path / "photos", classes=("zebra", "ant", "mole"), per_class=20)
    dm = datamodule(root, tmp_path, val_size=0.25, test_size=6, seed=3)
    dm.setup()
    assert dm.class_names == ("ant", "mole", "zebra")
    assert dm.input_spec() == {"kind": "image_folder", "channels": 3, "height": 16, "width": 16}
    sizes = {s: len(getattr(dm, f"data_{s}")) for s in ("train", "val", "test")}
    assert sizes == {"train": 60 - 15 - 6, "val": 15, "test": 6}
    for split in ("val", "test"):  # stratified: every class its share (a fraction of each, a count shared)
        counts = torch.bincount(dm.image_splits[split][1], minlength=3).tolist()
        assert counts == ([5, 5, 5] if split == "val" else [2, 2, 2])
    rows = {s: set(dm.split_rows[s].tolist()) for s in ("train", "val", "test")}
    assert not (rows["train"] & rows["val"]) and not (rows["train"] & rows["test"]) and not (rows["val"] & rows["test"])
    again = datamodule(root, tmp_path, val_size=0.25, test_size=6, seed=3)
    again.setup()
    other = datamodule(root, tmp_path, val_size=0.25, test_size=6, seed=4)
    other.setup()
    assert torch.equal(again.split_rows["val"], dm.split_rows["val"])
    assert not torch.equal(other.split_rows["val"], dm.split_rows["val"])
    # Images and labels line up: a row's pixels are its file's.
    rel, label = scan(root)[1]["train"][int(dm.split_rows["test"][0])]
    assert dm.image_splits["test"][1][0] == label
    assert torch.equal(dm.image_splits["test"][0][0], load_rgb(root / rel, 16))


def test_per_class_counts_share_a_count_by_class_size():
    assert per_class_counts([50, 30, 20], 10) == [5, 3, 2]
    assert sum(per_class_counts([7, 7, 7], 10)) == 10
    assert per_class_counts([10, 3], 0.2) == [2, 1]


def test_train_val_test_layout_keeps_its_folders(tmp_path):
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        make_folder(tmp_path / "ds" / split, classes=("a", "b"), per_class=n)
    dm = datamodule(tmp_path / "ds", tmp_path)
    dm.setup()
    assert {s: len(getattr(dm, f"data_{s}")) for s in ("train", "val", "test")} == {"train": 12, "val": 4, "test": 6}
    # Rows follow the file names, then class: 000.png of a, 000.png of b, 001.png of a ...
    assert dm.image_splits["val"][1].tolist() == [0, 1, 0, 1]


def test_val_drawn_when_only_train_and_test_folders_exist(tmp_path):
    make_folder(tmp_path / "ds" / "train", classes=("a", "b"), per_class=10)
    make_folder(tmp_path / "ds" / "test", classes=("a", "b"), per_class=3)
    dm = datamodule(tmp_path / "ds", tmp_path, val_size=2)
    dm.setup()
    assert {s: len(getattr(dm, f"data_{s}")) for s in ("train", "val", "test")} == {"train": 18, "val": 2, "test": 6}
    assert dm.image_splits["val"][1].tolist() == [0, 1]


# --- the store ---------------------------------------------------------------------------------


def test_second_open_decodes_nothing_and_a_changed_file_makes_a_new_store(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "ds", per_class=4)
    first = datamodule(root, tmp_path)
    first.setup()
    assert first.store.decoded
    calls = []
    monkeypatch.setattr(image_store, "decode_into", lambda *a, **k: calls.append(a) or {})
    second = datamodule(root, tmp_path)
    second.setup()
    assert not second.store.decoded and not calls and second.store.path == first.store.path
    assert second.split_fingerprint("train") == first.split_fingerprint("train")
    monkeypatch.undo()
    target = root / "cat" / "000.png"
    Image.fromarray(noise(40, 50, seed=999)).save(target)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = datamodule(root, tmp_path)
    third.setup()
    assert third.store.decoded and third.store.path != first.store.path
    assert third.split_fingerprint("train") != first.split_fingerprint("train") or (
        third.split_fingerprint("test") != first.split_fingerprint("test")
    )


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError(errno.ENOSPC, "No space left on device")])
def test_an_interrupted_or_failed_decode_leaves_no_store(tmp_path, monkeypatch, failure):
    root = make_folder(tmp_path / "ds", per_class=4)

    def half_then_fail(data, *args, **kwargs):
        Path(data).write_bytes(b"\1" * 100)  # some rows written
        raise failure

    monkeypatch.setattr(image_store, "decode_into", half_then_fail)
    dm = datamodule(root, tmp_path)
    expected = KeyboardInterrupt if failure is KeyboardInterrupt else FmnistError
    with pytest.raises(expected) as raised:
        dm.prepare_data()
    if expected is FmnistError:
        assert "free disk space or point data.cache_dir elsewhere" in str(raised.value)
    store_dir = tmp_path / "store"
    assert [p.name for p in store_dir.iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.undo()
    dm = datamodule(root, tmp_path)
    dm.setup()
    assert dm.store.decoded  # nothing was trusted: decoded from scratch


def test_a_damaged_store_is_decoded_again(tmp_path):
    root = make_folder(tmp_path / "ds", per_class=4)
    dm = datamodule(root, tmp_path)
    dm.setup()
    data = dm.store.path / image_store.DATA_FILE
    data.write_bytes(data.read_bytes()[:-10])
    again = datamodule(root, tmp_path)
    again.setup()
    assert again.store.decoded and torch.equal(again.image_splits["val"][0][:], dm.image_splits["val"][0][:])


def test_decoding_on_worker_processes_gives_the_same_rows(tmp_path):
    root = make_folder(tmp_path / "ds", per_class=image_store.POOL_MIN_FILES // 2 + 1, ext="jpg")
    one = datamodule(root, tmp_path / "a", decode_workers=1)
    one.setup()
    two = datamodule(root, tmp_path / "b", decode_workers=2)
    two.setup()
    every = torch.arange(one.store.count)
    assert torch.equal(one.store.read_rows(every), two.store.read_rows(every))


def test_split_views_gather_rows_and_the_feature_cache_keys_on_the_store(tmp_path):
    root = make_folder(tmp_path / "ds", per_class=6)
    dm = datamodule(root, tmp_path)
    dm.setup()
    images, labels = dm.split_tensors("train")
    assert images.shape == (len(labels), 3, 16, 16) and images.ndim == 4 and images.dtype == torch.uint8
    whole = images[:]
    assert torch.equal(images[torch.tensor([2, 0])], whole[[2, 0]]) and torch.equal(images[1], whole[1])
    pre = ImagePreprocess(32)
    name, fp = split_entry("resnet18", "w", pre, "32", "float16", "train", images, labels, None, "sha-of-store")
    assert fp["data_sha256"] == "sha-of-store"
    _, plain = split_entry("resnet18", "w", pre, "32", "float16", "train", whole, labels)
    assert plain["data_sha256"] != "sha-of-store"  # without the hook: the pixels' hash, as before


def test_augment_crops_and_flips_on_the_device_at_the_stored_size():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    out = random_resized_crop_flip(images)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 255
    assert not torch.allclose(out, images.float())
    full = random_resized_crop_flip(images, scale=(1.0, 1.0), ratio=(1.0, 1.0))  # whole image: flip or not
    for a, b in zip(full, images.float(), strict=True):
        assert torch.allclose(a, b, atol=1e-3) or torch.allclose(a, b.flip(-1), atol=1e-3)


# --- bad input: one line naming the thing and the fix ------------------------------------------


def test_bad_folders_are_one_line_errors(tmp_path):
    with pytest.raises(FmnistError, match=r"data.root=.*nowhere does not exist: point it at a folder"):
        scan(tmp_path / "nowhere")
    make_folder(tmp_path / "one", classes=("only",), per_class=2)
    with pytest.raises(FmnistError, match=r"one class folder \(only\): a classifier needs at least 2 classes"):
        scan(tmp_path / "one")
    make_folder(tmp_path / "empty", classes=("a", "b"), per_class=2)
    (tmp_path / "empty" / "c").mkdir()
    (tmp_path / "empty" / "c" / "notes.txt").write_text("no images here")
    with pytest.raises(FmnistError, match=r"class folder .*empty/c holds no image files: add images"):
        scan(tmp_path / "empty")
    make_folder(tmp_path / "ds" / "train", classes=("a", "b", "c"), per_class=2)
    make_folder(tmp_path / "ds" / "val", classes=("a", "b", "d"), per_class=2)
    with pytest.raises(FmnistError, match=r"ds/val's class folders differ .*\(missing c; extra d\)"):
        scan(tmp_path / "ds")


def test_a_split_size_that_leaves_a_class_without_images_is_refused(tmp_path):
    root = make_folder(tmp_path / "ds", classes=("big", "small"), per_class=2)
    make_folder(root, classes=("big",), per_class=20)
    dm = datamodule(root, tmp_path, val_size=0.5, test_size=0.1)
    with pytest.raises(FmnistError, match=r"data.test_size=0.1 leaves class 'small' \(2 images\) with no test image"):
        dm.setup()
    dm = datamodule(root, tmp_path, val_size=0.5, test_size=0.5)
    with pytest.raises(FmnistError, match=r"test_size=0.5 leave class 'big' \(20 images\) with no training image"):
        dm.setup()


@pytest.mark.parametrize("kind", ["not an image file", "truncated", "decompression-bomb"])
def test_a_bad_file_is_an_error_naming_it_or_skipped_counted_and_listed(tmp_path, kind, caplog):
    root = make_folder(tmp_path / "ds", per_class=4)
    bad = bad_files(tmp_path / "bad")[kind]
    target = root / "dog" / bad.name
    target.write_bytes(bad.read_bytes())
    with pytest.raises(FmnistError, match=rf"{target}: .*; fix or remove the file, or set data.on_bad_file=skip"):
        datamodule(root, tmp_path).setup()
    run_dir = tmp_path / "run"
    dm = datamodule(root, tmp_path, on_bad_file="skip", run_dir=str(run_dir))
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert not dm.store.decoded  # the first attempt's store recorded the file: nothing decoded again
    assert sum(len(getattr(dm, f"data_{s}")) for s in ("train", "val", "test")) == 12  # 13 files, 1 left out
    listed = (run_dir / SKIPPED_LIST).read_text().splitlines()
    assert len(listed) == 1 and listed[0].startswith(str(target))
    assert "Skipped 1 unreadable image files" in caplog.text


def test_config_keys_and_their_rules(tmp_path):
    cfg = compose_cfg("train", ["data=image_folder", f"data.root={tmp_path}", "model=resnet18", "model.image_size=64"])
    assert cfg.data.stored_size == 64 and cfg.data.backbone == "resnet18"
    check_config(cfg)
    default = compose_cfg("train", ["data=image_folder", f"data.root={tmp_path}", "model=efficientnet_v2_s"])
    dm = ImageFolderDataModule(**{k: default.data[k] for k in ("root", "stored_size", "backbone", "weights")})
    assert dm.size() == 384  # efficientnet_v2_s's weights crop at 384
    for override, message in (
        ("data.val_size=0", "data.val_size=0 must be a fraction in (0, 1) or a count >= 1"),
        ("data.test_size=1.5", "data.test_size=1.5 must be a fraction in (0, 1) or a count >= 1"),
        ("data.on_bad_file=ignore", "data.on_bad_file='ignore' must be one of error, skip"),
    ):
        with pytest.raises(FmnistError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_config(compose_cfg("train", ["data=image_folder", f"data.root={tmp_path}", override]))
    plain = compose_cfg("train", [])  # Fashion-MNIST stays the default, its keys as they were
    assert plain.data._target_ == "fmnist_tl.data.FashionMNISTDataModule" and plain.data.val_size == 5000


@pytest.mark.slow
def test_cli_bad_root_is_one_error_line_exit_2(tmp_path):
    common = ["model=resnet18", "model.weights=null", "model.image_size=32", f"paths.root_dir={tmp_path}"]
    result = run_cli("data=image_folder", f"data.root={tmp_path / 'missing'}", *common)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines == [
        f"error: data.root={tmp_path / 'missing'} does not exist: point it at a folder with one subfolder of "
        "images per class (or train/, val/ and test/ folders holding those)"
    ]


@pytest.mark.slow
def test_a_colour_folder_trains_evaluates_predicts_and_exports_as_its_commands_run(tmp_path):
    """The worked example of docs/own-images.md on a made folder of colour JPEGs: no model.num_classes
    (the head takes the folder's 3 classes), then evaluate, predict and an ONNX export that agrees."""
    import onnx

    data = ["data=image_folder", f"data.root={make_folder(tmp_path / 'ds', per_class=12, ext='jpg')}"]
    common = [f"paths.root_dir={tmp_path}", "trainer.accelerator=cpu", "trainer.precision=32-true"]
    model = ["model=resnet18", "model.weights=null", "model.image_size=32"]
    run = tmp_path / "run"
    trained = run_cli(*data, *common, *model, "trainer.max_epochs=2", f"hydra.run.dir={run}")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert json.loads((run / "metrics.json").read_text())["status"] == "completed"
    assert "| cat |" in (run / "report.md").read_text() and (run / "mistakes.png").is_file()
    ckpt = run / "checkpoints" / "last.ckpt"
    evaluated = run_cli(*data, *common, f"ckpt_path={ckpt}", module="fmnist_tl.evaluate")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    (report,) = (tmp_path / "logs" / "evaluate" / "runs").glob("*/report.json")
    assert [row["class"] for row in json.loads(report.read_text())["per_class"]] == ["cat", "dog", "eel"]
    predicted = run_cli(
        "--checkpoint", str(ckpt), "--format", "json", str(tmp_path / "ds" / "eel"), module="fmnist_tl.predict"
    )
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert {p["label"] for p in json.loads(predicted.stdout)} <= {"cat", "dog", "eel"}
    exported = run_cli(*data, common[0], f"ckpt_path={ckpt}", "format=onnx", module="fmnist_tl.export")
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert "top-1 agreement 100.00%" in exported.stdout
    (onnx_file,) = (tmp_path / "logs" / "export" / "runs").glob("*/model.onnx")
    meta = {p.key: p.value for p in onnx.load(onnx_file, load_external_data=False).metadata_props}
    assert json.loads(meta["class_names"]) == ["cat", "dog", "eel"]


# --- proof: Fashion-MNIST as a folder of PNGs trains exactly as Fashion-MNIST -------------------


@pytest.mark.slow
@needs_real_data
def test_fashion_mnist_as_a_folder_of_pngs_gives_bit_identical_features_and_the_same_metrics(tmp_path):
    """The real IDX files, a seeded subset, written out as PNGs in train/val/test folders (numbered
    files keep each split's order). Stored at 28 px, the folder path feeds the model the very pixels
    of the Fashion-MNIST path (grey replicated to 3 channels before, not after, the resize to 32),
    so the backbone's features are bit-identical, and the whole run (same seed, same order) too."""
    from fmnist_tl.train import train

    fm = FashionMNISTDataModule(
        data_dir=str(tmp_path / "data"), mirror_dir=str(DEBIAN_MIRROR), train_subset=400, val_size=100, test_subset=100
    )
    fm.prepare_data()
    fm.setup()
    root = tmp_path / "fmnist-pngs"
    # Folder names sort into label order ("0-T-shirt-top", "1-Trouser", ...; a "/" cannot be in one).
    names = [f"{i}-{name.replace('/', '-')}" for i, name in enumerate(fm.class_names)]
    for split in ("train", "val", "test"):
        images, labels = fm.split_tensors(split)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / names[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy(), "L").save(folder / f"{i:05d}.png")
    folder = datamodule(root, tmp_path, stored_size=28)
    folder.setup()
    assert folder.class_names == tuple(names)
    backbone = __import__("torchvision").models.resnet18(num_classes=10).eval()
    pre = ImagePreprocess(32)
    for split in ("train", "val", "test"):
        fm_images, fm_labels = fm.split_tensors(split)
        images, labels = folder.split_tensors(split)
        assert torch.equal(labels, fm_labels.long())
        assert torch.equal(images[:], fm_images.expand(-1, 3, -1, -1))  # the same pixels
        with torch.no_grad():
            assert torch.equal(backbone(pre(images[:64])), backbone(pre(fm_images[:64])))  # bit-identical

    common = [
        f"paths.root_dir={tmp_path}",
        "model=resnet18",
        "model.weights=null",
        "model.image_size=32",
        "data.batch_size=32",
        "trainer.max_epochs=2",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "features.backend=torch",
        "features.precision=32",
        "report.plots=false",
        "callbacks.rich_progress_bar=null",
    ]
    fm_metrics = train(
        make_cfg(
            [*common, f"data.mirror_dir={DEBIAN_MIRROR}", "data.train_subset=400", "data.val_size=100"]
            + ["data.test_subset=100"],
            tmp_path / "run-fm",
        )
    )
    folder_metrics = train(
        make_cfg([*common, "data=image_folder", f"data.root={root}", "data.stored_size=28"], tmp_path / "run-folder")
    )
    scores = [{k: v for k, v in m.items() if k.startswith(("val/", "test/"))} for m in (fm_metrics, folder_metrics)]
    assert "test/acc" in scores[0] and scores[1] == scores[0]  # exactly: same features, same order, same seed
