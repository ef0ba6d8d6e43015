"""Prediction on user images: every Pillow mode the issue lists, bad files, order, formats, safety."""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torchvision.datasets import FashionMNIST

from fmnist_tl.core.errors import FmnistError
from fmnist_tl.data.images import BadImage, load_image, load_rgb, open_image
from fmnist_tl.predict import classify, predict, run
from fmnist_tl.training.model import TransferClassifier
from tests.colour_data import CLASS_NAMES as COLOUR_CLASSES
from tests.colour_data import SIZE, colour_images
from tests.helpers import run_cli, tiny_split


def shape_image(fg: float, bg: float, h: int = 60, w: int = 40) -> np.ndarray:
    """A 40x24 block (the 'object') on a background, values in [0, 1]."""
    a = np.full((h, w), bg, dtype=np.float32)
    a[10:50, 8:32] = fg
    return a


def asymmetric_image() -> np.ndarray:
    """An L-shaped light object on black (40 high, 60 wide): tells rotations and flips apart."""
    a = np.zeros((40, 60), dtype=np.uint8)
    a[4:36, 4:14] = 255  # vertical bar on the left
    a[26:36, 4:56] = 255  # foot along the bottom
    return a


def to_u8(a: np.ndarray) -> np.ndarray:
    return np.rint(a * 255).astype(np.uint8)


def sides(t: torch.Tensor) -> torch.Tensor:
    """Left and right columns: background once the tall test object is fitted (it fills the height)."""
    return torch.cat([t[0, :, 0], t[0, :, -1]]).float()


def assert_light_object_on_dark(t: torch.Tensor, low: int = 150) -> None:
    """The converted 28x28 image follows Fashion-MNIST: black background, bright object in the middle."""
    assert t.shape == (1, 28, 28) and t.dtype == torch.uint8
    assert sides(t).max() <= 10, "background should be black"
    assert t[0, 10:18, 10:18].float().mean() >= low, "object should be light"


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A valid 1-bit PNG declaring side x side pixels: ~50 KB on disk, 400 Mpx if decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\0" * (1 + side // 8)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def bad_files(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.png").write_text("this is not an image\n")
    (folder / "empty.png").write_bytes(b"")
    noise = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(folder / "full.png")
    full = (folder / "full.png").read_bytes()
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    (folder / "full.png").unlink()
    return {
        "not an image file": folder / "notes.png",
        "empty file": folder / "empty.png",
        "truncated": folder / "truncated.png",
        "decompression-bomb": bomb_png(folder / "huge.png"),
    }


# --- Reading each kind of image ------------------------------------------------------------------


def test_grey_light_object_on_dark_is_kept(tmp_path):
    Image.fromarray(to_u8(shape_image(1.0, 0.0)), "L").save(tmp_path / "a.png")
    assert_light_object_on_dark(load_image(tmp_path / "a.png"), low=250)
    inverted = load_image(tmp_path / "a.png", invert="yes")  # forced: dark object on white
    assert sides(inverted).min() >= 245 and inverted[0, 10:18, 10:18].max() <= 10


def test_photo_on_white_background_is_inverted_unless_told_not_to(tmp_path):
    rgb = np.full((60, 40, 3), 255, np.uint8)
    rgb[10:50, 8:32] = (40, 40, 160)  # a dark blue garment on a white background
    Image.fromarray(rgb).save(tmp_path / "photo.jpg", quality=95)
    assert_light_object_on_dark(load_image(tmp_path / "photo.jpg"))
    kept = load_image(tmp_path / "photo.jpg", invert="no")
    assert sides(kept).min() >= 240 and kept[0, 10:18, 10:18].float().mean() < 100


