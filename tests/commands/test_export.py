"""Export round trips: ONNX through onnxruntime, TorchScript through torch.jit, weights via safetensors."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torchvision.datasets import FashionMNIST

import fmnist_tl.export as export_module
from fmnist_tl.core.errors import FmnistError
from fmnist_tl.export import export
from fmnist_tl.training.model import TransferClassifier
from tests.colour_data import CLASS_NAMES as COLOUR_CLASSES
from tests.colour_data import SIZE, ColourData, colour_images
from tests.helpers import REPO, make_entry_cfg, run_cli, tiny_data_overrides, tiny_split

# What a Fashion-MNIST checkpoint's export names its outputs (the datamodule's class names).
CLASS_NAMES = tuple(FashionMNIST.classes)


def export_cfg(tiny_mirror, tmp_path, *extra: str):
    return make_entry_cfg("export", [*tiny_data_overrides(tiny_mirror, tmp_path), *extra], tmp_path / "export")


def torch_logits(model: TransferClassifier, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(model.preprocess(images)).float()


def fresh_images(n: int) -> torch.Tensor:
    """uint8 (n, 1, 28, 28) images the export never saw (a different seed from the test split)."""
    return tiny_split(n, 99)[0].unsqueeze(1)


@pytest.mark.slow
def test_onnx_round_trip_with_onnxruntime(tiny_mirror, tmp_path, checkpoint, model, capsys):
    record = export(export_cfg(tiny_mirror, tmp_path, f"ckpt_path={checkpoint}", "format=onnx"))
    out = capsys.readouterr().out
    assert re.search(r"on 100 test images: max \|logit diff\| \S+, top-1 agreement 100\.00% \(100/100\)", out)
    assert record["verification"]["top1_agreement"] == 1.0 and record["verification"]["max_abs_logit_diff"] < 1e-3
    folder = tmp_path / "export"
    assert sorted(p.name for p in folder.iterdir()) == ["export.json", "model.onnx", "model.safetensors"]

    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)"
    assert not isinstance(inp.shape[0], int) and inp.shape[1:] == [1, 28, 28]  # dynamic batch
    assert json.loads(session.get_modelmeta().custom_metadata_map["class_names"]) == list(CLASS_NAMES)
    for n in (1, 7):
        images = fresh_images(n)
        got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
        want = torch_logits(model, images)
        assert got.shape == (n, 10)
        assert torch.allclose(got, want, atol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))

    # safetensors: the full state_dict, reloadable into a model built from the stored hyper-parameters.
    state = load_file(folder / "model.safetensors")
    with safe_open(folder / "model.safetensors", "pt") as f:
        hparams = json.loads(f.metadata()["hyper_parameters"])
    rebuilt = TransferClassifier(**hparams, load_weights=False).eval()
    rebuilt.load_state_dict(state, strict=True)
    images = fresh_images(4)
    assert torch.equal(torch_logits(rebuilt, images), torch_logits(model, images))


@pytest.mark.slow
def test_torchscript_round_trip(tiny_mirror, tmp_path, checkpoint, model):
    record = export(export_cfg(tiny_mirror, tmp_path, f"ckpt_path={checkpoint}", "format=torchscript"))
    assert record["verification"]["runtime"] == "torch.jit"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(tmp_path / "export" / "model.torchscript.pt"))
    for n in (1, 5):
        images = fresh_images(n)
        with torch.inference_mode():
            got = scripted(images)
        assert torch.allclose(got, torch_logits(model, images), atol=1e-5)


@pytest.mark.slow
def test_export_that_disagrees_with_pytorch_fails_and_writes_nothing(tiny_mirror, tmp_path, checkpoint, monkeypatch):
    real = export_module.run_torchscript
    monkeypatch.setattr(export_module, "run_torchscript", lambda path, images: real(path, images).roll(1, dims=-1))
    cfg = export_cfg(tiny_mirror, tmp_path, f"ckpt_path={checkpoint}", "format=torchscript")
    with pytest.raises(FmnistError, match=r"export verification failed: top-1 agreement \d+\.\d+% with PyTorch"):
        export(cfg)
    assert not (tmp_path / "export").exists() or not list((tmp_path / "export").iterdir())


@pytest.mark.slow
def test_export_whose_odd_batch_alone_disagrees_says_so(tiny_mirror, tmp_path, checkpoint, monkeypatch):
    real = export_module.run_torchscript

    def odd_batch_wrong(path, images):
        logits = real(path, images)
        return logits.roll(1, dims=-1) if len(images) == export_module.ODD_BATCH else logits

    monkeypatch.setattr(export_module, "run_torchscript", odd_batch_wrong)
    cfg = export_cfg(tiny_mirror, tmp_path, f"ckpt_path={checkpoint}", "format=torchscript")
    message = r"top-1 agreement 100\.00% with PyTorch on \d+ images and [0-2]/3 in a batch of 3"
    with pytest.raises(FmnistError, match=message):
        export(cfg)


# --- A model trained on a folder of colour images ---------------------------------------------------


@pytest.fixture
def colour_data(monkeypatch):
    """export's cfg.data builds ColourData: the (in-memory) data the colour checkpoint was trained on."""
    monkeypatch.setattr(export_module, "build", lambda cfg, **kwargs: ColourData())


