"""Export a checkpoint for serving: `python -m fmnist_tl.export ckpt_path=<ckpt> format=onnx|torchscript`.

The exported model maps uint8 images as a user holds them, N dynamic, to logits (N, classes): for a
Fashion-MNIST checkpoint (N, 1, 28, 28), as the IDX files hold them; for a checkpoint trained on a
folder of images (N, H, W, 3) RGB at its stored size, as numpy holds a decoded photo. The model's own
preprocessing is inside the graph; the class names are in the file's metadata. Before the file is moved into place it
is run on real test images and compared with the PyTorch model; any top-1 difference fails the
export, writing nothing. model.safetensors and export.json go beside it (docs/evaluation.md).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig
from safetensors.torch import save as safetensors_bytes

from fmnist_tl.config import CONFIG_PATH, ODD_BATCH, check_config
from fmnist_tl.core import FmnistError, atomic_path, atomic_write_bytes, atomic_write_json, require_modules, sha256_file
from fmnist_tl.features import export_onnx
from fmnist_tl.runtime import UInt8Classifier, build, channels_last_input, export_layout, run_hydra_cli, task_wrapper
from fmnist_tl.training import TransferClassifier

log = logging.getLogger(__name__)

FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}


def input_description(model: TransferClassifier) -> str:
    spec = model.input_spec
    if not channels_last_input(model):
        return f"uint8 (N, {spec['channels']}, {spec['height']}, {spec['width']}), light object on a dark background"
    return (
        f"uint8 (N, {spec['height']}, {spec['width']}, {spec['channels']}) RGB: the shorter side resized to "
        f"{spec['height']}, then the centre cropped (fmnist_tl.data.load_rgb)"
    )


def reference_logits(model: TransferClassifier, images: torch.Tensor) -> torch.Tensor:
    """What the PyTorch model itself computes (the path used in training and test), float32 on CPU."""
    with torch.inference_mode():
        return model(model.preprocess(images)).float()


def compare(name: str, reference: torch.Tensor, exported: torch.Tensor) -> dict[str, Any]:
    agree = int((reference.argmax(-1) == exported.argmax(-1)).sum())
    return {
        "runtime": name,
        "num_images": len(reference),
        "max_abs_logit_diff": float((reference - exported).abs().max()),
        "top1_agreement": agree / len(reference),
        "top1_agreeing": agree,
    }


def run_onnx(path: Path, images: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])


def export_torchscript(module: UInt8Classifier, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
        torch.jit.script(module).save(str(path))


def run_torchscript(path: Path, images: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
        scripted = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return scripted(images).float()


def verify(fmt: str, path: Path, model: TransferClassifier, images: torch.Tensor) -> dict[str, Any]:
    """Exported file vs PyTorch on real images (the datamodule's uint8 (N, C, H, W)); raises FmnistError when
    any top-1 prediction differs."""
    runner = run_onnx if fmt == "onnx" else run_torchscript
    reference = reference_logits(model, images)
    given = export_layout(model, images)
    result = compare("onnxruntime" if fmt == "onnx" else "torch.jit", reference, runner(path, given))
    odd = compare(result["runtime"], reference[:ODD_BATCH], runner(path, given[:ODD_BATCH]))
    result["dynamic_batch_checked"] = [len(images), odd["num_images"]]
    result["odd_batch_max_abs_logit_diff"] = odd["max_abs_logit_diff"]
    print(
        f"verified {fmt} with {result['runtime']} on {result['num_images']} test images: "
        f"max |logit diff| {result['max_abs_logit_diff']:.3g}, top-1 agreement {result['top1_agreement']:.2%} "
        f"({result['top1_agreeing']}/{result['num_images']}); batch of {odd['num_images']}: "
        f"max |logit diff| {result['odd_batch_max_abs_logit_diff']:.3g}",
        flush=True,
    )
    if result["top1_agreeing"] < result["num_images"] or odd["top1_agreeing"] < odd["num_images"]:
        raise FmnistError(
            f"export verification failed: top-1 agreement {result['top1_agreement']:.2%} with PyTorch on "
            f"{result['num_images']} images and {odd['top1_agreeing']}/{odd['num_images']} in a batch of "
            f"{odd['num_images']} (max |logit diff| {result['max_abs_logit_diff']:.3g}); nothing written"
        )
    return result


def save_safetensors(model: TransferClassifier, path: Path, metadata: dict[str, Any]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata={k: json.dumps(v) for k, v in metadata.items()}))


def load_test_images(cfg: DictConfig, model: TransferClassifier, count: int) -> torch.Tensor:
    """The first `count` uint8 test images of cfg.data, once it is checked to be the data the model was trained on."""
    datamodule = build(cfg.data)
    datamodule.follow(model)
    datamodule.prepare_data()
    datamodule.setup("test")
    model.check_data(datamodule)
    batches, held = [], 0
    for images, _ in datamodule.test_dataloader():
        batches.append(images[: count - held])
        held += len(batches[-1])
        if held >= count:
            break
    images = torch.cat(batches) if batches else torch.empty(0)
    if len(images) < ODD_BATCH:
        raise FmnistError(f"verify.num_images: the test split holds only {len(images)} images")
    return images


def _check_config(cfg: DictConfig) -> str:
    check_config(cfg)
    if not cfg.get("ckpt_path"):
        raise FmnistError("ckpt_path is required: python -m fmnist_tl.export ckpt_path=PATH/TO/checkpoint.ckpt")
    if cfg.format == "onnx":  # torch.onnx's exporter needs onnxscript (and onnx); onnxruntime verifies
        require_modules("format=onnx", "export", "onnx", "onnxscript", "onnxruntime")
    return str(cfg.ckpt_path)


def export(cfg: DictConfig) -> dict[str, Any]:
    """Export, verify, then move the files into place; returns what export.json records."""
    ckpt = _check_config(cfg)
    model = TransferClassifier.from_checkpoint(ckpt).float()
    images = load_test_images(cfg, model, cfg.verify.num_images)
    output_dir = Path(cfg.paths.output_dir)
    module = UInt8Classifier(model).eval()
    metadata = {
        "class_names": list(model.class_names),
        "input": input_description(model),
        "input_spec": model.input_spec,
        "output": f"logits (N, {len(model.class_names)}); softmax for probabilities",
        "hyper_parameters": dict(model.hparams),
        "weights_id": model.weights_id,
        "checkpoint": ckpt,
    }
    target = output_dir / FILE_NAMES[cfg.format]
    with atomic_path(target) as tmp:
        if cfg.format == "onnx":
            export_onnx(
                module, export_layout(model, images[:ODD_BATCH]), tmp, metadata, opset=cfg.opset, what="format=onnx"
            )
        else:
            export_torchscript(module, tmp)
        check = verify(cfg.format, tmp, model, images)  # raising here leaves no file behind
    safetensors_path = output_dir / "model.safetensors"
    save_safetensors(model, safetensors_path, metadata)
    record = {
        "format": cfg.format,
        "model": str(target),
        "model_sha256": sha256_file(target),
        "safetensors": str(safetensors_path),
        "safetensors_sha256": sha256_file(safetensors_path),
        "opset": cfg.opset if cfg.format == "onnx" else None,
        "torch": torch.__version__,
        "verification": check,
        **metadata,
    }
    atomic_write_json(output_dir / "export.json", record)
    print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB), {safetensors_path} and {output_dir / 'export.json'}")
    return record


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def main(cfg: DictConfig) -> None:
    with task_wrapper(hydra_run=True):
        export(cfg)


if __name__ == "__main__":
    run_hydra_cli(main, "export")