@pytest.mark.parametrize("stored_rgb", [(0, 0, 0), (255, 255, 255)], ids=["transparent-black", "transparent-white"])
@pytest.mark.parametrize("object_grey", [20, 235], ids=["dark-object", "light-object"])
def test_rgba_is_composited_not_dropped(tmp_path, stored_rgb, object_grey):
    rgba = np.zeros((60, 40, 4), np.uint8)
    rgba[..., :3] = stored_rgb  # what the transparent pixels happen to store
    rgba[10:50, 8:32] = (object_grey, object_grey, object_grey, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    # Dropping alpha would give one flat image here (object and background the same grey).
    assert_light_object_on_dark(load_image(tmp_path / "a.png"))


def test_palette_with_transparency(tmp_path):
    index = np.zeros((60, 40), np.uint8)
    index[10:50, 8:32] = 1
    image = Image.fromarray(index, "P")
    image.putpalette([255, 255, 255, 30, 30, 30] + [0] * 762)  # transparent white, dark object
    image.save(tmp_path / "p.png", transparency=0)
    with Image.open(tmp_path / "p.png") as check:
        assert check.mode == "P" and "transparency" in check.info
    assert_light_object_on_dark(load_image(tmp_path / "p.png"))


def test_16_bit_grey_is_scaled_not_clamped(tmp_path):
    values = np.full((60, 40), 1000, np.uint16)
    values[10:50, 8:32] = 40000
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as check:
        assert check.mode.startswith("I")
    t = load_image(tmp_path / "g16.png")
    assert_light_object_on_dark(t, low=130)
    # (40000 - 1000) / (65535 - 1000) of white after levelling the background: ~154, not 255.
    assert 140 <= int(t[0, 14, 14]) <= 170


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_cmyk(tmp_path, suffix):
    rgb = np.full((60, 40, 3), 255, np.uint8)
    rgb[10:50, 8:32] = (180, 30, 30)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / f"cmyk{suffix}")
    with Image.open(tmp_path / f"cmyk{suffix}") as check:
        assert check.mode == "CMYK"
    t = load_image(tmp_path / f"cmyk{suffix}")
    assert_light_object_on_dark(t, low=120)
    assert (t.float() - load_image(tmp_path / "rgb.png").float()).abs().mean() < 8


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    stored = asymmetric_image()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    Image.fromarray(stored).transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")
    Image.fromarray(stored).save(tmp_path / "ignored.png")
    got = load_image(tmp_path / "rotated.jpg").float()
    upright = load_image(tmp_path / "upright.png").float()
    ignored = load_image(tmp_path / "ignored.png").float()
    assert (got - upright).abs().mean() < 6
    assert (got - ignored).abs().mean() > 40


def test_animated_gif_uses_first_frame(tmp_path):
    first = asymmetric_image()
    second = np.ascontiguousarray(first[::-1, ::-1])
    Image.fromarray(first).save(tmp_path / "anim.gif", save_all=True, append_images=[Image.fromarray(second)])
    with Image.open(tmp_path / "anim.gif") as check:
        assert check.n_frames == 2
    Image.fromarray(first).save(tmp_path / "first.png")
    Image.fromarray(second).save(tmp_path / "second.png")
    got = load_image(tmp_path / "anim.gif")
    assert torch.equal(got, load_image(tmp_path / "first.png"))
    assert not torch.equal(got, load_image(tmp_path / "second.png"))


def test_aspect_ratio_kept_when_fitting_into_28x28(tmp_path):
    wide = np.zeros((100, 160), np.uint8)
    wide[30:70, 20:100] = 255  # an 80x40 (2:1) block with margins
    Image.fromarray(wide).save(tmp_path / "wide.png")
    t = load_image(tmp_path / "wide.png")[0]
    assert t[:, 0].max() > 200 and t[:, 27].max() > 200  # trimmed and scaled to the full width
    assert t[:6].max() == 0 and t[-6:].max() == 0  # 14 px high, centred: black above and below
    assert t[8:20].float().mean() > 200


def test_28x28_fashion_mnist_image_passes_unchanged(tmp_path):
    images, _ = tiny_split(5, 7)
    for i, image in enumerate(images):
        Image.fromarray(image.numpy(), "L").save(tmp_path / f"{i}.png")
        assert torch.equal(load_image(tmp_path / f"{i}.png")[0], image)