@pytest.fixture(scope="module")
def colour_model(colour_checkpoint) -> TransferClassifier:
    return TransferClassifier.from_checkpoint(colour_checkpoint)


def as_photos(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> (N, H, W, 3), as numpy holds decoded photos: what a colour model's export takes."""
    return images.permute(0, 2, 3, 1).contiguous()


def test_colour_model_exports_to_onnx_taking_uint8_rgb_photos_with_its_class_names(
    tiny_mirror, tmp_path, colour_checkpoint, colour_model, colour_data
):
    cfg = export_cfg(tiny_mirror, tmp_path, f"ckpt_path={colour_checkpoint}", "format=onnx")
    record = export(cfg)
    check = record["verification"]
    assert check["num_images"] == 24 and check["dynamic_batch_checked"] == [24, 3]  # the whole test split
    assert check["top1_agreement"] == 1.0 and check["max_abs_logit_diff"] < 1e-3
    assert record["class_names"] == list(COLOUR_CLASSES) and "(N, 20, 20, 3) RGB" in record["input"]
    assert record["output"] == "logits (N, 3); softmax for probabilities"
    folder = tmp_path / "export"
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.type == "tensor(uint8)" and not isinstance(inp.shape[0], int) and inp.shape[1:] == [SIZE, SIZE, 3]
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["class_names"]) == list(COLOUR_CLASSES)
    assert json.loads(meta["input_spec"]) == {"kind": "image_folder", "channels": 3, "height": SIZE, "width": SIZE}
    for n in (1, 3, 7):
        images = colour_images(n, 77)[0]  # images the export never saw
        got = torch.from_numpy(session.run(None, {"images": as_photos(images).numpy()})[0])
        want = torch_logits(colour_model, images)
        assert got.shape == (n, 3) and torch.allclose(got, want, atol=1e-4)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert json.loads(f.metadata()["class_names"]) == list(COLOUR_CLASSES)
        assert json.loads(f.metadata()["hyper_parameters"])["class_names"] == list(COLOUR_CLASSES)


def test_colour_model_exports_to_torchscript_taking_uint8_rgb_photos(
    tiny_mirror, tmp_path, colour_checkpoint, colour_model, colour_data
):
    cfg = export_cfg(tiny_mirror, tmp_path, f"ckpt_path={colour_checkpoint}", "format=torchscript")
    assert export(cfg)["verification"]["top1_agreement"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(tmp_path / "export" / "model.torchscript.pt"))
    images = colour_images(5, 78)[0]
    with torch.inference_mode():
        got = scripted(as_photos(images))
    assert torch.allclose(got, torch_logits(colour_model, images), atol=1e-5)


def test_exporting_a_colour_model_with_other_data_is_one_line_and_writes_nothing(
    tiny_mirror, tmp_path, colour_checkpoint
):
    cfg = export_cfg(tiny_mirror, tmp_path, f"ckpt_path={colour_checkpoint}", "format=torchscript")
    with pytest.raises(FmnistError, match=re.escape("the model was trained on 3 classes (red apple, green leaf")):
        export(cfg)  # cfg.data is Fashion-MNIST
    assert not (tmp_path / "export").exists() or not list((tmp_path / "export").iterdir())


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "ckpt_path is required"),
        (["ckpt_path=x.ckpt", "format=tflite"], "format='tflite' must be one of onnx, torchscript"),
        (["ckpt_path=x.ckpt", "verify.num_images=0"], "verify.num_images=0 must be an integer >= 3"),
        (["ckpt_path=/no/such.ckpt"], "checkpoint /no/such.ckpt does not exist"),
        (["+bogus=1"], "unknown config key 'bogus'"),
    ],
)
def test_export_rejects_bad_config(tiny_mirror, tmp_path, extra, message):
    with pytest.raises(FmnistError, match=re.escape(message)):
        export(export_cfg(tiny_mirror, tmp_path, *extra))


@pytest.mark.slow
def test_export_cli(tiny_mirror, tmp_path, checkpoint):
    args = [f"ckpt_path={checkpoint}", "format=torchscript", *tiny_data_overrides(tiny_mirror, tmp_path)]
    proc = run_cli(*args, module="fmnist_tl.export")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "top-1 agreement 100.00% (100/100)" in proc.stdout
    (record,) = (tmp_path / "logs" / "export" / "runs").glob("*/export.json")
    assert json.loads(record.read_text())["verification"]["num_images"] == 100


