"""Try a trained checkpoint in a web page: drop an image, see the top classes (docs/evaluation.md).

    python -m fmnist_tl.demo --checkpoint CKPT [--host 127.0.0.1] [--port 7860] [--top-k 3]

A Gradio page (`pip install 'fmnist_tl[demo]'`): an image in (upload, drag and drop, paste, or one
of docs/examples/), the top-k classes as `gr.Label` bars, the image as the model sees it, the
latency, the checkpoint's identity, and a second tab with the run's evaluation report. The model is
loaded once; each image goes through predict's code path (`load_image`, then `classify`, which runs
the model's own preprocessing), so the page and `python -m fmnist_tl.predict` agree.

Offline and safe by default: it binds 127.0.0.1, makes no share link, sends no analytics, loads no
external font or script, limits upload size, and queues requests (one prediction at a time).
A file that is not a readable image gets its reason in the page; the server keeps serving.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmnist_tl.core import FmnistError, require_modules, sha256_file
from fmnist_tl.data import BadImage, expand_inputs
from fmnist_tl.predict import classify, image_loader, load_model, resolve_device
from fmnist_tl.runtime import OnnxClassifier, task_wrapper
from fmnist_tl.training import TransferClassifier

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "docs" / "examples"
REPORT_PLOTS = (
    ("confusion_matrix.png", "Confusion matrix (rows: true class)"),
    ("mistakes.png", "Most confident mistakes"),
    ("curves.png", "Training curves"),
)
# Images are small (28 px uploads, a 32 px model input): fill the panel and show their pixels
# instead of a thumbnail, or a blur when scaled up.
CSS = """
#input-image img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }
#model-view img { image-rendering: pixelated; }
"""
# The model's view is enlarged by a whole factor to at least this many pixels a side, for the eye.
VIEW_SIDE = 224


@dataclass
class Result:
    """One prediction for the page: top-k (name -> probability), the model's input as RGB, the time."""

    top: dict[str, float]
    seen: np.ndarray
    seconds: float