def test_bad_files_give_a_reason_each(tmp_path, monkeypatch):
    files = bad_files(tmp_path)
    decoded = []
    original_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or original_load(self))
    for reason, path in files.items():
        with pytest.raises(BadImage, match=reason):
            load_image(path)
    # The 20000x20000 PNG is refused from its header: no pixel of it was decoded.
    assert (20000, 20000) not in decoded


# --- Reading images for a model trained on a folder of images (load_rgb) -------------------------------


def stripes(h: int, w: int) -> np.ndarray:
    """Red | green | blue vertical thirds, uint8 h x w x 3."""
    a = np.zeros((h, w, 3), dtype=np.uint8)
    for i in range(3):
        a[:, i * w // 3 : (i + 1) * w // 3, i] = 255
    return a


def test_load_rgb_resizes_the_shorter_side_and_crops_the_centre(tmp_path):
    Image.fromarray(stripes(40, 120)).save(tmp_path / "wide.png")
    t = load_rgb(tmp_path / "wide.png", 20)  # 40x120 -> 20x60 -> its middle 20x20: the green third
    assert t.shape == (3, 20, 20) and t.dtype == torch.uint8
    inner = t[:, :, 2:-2]  # the crop's edges blend into the neighbouring thirds (antialiased resize)
    assert inner[1].min() == 255 and inner[0].max() == 0 and inner[2].max() == 0
    Image.fromarray(stripes(120, 40).transpose(1, 0, 2)[:, :, ::-1].copy()).save(tmp_path / "tall.png")
    assert load_rgb(tmp_path / "tall.png", 20).shape == (3, 20, 20)
    images = colour_images(3, 4)[0]
    for i, image in enumerate(images):  # an image already at the size passes unchanged
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
        assert torch.equal(load_rgb(tmp_path / f"{i}.png", SIZE), image)


def test_load_rgb_grey_transparency_16_bit_and_exif(tmp_path):
    Image.fromarray(np.full((30, 30), 77, dtype=np.uint8), "L").save(tmp_path / "grey.png")
    assert load_rgb(tmp_path / "grey.png", 10).unique().tolist() == [77]
    rgba = np.zeros((30, 30, 4), dtype=np.uint8)  # fully transparent black: white, not black
    rgba[10:20, 10:20] = (0, 0, 255, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
    t = load_rgb(tmp_path / "cutout.png", 30)
    assert t[:, 0, 0].tolist() == [255, 255, 255] and t[:, 15, 15].tolist() == [0, 0, 255]
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert load_rgb(tmp_path / "deep.png", 10).unique().tolist() == [255]  # scaled, not clamped
    upright = stripes(30, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90 degrees clockwise
    Image.fromarray(np.rot90(upright, 1).copy()).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    t = load_rgb(tmp_path / "rotated.jpg", 30).float()  # upright 30x60 -> the middle 30 columns
    assert t[0, :, :3].mean() > 180 and t[1, :, 10:20].mean() > 180 and t[2, :, -3:].mean() > 180


def test_load_rgb_decodes_a_large_jpeg_at_reduced_scale(tmp_path):
    photo = np.asarray(Image.fromarray(stripes(1200, 1600)).resize((1600, 1200)))
    Image.fromarray(photo).save(tmp_path / "big.jpg", quality=95)
    with open_image(tmp_path / "big.jpg", 64) as image:
        assert 64 <= min(image.size) < 1200  # draft mode: decoded at 1/2 to 1/8 scale
    with open_image(tmp_path / "big.jpg", 1200) as image:
        assert image.size == (1600, 1200)
    assert load_rgb(tmp_path / "big.jpg", 64).shape == (3, 64, 64)


def test_load_rgb_refuses_bad_files_with_a_reason_each(tmp_path, monkeypatch):
    decoded = []
    original_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or original_load(self))
    for reason, path in bad_files(tmp_path).items():
        with pytest.raises(BadImage, match=reason):
            load_rgb(path, 32)
    assert (20000, 20000) not in decoded
    with pytest.raises(BadImage, match="no such file"):
        load_rgb(tmp_path / "missing.png", 32)


# --- predict() from code --------------------------------------------------------------------------


@pytest.mark.slow
def test_predict_keeps_input_order_and_matches_the_model(tmp_path, model, checkpoint):
    images, _ = tiny_split(6, 3)
    good = []
    for i, image in enumerate(images):
        good.append(tmp_path / f"img{i}.png")
        Image.fromarray(image.numpy(), "L").save(good[-1])
    bad = bad_files(tmp_path / "bad")
    inputs = [good[3], bad["empty file"], good[0], tmp_path / "missing.png", good[5], bad["truncated"]]
    results = predict(inputs, checkpoint, top_k=3, batch_size=2)
    assert [r.path for r in results] == [str(p) for p in inputs]
    assert [r.ok for r in results] == [True, False, True, False, True, False]
    assert results[3].error == "no such file or directory"
    expected = classify(model, images[[3, 0, 5]].unsqueeze(1))
    for result, probs in zip([results[0], results[2], results[4]], expected, strict=True):
        values, indices = probs.topk(3)
        assert [name for name, _ in result.top] == [model.class_names[i] for i in indices]
        assert np.allclose([p for _, p in result.top], values.numpy(), atol=1e-6)
        assert result.label == result.top[0][0]


@pytest.mark.slow
def test_predict_expands_folders_and_globs_in_order(tmp_path, model):
    for name in ("b.png", "a.png", "sub/c.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(to_u8(shape_image(1.0, 0.0))).save(tmp_path / name)
    (tmp_path / "readme.txt").write_text("not an image, skipped when listing a folder")
    results = predict([tmp_path / "b.png", tmp_path, str(tmp_path / "*.png"), str(tmp_path / "none*.png")], model=model)
    names = [Path(r.path).relative_to(tmp_path).as_posix() for r in results[:-1]]
    assert names == ["b.png", "a.png", "b.png", "sub/c.png", "a.png", "b.png"]
    assert results[-1].error == "no file matches this pattern"


@pytest.fixture(scope="module")
def colour_model(colour_checkpoint) -> TransferClassifier:
    return TransferClassifier.from_checkpoint(colour_checkpoint)


def test_predict_with_a_colour_model_reads_rgb_at_its_stored_size_and_names_its_classes(
    tmp_path, colour_checkpoint, colour_model
):
    images, _ = colour_images(5, 21)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])
    results = predict(paths, colour_checkpoint)  # top-k: 3 by default, all of this model's classes
    expected = classify(colour_model, images)
    for result, probs in zip(results, expected, strict=True):
        values, indices = probs.topk(3)
        assert [name for name, _ in result.top] == [COLOUR_CLASSES[i] for i in indices]
        assert np.allclose([p for _, p in result.top], values.numpy(), atol=1e-6)
    # A photo of any size and shape goes through load_rgb at the stored size, as in training.
    Image.fromarray(stripes(90, 160)).save(tmp_path / "photo.jpg")
    (result,) = predict(tmp_path / "photo.jpg", model=colour_model, top_k=1)
    probs = classify(colour_model, load_rgb(tmp_path / "photo.jpg", SIZE).unsqueeze(0))[0]
    assert result.top == [(COLOUR_CLASSES[int(probs.argmax())], pytest.approx(float(probs.max()), abs=1e-6))]


def test_predict_with_a_colour_model_refuses_invert_and_a_top_k_beyond_its_classes(tmp_path, colour_model):
    Image.fromarray(stripes(30, 30)).save(tmp_path / "a.png")
    with pytest.raises(FmnistError, match="--invert yes: only Fashion-MNIST models take it"):
        predict(tmp_path / "a.png", model=colour_model, invert="yes")
    with pytest.raises(FmnistError, match=re.escape("top_k=4 must be between 1 and 3 (the model's classes)")):
        predict(tmp_path / "a.png", model=colour_model, top_k=4)


def test_cli_with_a_colour_model(tmp_path, colour_checkpoint, capsys):
    Image.fromarray(stripes(30, 45)).save(tmp_path / "a.png")
    assert run(["-c", str(colour_checkpoint), "--format", "json", str(tmp_path / "a.png")]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert sorted(t["label"] for t in row["top_k"]) == sorted(COLOUR_CLASSES)


# --- The command line -------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_formats_and_exit_code_zero(tmp_path, checkpoint, capsys):
    Image.fromarray(to_u8(shape_image(1.0, 0.0))).save(tmp_path / "a.png")
    Image.fromarray(to_u8(shape_image(0.2, 1.0))).save(tmp_path / "b.jpg")
    assert run(["--checkpoint", str(checkpoint), "--format", "csv", "--top-k", "2", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "path,label_1,probability_1,label_2,probability_2"
    assert [line.split(",")[0] for line in out[1:]] == [str(tmp_path / "a.png"), str(tmp_path / "b.jpg")]
    assert run(["-c", str(checkpoint), "--top-k", "3", str(tmp_path / "a.png")]) == 0
    table = capsys.readouterr().out
    assert "prediction" in table and "3rd" in table and str(tmp_path / "a.png") in table


def test_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": {}, "hyper_parameters": Payload()}, f, protocol=2)
    Image.fromarray(to_u8(shape_image(1.0, 0.0))).save(tmp_path / "a.png")
    with pytest.raises(SystemExit) as exit_info:
        from fmnist_tl.predict import main

        main(["--checkpoint", str(evil), str(tmp_path / "a.png")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: checkpoint {evil} refused")
    assert not marker.exists()


@pytest.mark.parametrize(
    "arg, says",
    [
        (
            "model.weights=null",
            "predict takes the model from the checkpoint (--checkpoint), so it has no model.* settings",
        ),
        ("+trainer.max_epochs=3", "predict takes no config overrides, only flags (see --help)"),
    ],
)
def test_an_override_carried_over_from_train_is_one_line_before_the_checkpoint_is_read(tmp_path, capsys, arg, says):
    from fmnist_tl.predict import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "missing.ckpt"), arg])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {arg}: {says}; drop that argument"]


@pytest.mark.slow
def test_an_image_file_named_like_an_override_is_still_an_image(tmp_path, checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(to_u8(shape_image(1.0, 0.0))).save(tmp_path / "a=1.png")
    assert run(["--checkpoint", str(checkpoint), "--format", "json", "a=1.png"]) == 0


@pytest.mark.slow
def test_cli_bad_inputs_reported_others_predicted_exit_1(tmp_path, checkpoint):
    good = []
    for i, (fg, bg) in enumerate([(1.0, 0.0), (0.1, 1.0)]):
        good.append(tmp_path / f"good{i}.png")
        Image.fromarray(to_u8(shape_image(fg, bg))).save(good[-1])
    bad = bad_files(tmp_path / "bad")
    order = [good[0], *bad.values(), good[1]]
    proc = run_cli("--checkpoint", str(checkpoint), "--format", "json", *map(str, order), module="fmnist_tl.predict")
    assert proc.returncode == 1, proc.stderr
    assert [row["path"] for row in json.loads(proc.stdout)] == [str(good[0]), str(good[1])]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == len(bad)
    for line, (reason, path) in zip(errors, bad.items(), strict=True):
        assert line.startswith(f"{path}: ") and reason in line
    assert "Traceback" not in proc.stderr


def strip_class_names(checkpoint: Path, to: Path) -> Path:
    """`checkpoint` as written before class names and the input spec travelled in checkpoints."""
    ckpt = torch.load(checkpoint, weights_only=True)
    for key in ("class_names", "input_spec"):
        ckpt["hyper_parameters"].pop(key, None)
    torch.save(ckpt, to)
    return to


def test_a_checkpoint_from_before_class_names_predicts_as_fashion_mnist(tmp_path, checkpoint):
    old = strip_class_names(checkpoint, tmp_path / "old.ckpt")
    Image.fromarray(to_u8(shape_image(0.2, 1.0))).save(tmp_path / "photo.png")
    (then,) = predict(tmp_path / "photo.png", old, top_k=10)
    (now,) = predict(tmp_path / "photo.png", checkpoint, top_k=10)
    assert then.top == now.top and {name for name, _ in then.top} == set(FashionMNIST.classes)