@pytest.mark.parametrize("missing", ["onnxscript", "onnxruntime"])
def test_onnx_without_the_export_extra_is_one_line_before_anything_is_built(missing, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, missing, None)  # what importlib sees when the package is not installed
    no_ckpt = tmp_path / "never_read.ckpt"  # refused before the checkpoint is even looked for
    with pytest.raises(FmnistError) as e:
        export(make_entry_cfg("export", [f"paths.root_dir={tmp_path}", f"ckpt_path={no_ckpt}"], tmp_path / "out"))
    assert str(e.value) == f"format=onnx needs {missing}, not installed: pip install 'fmnist_tl[export]'"
    assert not (tmp_path / "out").exists()


def docs_onnx_snippet(after: str = "Using the ONNX file without PyTorch") -> str:
    """The first code block after `after` in docs/evaluation.md, as written."""
    section = (REPO / "docs" / "evaluation.md").read_text().split(after, 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_docs_onnx_snippet_runs_as_written_without_torch(tiny_mirror, tmp_path, checkpoint):
    export(export_cfg(tiny_mirror, tmp_path, f"ckpt_path={checkpoint}", "format=onnx", "verify.num_images=16"))
    work = tmp_path / "user"
    work.mkdir()
    shutil.copy(tmp_path / "export" / "model.onnx", work / "model.onnx")
    # A dark T-shirt photographed on white, and a transparent cut-out: both need the conversion.
    shutil.copy(REPO / "docs" / "examples" / "tshirt_photo.jpg", work / "my_photo.jpg")
    shutil.copy(REPO / "docs" / "examples" / "sneaker_cutout.png", work / "my_other_photo.png")
    # torch cannot be imported in the process that runs the snippet.
    code = "import sys\nsys.modules['torch'] = None\n" + docs_onnx_snippet() + "\nnp.save('batch.npy', batch_uint8)\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    predicted = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    assert len(predicted) == 2 and set(predicted) <= set(CLASS_NAMES)
    batch = np.load(work / "batch.npy")
    assert batch.shape == (2, 1, 28, 28) and batch.dtype == np.uint8
    for image in batch[:, 0].astype(float):
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert border.mean() < 40 and image.max() > 150  # a light object on a dark background


def test_docs_colour_onnx_snippet_runs_without_torch_and_feeds_what_load_rgb_gives(
    tiny_mirror, tmp_path, colour_checkpoint, colour_data
):
    from fmnist_tl.data.images import load_rgb

    export(export_cfg(tiny_mirror, tmp_path, f"ckpt_path={colour_checkpoint}", "format=onnx"))
    work = tmp_path / "user"
    work.mkdir()
    shutil.copy(tmp_path / "export" / "model.onnx", work / "model.onnx")
    rng = np.random.default_rng(0)
    # Under twice the stored size: decoded in full, with or without JPEG draft mode, by both.
    Image.fromarray((rng.random((36, 70, 3)) * 255).astype(np.uint8)).save(work / "my_photo.jpg", quality=90)
    cutout = (rng.random((57, 31, 4)) * 255).astype(np.uint8)
    cutout[..., 3] = np.where(cutout[..., 3] > 128, 255, 0)
    Image.fromarray(cutout, "RGBA").save(work / "my_other_photo.png")
    snippet = docs_onnx_snippet("For a model trained on a folder of images the input is")
    code = "import sys\nsys.modules['torch'] = None\n" + snippet + "\nnp.save('batch.npy', batch_uint8)\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert set(ast.literal_eval(proc.stdout.strip().splitlines()[-1])) <= set(COLOUR_CLASSES)
    batch = np.load(work / "batch.npy")
    assert batch.shape == (2, SIZE, SIZE, 3) and batch.dtype == np.uint8
    for got, name in zip(batch, ("my_photo.jpg", "my_other_photo.png"), strict=True):
        want = load_rgb(work / name, SIZE).permute(1, 2, 0).numpy()
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # what predict feeds the model


def test_a_checkpoint_from_before_class_names_exports_as_before(tiny_mirror, tmp_path, checkpoint):
    ckpt = torch.load(checkpoint, weights_only=True)
    for key in ("class_names", "input_spec"):
        ckpt["hyper_parameters"].pop(key, None)
    torch.save(ckpt, tmp_path / "old.ckpt")
    record = export(export_cfg(tiny_mirror, tmp_path, f"ckpt_path={tmp_path / 'old.ckpt'}", "format=torchscript"))
    assert record["class_names"] == list(CLASS_NAMES) and record["verification"]["top1_agreement"] == 1.0
    assert record["input"] == "uint8 (N, 1, 28, 28), light object on a dark background"
    assert record["output"] == "logits (N, 10); softmax for probabilities"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(tmp_path / "export" / "model.torchscript.pt"))
    images = fresh_images(3)  # (N, 1, 28, 28), as before
    with torch.inference_mode():
        want = torch_logits(TransferClassifier.from_checkpoint(checkpoint), images)
        assert torch.allclose(scripted(images), want, atol=1e-5)