class Predictor:
    """The model, loaded once, and what one uploaded file turns into.

    `forward` maps uint8 images to probabilities: predict's `classify` with the model, or the same
    function run by ONNX Runtime (`OnnxClassifier`). Every prediction runs on one thread of its own:
    Gradio runs events on a pool of up to 40 threads, and each thread that runs torch gets its own
    malloc arena and caches, so the server's RSS would grow with every new thread the pool hands a
    request to.
    """

    def __init__(
        self, model: TransferClassifier, top_k: int, forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> None:
        self.model = model
        self.forward = forward or (lambda images: classify(model, images))
        self.names = model.class_names
        if not 1 <= top_k <= len(self.names):
            raise FmnistError(f"--top-k {top_k}: must be between 1 and {len(self.names)} (the model's classes)")
        self.top_k = top_k
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fmnist-demo-predict")
        # The first forward pass sets up the kernels; do it before the first visitor waits for it.
        spec = model.input_spec
        blank = torch.zeros(1, spec["channels"], spec["height"], spec["width"], dtype=torch.uint8)
        self._thread.submit(self.forward, blank).result()

    def __call__(self, path: str | os.PathLike, invert: str = "auto") -> Result:
        """Raises BadImage (the reason to show) for a file that is not a readable image."""
        return self._thread.submit(self._predict, path, invert).result()

    @torch.inference_mode()
    def _predict(self, path: str | os.PathLike, invert: str) -> Result:
        start = time.perf_counter()
        images = image_loader(self.model, invert)(path)[None]
        probs = self.forward(images)[0]
        seconds = time.perf_counter() - start
        values, indices = probs.topk(self.top_k)
        top = {self.names[i]: v for i, v in zip(indices.tolist(), values.tolist(), strict=True)}
        return Result(top, self.model_view(images), seconds)

    def model_view(self, images: torch.Tensor) -> np.ndarray:
        """The model's preprocessed input (its size, its 3 channels), normalisation undone for display."""
        pre = self.model.preprocess
        x = pre(images.to(pre.mean.device))[0].float() * pre.std[0] + pre.mean[0]
        view = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        factor = -(-VIEW_SIDE // pre.image_size)
        return view.repeat(factor, axis=0).repeat(factor, axis=1)


# ---------------------------------------------------------------------------------------------
# What the page says about the checkpoint and its run


def run_dir_of(checkpoint: Path) -> Path | None:
    """The training run a checkpoint belongs to: `<run>/checkpoints/<name>.ckpt`."""
    checkpoint = checkpoint.resolve()
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else None


def accuracy_line(checkpoint: Path, run_dir: Path | None) -> str:
    metrics_file = run_dir / "metrics.json" if run_dir else None
    if metrics_file is None or not metrics_file.is_file():
        return "test accuracy: not known (no metrics.json in the checkpoint's run dir)"
    try:
        metrics = json.loads(metrics_file.read_text())
        acc = float(metrics["test/acc"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"test accuracy: not recorded in {metrics_file}"
    best = Path(metrics.get("best_model_path") or "")
    if best.name and best.resolve() != checkpoint.resolve():
        return f"test accuracy of the run's best checkpoint ({best.name}, not this one): **{acc:.2%}**"
    return f"test accuracy: **{acc:.2%}** (metrics.json)"


def identity_markdown(model: TransferClassifier, checkpoint: Path, runs_on: str) -> str:
    hp = model.hparams
    run_dir = run_dir_of(checkpoint)
    names = model.class_names
    return "\n".join(
        "- " + line
        for line in [
            f"**Checkpoint** `{checkpoint.name}` · sha256 `{sha256_file(checkpoint)[:12]}`"
            + (f" · run `{run_dir}`" if run_dir else ""),
            f"**Backbone** {hp.backbone} ({model.weights_id}) · **image size** {model.preprocess.image_size} px"
            f" · {runs_on}",
            f"**{len(names)} classes:** {', '.join(names)}",
            accuracy_line(checkpoint, run_dir),
        ]
    )


def report_markdown(run_dir: Path | None) -> tuple[str, list[tuple[Path, str]]]:
    """The run's report.md without its image links (the plots are shown as images), and the plots."""
    report = run_dir / "report.md" if run_dir else None
    if report is None or not report.is_file():
        where = f"in {run_dir}" if run_dir else "beside this checkpoint (it is not in a run's checkpoints/ folder)"
        return (
            f"No evaluation report {where}. `train` writes one when it tests (`test=true`); for any "
            "checkpoint: `python -m fmnist_tl.evaluate ckpt_path=CKPT`.",
            [],
        )
    text = re.sub(r"^!\[[^\]]*\]\([^)]*\)\s*$", "", report.read_text(), flags=re.MULTILINE)
    plots = [(run_dir / name, caption) for name, caption in REPORT_PLOTS if (run_dir / name).is_file()]
    return text, plots


def example_files(folder: Path) -> list[str]:
    """The image files in docs/examples/ (a clone or an editable install has them; a wheel does not)."""
    return [path for path, error in expand_inputs([folder]) if error is None] if folder.is_dir() else []


# ---------------------------------------------------------------------------------------------
# The page


def build_page(predictor: Predictor, identity: str, run_dir: Path | None, examples: Sequence[str]) -> Any:
    """The Gradio Blocks: a "Try it" tab and a "Run report" tab."""
    import gradio as gr

    def on_image(upload: dict | None, invert: str) -> tuple[Any, Any, str]:
        # The events run with preprocess=False: the uploaded file (checked to lie in Gradio's upload
        # cache) comes untouched, and load_image alone decodes it, header checks included, so a bad
        # file gets predict's reason instead of an error from Gradio's own decoding.
        path = (upload or {}).get("path")
        if not path:
            return None, None, ""
        try:
            result = predictor(path, invert)
        except BadImage as e:
            return None, None, f"**error:** `{Path(path).name}`: {e}. Try another image file."
        return result.top, result.seen, f"{result.seconds * 1000:.0f} ms (decode, preprocessing, forward pass)"

    with gr.Blocks(analytics_enabled=False, title="fmnist_tl demo", delete_cache=(600, 3600)) as page:
        gr.Markdown("## fmnist_tl: try the model\n" + identity, elem_id="identity")
        with gr.Tab("Try it"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(
                        type="filepath",
                        sources=["upload", "clipboard"],
                        label="Image: drop, upload or paste",
                        elem_id="input-image",
                        height=320,
                    )
                    invert = gr.Radio(
                        ["auto", "yes", "no"],
                        value="auto",
                        # Only Fashion-MNIST models fit an image to light-on-dark; folder models take it as it is.
                        visible=predictor.model.input_spec["kind"] == "fashion_mnist",
                        label="Invert to a light object on dark (auto: when the border is light), as predict --invert",
                    )
                with gr.Column():
                    label = gr.Label(num_top_classes=predictor.top_k, label="Top classes", elem_id="label")
                    status = gr.Markdown(elem_id="status")
                    seen = gr.Image(
                        label="What the model sees (after predict's preprocessing)",
                        format="png",
                        interactive=False,
                        elem_id="model-view",
                        height=224,
                    )
            if examples:
                gr.Examples(examples=[[path] for path in examples], inputs=[image], label="Examples (docs/examples/)")
            inputs, outputs = [image, invert], [label, seen, status]
            # No progress overlay: its running timer redraws the page while the model computes, and
            # the browser then takes CPU time from the prediction it is waiting for.
            events = {"concurrency_limit": 1, "preprocess": False, "show_progress": "hidden"}
            image.change(on_image, inputs, outputs, api_name="predict", **events)
            invert.change(on_image, inputs, outputs, api_name=False, **events)
        with gr.Tab("Run report"):
            text, plots = report_markdown(run_dir)
            gr.Markdown(text, elem_id="report")
            for path, caption in plots:
                gr.Image(str(path), label=caption, interactive=False, format="png")
    return page


def launch(page: Any, host: str, port: int, max_upload_mb: float) -> None:
    import gradio as gr

    # Requests wait their turn (one prediction at a time, each on all cores) instead of being dropped.
    page.queue(max_size=64)
    try:
        page.launch(
            server_name=host,
            server_port=port,
            share=False,
            max_file_size=int(max_upload_mb * 1024 * 1024),
            # Gradio 6's default theme serves its own font files (LocalFont); a GoogleFont theme would
            # fetch from Google. The browser test fails on any request that leaves 127.0.0.1.
            theme=gr.themes.Default(),
            css=CSS,
            ssr_mode=False,
            pwa=False,
            mcp_server=False,
            footer_links=[],
            # Gradio's run history keeps uploads in the browser and offers to save runs to a Hugging Face bucket.
            run_history=False,
            show_error=True,
            quiet=True,
            prevent_thread_lock=True,
        )
    except OSError as e:
        raise FmnistError(f"cannot serve on {host}:{port} ({e}); pick another with --port") from e
    print(f"fmnist_tl demo: http://{host}:{page.server_port}  (Ctrl-C stops it)", flush=True)
    try:
        page.block_thread()
    finally:
        page.close()


# ---------------------------------------------------------------------------------------------
# Command line


def forward_ms(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, repeats: int = 5) -> float:
    """Median milliseconds of one forward pass over `images`, after one untimed pass."""
    forward(images)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward(images)
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1000


def choose_forward(
    model: TransferClassifier, device: torch.device, runtime: str, examples: Sequence[str]
) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, str]:
    """(forward for Predictor, what the page says runs it). `onnx`: ONNX Runtime on CPU, checked
    against PyTorch on the examples and a few random images. `auto` on CPU: that, if it checks out
    and one image at a time runs faster in it than in PyTorch on this machine (CPUs differ, so it
    is timed here); else PyTorch, as on a GPU and with `torch`."""
    if runtime == "onnx" and device.type != "cpu":
        raise FmnistError(f"--runtime onnx runs on CPU; drop --device {device} or use --runtime torch")
    if runtime == "torch" or device.type != "cpu":
        return None, f"PyTorch on {device}"
    load = image_loader(model)
    spec = model.input_spec
    generator = torch.Generator().manual_seed(0)
    shape = (4, spec["channels"], spec["height"], spec["width"])
    images = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)]
    for path in examples[:16]:
        with contextlib.suppress(BadImage):
            images.append(load(path)[None])
    print("fmnist_tl demo: exporting the model to ONNX Runtime (--runtime torch skips this)", flush=True)
    try:
        forward = OnnxClassifier(model, torch.cat(images))
    except FmnistError as e:
        if runtime == "onnx":
            raise
        print(f"warning: {e}; PyTorch runs the model", file=sys.stderr)
        return None, f"PyTorch on {device}"
    checked = f"max logit difference from PyTorch {forward.max_abs_logit_diff:.1g}"
    if runtime == "onnx":
        return forward, f"ONNX Runtime on CPU ({checked})"
    one = images[0][:1]
    onnx_ms, torch_ms = forward_ms(forward, one), forward_ms(lambda x: classify(model, x), one)
    timed = f"one image: ONNX Runtime {onnx_ms:.0f} ms, PyTorch {torch_ms:.0f} ms, timed at start"
    if onnx_ms <= torch_ms:
        return forward, f"ONNX Runtime on CPU ({timed}; {checked})"
    return None, f"PyTorch on {device} ({timed})"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fmnist_tl.demo", description="A web page to try a fmnist_tl checkpoint on your images."
    )
    parser.add_argument("--checkpoint", "-c", required=True, help="a .ckpt written by fmnist_tl.train")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    parser.add_argument("--top-k", type=int, default=3, help="how many classes to show (default 3)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument(
        "--runtime",
        choices=["auto", "onnx", "torch"],
        default="auto",
        help="what runs the model: onnx (ONNX Runtime, CPU; exported and checked against PyTorch at start), "
        "torch, or auto (default: on CPU, whichever runs one image faster here, timed at start; torch on a GPU)",
    )
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload accepted (default 20 MB)")
    parser.add_argument(
        "--examples", type=Path, default=EXAMPLES_DIR, help="folder of example images (default docs/examples/)"
    )
    return parser.parse_args(argv)


def run(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    require_modules("python -m fmnist_tl.demo", "demo", "gradio")
    # Gradio reads this on import; analytics_enabled=False covers the page, this covers the rest.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if not 1 <= args.port <= 65535:
        raise FmnistError(f"--port {args.port}: must be between 1 and 65535")
    if args.max_upload_mb <= 0:
        raise FmnistError(f"--max-upload-mb {args.max_upload_mb}: must be > 0")
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise FmnistError(f"--checkpoint {checkpoint}: no such file; pass a .ckpt written by fmnist_tl.train")
    device = resolve_device(args.device)
    model = load_model(checkpoint, device)
    examples = example_files(args.examples)
    forward, runs_on = choose_forward(model, device, args.runtime, examples)
    predictor = Predictor(model, args.top_k, forward)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {args.host}: the page is reachable from other machines", file=sys.stderr)
    page = build_page(predictor, identity_markdown(model, checkpoint, runs_on), run_dir_of(checkpoint), examples)
    launch(page, args.host, args.port, args.max_upload_mb)


def main(argv: Sequence[str] | None = None) -> None:
    with task_wrapper():
        run(argv)


if __name__ == "__main__":
    main()
