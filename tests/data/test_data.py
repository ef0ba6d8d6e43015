from __future__ import annotations

import gzip

import pytest
import torch

from fmnist_tl.core.errors import FmnistError
from fmnist_tl.data.fashion_mnist import FashionMNISTDataModule, ImagePreprocess, augment_batch
from fmnist_tl.data.raw_files import IDX_FILES, parse_idx
from fmnist_tl.training.model import TransferClassifier
from tests.helpers import DEBIAN_MIRROR, TINY_SIZES, attached, idx_bytes, needs_real_data, tiny_split


def tiny_dm(mirror, tmp_path, **kw) -> FashionMNISTDataModule:
    args = dict(
        data_dir=str(tmp_path / "data"),
        mirror_dir=str(mirror),
        expected_sizes=TINY_SIZES,
        val_size=100,
        batch_size=16,
    )
    return FashionMNISTDataModule(**{**args, **kw})


def test_mirror_import_and_split(tiny_mirror, tmp_path):
    dm = tiny_dm(tiny_mirror, tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (300, 100, 100)
    # No temp files left in the data dir after an import.
    assert not list((tmp_path / "data").rglob("*.tmp"))
    # The split is seeded: same seed, same validation images; another seed, another split.
    again = tiny_dm(tiny_mirror, tmp_path)
    again.setup("fit")
    assert torch.equal(dm.data_val.tensors[0], again.data_val.tensors[0])
    other = tiny_dm(tiny_mirror, tmp_path, seed=7)
    other.setup("fit")
    assert not torch.equal(dm.data_val.tensors[1], other.data_val.tensors[1])


def test_batch_after_transfer_runs_the_models_preprocessing(tiny_mirror, tmp_path):
    """The datamodule moves uint8 28x28 batches; the image size and normalisation are the model's."""
    dm = tiny_dm(tiny_mirror, tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape == (16, 1, 28, 28)
    with pytest.raises(RuntimeError, match="attach a Trainer"):
        dm.on_after_batch_transfer((images, labels), 0)
    attached(dm, TransferClassifier(backbone="resnet18", weights=None, image_size=32))
    x, y = dm.on_after_batch_transfer((images, labels), 0)
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.int64
    # Grey replicated to 3 channels: un-normalising each channel gives the same image.
    assert torch.allclose(x[:, 0] * 0.229 + 0.485, x[:, 1] * 0.224 + 0.456, atol=1e-5)
    # Undo the normalisation: pixel values come back into [0, 1].
    raw = x[:, 0] * 0.229 + 0.485
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    # Another model, another preprocessing, from the same datamodule.
    attached(dm, TransferClassifier(backbone="resnet18", weights=None, image_size=64, mean=[0.5] * 3, std=[0.5] * 3))
    x, _ = dm.on_after_batch_transfer((images, labels), 0)
    assert x.shape == (16, 3, 64, 64) and x.min() >= -1 - 1e-5 and x.max() <= 1 + 1e-5 and x.min() < -0.9


def test_preprocess_resizes_to_configured_size():
    pre = ImagePreprocess(64)
    out = pre(torch.full((2, 1, 28, 28), 255, dtype=torch.uint8))
    assert out.shape == (2, 3, 64, 64)
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(out[0, :, 10, 10], expected, atol=1e-5)


def test_augment_keeps_shape_and_changes_some_images():
    torch.manual_seed(0)
    images, _ = tiny_split(32, 3)
    images = images.unsqueeze(1)
    out = augment_batch(images)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert not torch.equal(out, images)


def test_epoch_sampler_order_depends_on_epoch_only(tiny_mirror, tmp_path):
    dm = tiny_dm(tiny_mirror, tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    sampler = dm.train_dataloader().sampler
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(2)
    assert list(sampler) != first
    sampler.set_epoch(1)
    assert list(sampler) == first


def test_pin_memory_auto_pins_only_for_a_cuda_trainer(tiny_mirror, tmp_path):
    dm = tiny_dm(tiny_mirror, tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.train_dataloader().pin_memory is False  # no trainer: nothing to pin for

    class FakeTrainer:
        world_size = 1

        class strategy:  # noqa: N801
            root_device = torch.device("cuda", 0)

    dm.trainer = FakeTrainer()
    assert dm.train_dataloader().pin_memory is True
    with pytest.raises(FmnistError, match="data.pin_memory='yes' must be one of auto, true, false"):
        FashionMNISTDataModule(data_dir=str(tmp_path), pin_memory="yes")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b"\x00\x00\x08\x01" + b[4:], "wrong IDX magic"),
        (lambda b: b[:-5], "payload is"),
        (lambda b: b[:10], "too short"),
    ],
)
def test_parse_idx_rejects_bad_images(mutate, message):
    images, _ = tiny_split(20, 0)
    with pytest.raises(FmnistError, match=message):
        parse_idx(mutate(idx_bytes("images", images)), "f", "images", None)


def test_setup_without_files_says_what_is_missing(tmp_path):
    with pytest.raises(FmnistError, match="train-images-idx3-ubyte is missing"):
        FashionMNISTDataModule(data_dir=str(tmp_path)).setup("fit")


def test_parse_idx_rejects_wrong_dims_count_and_labels():
    with pytest.raises(FmnistError, match="expected 28x28"):
        parse_idx(idx_bytes("images", torch.zeros(3, 32, 32)), "f", "images", None)
    images, labels = tiny_split(20, 0)
    with pytest.raises(FmnistError, match="expected 60000"):
        parse_idx(idx_bytes("images", images), "f", "images", 60000)
    labels[3] = 10
    with pytest.raises(FmnistError, match="label 10 is out of range"):
        parse_idx(idx_bytes("labels", labels), "f", "labels", None)


def test_invalid_mirror_file_fails_without_writing(tiny_mirror, tmp_path):
    bad = tmp_path / "bad_mirror"
    bad.mkdir()
    for f in tiny_mirror.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 20))
    dm = tiny_dm(bad, tmp_path)
    with pytest.raises(FmnistError, match="train-labels-idx1-ubyte.gz: wrong IDX magic"):
        dm.prepare_data()
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    assert not (raw / "train-labels-idx1-ubyte").exists()
    assert not list(raw.glob(".*tmp"))


@needs_real_data
def test_real_data_from_debian_mirror(tmp_path):
    # download=False: the files can only have come from Debian's mirror, found without being named.
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "data"), mirror_dir=None, download=False)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.data_train), len(dm.data_val), len(dm.data_test)) == (55000, 5000, 10000)
    all_train = torch.cat([dm.data_train.tensors[1], dm.data_val.tensors[1]])
    assert torch.bincount(all_train).tolist() == [6000] * 10
    assert torch.bincount(dm.data_test.tensors[1]).tolist() == [1000] * 10
    pixels = torch.cat([dm.data_train.tensors[0], dm.data_val.tensors[0]]).float() / 255
    assert abs(pixels.mean().item() - 0.2860) < 5e-4 and abs(pixels.std().item() - 0.3530) < 5e-4
    for stem, _, _ in IDX_FILES:
        assert (dm.raw_dir / stem).read_bytes() == gzip.decompress((DEBIAN_MIRROR / f"{stem}.gz").read_bytes())
