"""The demo page: its prediction agrees with predict, bad uploads get their reason, and in a real
browser (Playwright driving Debian's Chromium) the page works offline, keeps serving and queues."""

from __future__ import annotations

import gzip
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from PIL import Image

from bench.demo_latency import CHROMIUM, clear, open_page, serve, shown_label, upload
from fmnist_tl.core import FmnistError
from fmnist_tl.data import BadImage
from fmnist_tl.demo import (
    Predictor,
    accuracy_line,
    build_page,
    choose_forward,
    example_files,
    main,
    report_markdown,
    run_dir_of,
)
from fmnist_tl.predict import predict
from fmnist_tl.runtime import OnnxClassifier
from tests.commands.test_predict import bad_files
from tests.helpers import DEBIAN_MIRROR, REPO

needs_chromium = pytest.mark.skipif(not CHROMIUM.is_file(), reason="Debian's chromium is absent (CI installs it)")


def fashion_mnist_test_image(folder: Path, index: int = 0) -> Path:
    """A real Fashion-MNIST test image as a PNG (the tiny fake data when Debian's set is absent)."""
    source = DEBIAN_MIRROR / "t10k-images-idx3-ubyte.gz"
    if source.is_file():
        with gzip.open(source) as f:
            f.seek(16 + index * 28 * 28)
            pixels = np.frombuffer(f.read(28 * 28), dtype=np.uint8).reshape(28, 28)
    else:
        from tests.helpers import tiny_split

        pixels = tiny_split(10, 1)[0][index].numpy()
    path = folder / f"fashion_mnist_test_{index}.png"
    Image.fromarray(pixels, "L").save(path)
    return path


# --- The command, without a browser ----------------------------------------------------------


def test_without_gradio_the_command_names_the_extra_and_exits_2(monkeypatch, capsys, tmp_path):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else find_spec(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "none.ckpt")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "pip install 'fmnist_tl[demo]'" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "missing.ckpt"], "--checkpoint missing.ckpt: no such file"),
        (["--checkpoint", "CKPT", "--top-k", "11"], "--top-k 11: must be between 1 and 10"),
        (["--checkpoint", "CKPT", "--port", "70000"], "--port 70000"),
        (["--checkpoint", "CKPT", "--max-upload-mb", "0"], "--max-upload-mb 0"),
    ],
)
def test_bad_arguments_are_one_error_line_and_exit_2(args, message, checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(checkpoint) if a == "CKPT" else a for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1


def test_the_page_predicts_what_predict_predicts_and_shows_the_models_input(model, tmp_path):
    predictor = Predictor(model, top_k=3)
    files = [*example_files(REPO / "docs" / "examples"), str(fashion_mnist_test_image(tmp_path))]
    for expected in predict(files, model=model, top_k=3):
        if not expected.ok:  # the truncated example
            with pytest.raises(BadImage, match="truncated"):
                predictor(expected.path)
            continue
        got = predictor(expected.path)
        assert list(got.top) == [name for name, _ in expected.top]
        assert list(got.top.values()) == pytest.approx([p for _, p in expected.top], abs=1e-6)
        size = model.preprocess.image_size
        assert got.seen.dtype == np.uint8 and got.seen.shape[2] == 3 and got.seen.shape[0] % size == 0
    # The view is the model's input: a Fashion-MNIST image is a light object on a black background.
    seen = predictor(fashion_mnist_test_image(tmp_path)).seen
    assert seen[0, 0].max() < 30 and seen.max() > 150


def test_onnx_runtime_predicts_what_predict_predicts(model, tmp_path):
    """The default CPU forward pass: the model exported to ONNX Runtime, checked at start."""
    examples = example_files(REPO / "docs" / "examples")
    forward, runs_on = choose_forward(model, torch.device("cpu"), "onnx", examples)
    assert isinstance(forward, OnnxClassifier) and runs_on.startswith("ONNX Runtime on CPU")
    predictor = Predictor(model, top_k=3, forward=forward)
    files = [*examples, *(str(fashion_mnist_test_image(tmp_path, i)) for i in range(8))]
    for expected in predict(files, model=model, top_k=3):
        if expected.ok:
            got = predictor(expected.path)
            assert list(got.top) == [name for name, _ in expected.top]
            assert list(got.top.values()) == pytest.approx([p for _, p in expected.top], abs=1e-4)


@pytest.mark.parametrize("onnx_faster", [True, False])
def test_auto_runs_whichever_runtime_is_faster_on_this_machine(model, monkeypatch, onnx_faster):
    import fmnist_tl.demo as demo

    real_forward_ms = demo.forward_ms
    measured = []

    def forward_ms(forward, images):
        measured.append(real_forward_ms(forward, images, repeats=1))
        return 1.0 if isinstance(forward, OnnxClassifier) == onnx_faster else 2.0

    monkeypatch.setattr(demo, "forward_ms", forward_ms)
    forward, runs_on = choose_forward(model, torch.device("cpu"), "auto", [])
    assert len(measured) == 2 and all(ms > 0 for ms in measured)
    if onnx_faster:
        assert isinstance(forward, OnnxClassifier)
        assert runs_on.startswith("ONNX Runtime on CPU (one image: ONNX Runtime 1 ms, PyTorch 2 ms, timed at start")
    else:
        assert forward is None
        assert runs_on == "PyTorch on cpu (one image: ONNX Runtime 2 ms, PyTorch 1 ms, timed at start)"


def test_onnx_logits_off_from_pytorchs_are_refused_and_auto_falls_back(model, monkeypatch, capsys):
    real_logits = OnnxClassifier.logits
    monkeypatch.setattr(OnnxClassifier, "logits", lambda self, images: real_logits(self, images) + 0.5)
    with pytest.raises(FmnistError, match="ONNX Runtime's logits differ from PyTorch's"):
        choose_forward(model, torch.device("cpu"), "onnx", [])
    forward, runs_on = choose_forward(model, torch.device("cpu"), "auto", [])
    assert forward is None and runs_on == "PyTorch on cpu"
    assert "warning: ONNX Runtime's logits differ" in capsys.readouterr().err


def test_onnx_runtime_on_a_gpu_is_refused_and_auto_keeps_pytorch_there(model):
    with pytest.raises(FmnistError, match="--runtime onnx runs on CPU"):
        choose_forward(model, torch.device("cuda"), "onnx", [])
    assert choose_forward(model, torch.device("cuda"), "auto", []) == (None, "PyTorch on cuda")
    assert choose_forward(model, torch.device("cpu"), "torch", []) == (None, "PyTorch on cpu")


def test_predictions_show_no_progress_overlay(model):
    """Its running timer redraws the page while the model computes, taking CPU from the prediction."""
    page = build_page(Predictor(model, top_k=3), "identity", None, [])
    events = [d for d in page.config["dependencies"] if d["targets"] and d["targets"][0][1] == "change"]
    assert len(events) == 2 and all(d["show_progress"] == "hidden" for d in events)


def test_every_bad_upload_gets_predicts_reason(model, tmp_path):
    predictor = Predictor(model, top_k=3)
    for kind, path in bad_files(tmp_path).items():
        with pytest.raises(BadImage, match=kind):
            predictor(path)


def test_the_identity_and_report_come_from_the_run_dir(trained_run, checkpoint, tmp_path):
    assert run_dir_of(checkpoint) == trained_run.resolve()
    acc = json.loads((trained_run / "metrics.json").read_text())["test/acc"]
    assert f"**{acc:.2%}**" in accuracy_line(checkpoint, trained_run)
    last = trained_run / "checkpoints" / "last.ckpt"
    assert "best checkpoint" in accuracy_line(last, trained_run)
    text, plots = report_markdown(trained_run)
    assert text.startswith("# Evaluation report") and "![" not in text
    assert [p.name for p, _ in plots] == ["confusion_matrix.png", "mistakes.png", "curves.png"]
    text, plots = report_markdown(run_dir_of(tmp_path / "loose.ckpt"))
    assert "No evaluation report" in text and "fmnist_tl.evaluate" in text and plots == []
    assert "not known" in accuracy_line(tmp_path / "loose.ckpt", None)


def test_every_prediction_runs_on_the_one_prediction_thread(model, tmp_path, monkeypatch):
    """Gradio calls from a pool of threads; torch on each new one would grow the server's RSS."""
    import fmnist_tl.demo as demo

    seen_on = set()

    def classify(*args):
        seen_on.add(threading.get_ident())
        return demo_classify(*args)

    demo_classify = demo.classify
    monkeypatch.setattr(demo, "classify", classify)
    predictor = Predictor(model, top_k=3)
    image = fashion_mnist_test_image(tmp_path)
    callers = [threading.Thread(target=predictor, args=(image,)) for _ in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert len(seen_on) == 1 and threading.get_ident() not in seen_on


def test_top_k_beyond_the_models_classes_is_refused(model):
    with pytest.raises(FmnistError, match="--top-k 0"):
        Predictor(model, top_k=0)


# --- In a real browser -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(checkpoint) -> Iterator[SimpleNamespace]:
    """The demo as a user starts it, on a free port, with a 1 MB upload limit."""
    with serve(checkpoint, "--max-upload-mb", "1") as (url, proc):
        yield SimpleNamespace(url=url, proc=proc)


@pytest.fixture
def browser(server) -> Iterator[SimpleNamespace]:
    """A fresh headless Chromium profile on the page; `requests` collects every URL it asked for."""
    with open_page(server.url) as (page, requests):
        yield SimpleNamespace(page=page, requests=requests)


def shown_error(page) -> str:
    page.wait_for_function("document.querySelector('#status')?.innerText.includes('error')", timeout=60_000)
    return page.inner_text("#status")


@pytest.mark.slow
@needs_chromium
def test_in_a_browser_the_page_predicts_refuses_bad_files_and_stays_offline(browser, model, tmp_path):
    page = browser.page
    identity = page.inner_text("#identity")
    assert "resnet18" in identity and "32 px" in identity and "Ankle boot" in identity and "test accuracy" in identity

    image = fashion_mnist_test_image(tmp_path)
    expected = predict([image], model=model, top_k=3)[0]
    start = time.perf_counter()
    upload(page, image)
    assert shown_label(page) == expected.label
    print(f"round trip (upload to label shown, tiny model): {(time.perf_counter() - start) * 1000:.0f} ms")
    assert page.locator("#model-view img").count() == 1
    assert " ms " in page.inner_text("#status")

    for kind, bad in bad_files(tmp_path / "bad").items():
        upload(page, bad)
        message = shown_error(page)
        assert bad.name in message and kind in message, message
        assert page.locator("#label h2").count() == 0
    # The page and the server are still working.
    upload(page, image)
    assert shown_label(page) == expected.label

    # An example from docs/examples/ runs through the same path.
    clear(page)
    page.get_by_text("Examples (docs/examples/)").locator("..").locator("button, img").first.click()
    assert shown_label(page) in model.class_names

    page.get_by_role("tab", name="Run report").click()
    page.wait_for_selector("#report h1", timeout=60_000)
    assert "Evaluation report" in page.inner_text("#report")
    page.get_by_role("tab", name="Try it").click()

    page.screenshot(path=os.environ.get("DEMO_SCREENSHOT", str(tmp_path / "demo.png")), full_page=True)
    outside = [url for url in browser.requests if urlsplit(url).hostname != "127.0.0.1"]
    assert not outside, outside


def gradio_client_predict(url: str, path: Path) -> tuple:
    from gradio_client import Client, handle_file

    return Client(url, verbose=False, download_files=False).predict(handle_file(str(path)), "auto", api_name="/predict")


@pytest.mark.slow
@needs_chromium
def test_requests_at_once_are_queued_and_uploads_over_the_limit_are_refused(server, model, tmp_path):
    image = fashion_mnist_test_image(tmp_path)
    expected = predict([image], model=model, top_k=1)[0].label
    results: list = []

    def ask() -> None:
        results.append(gradio_client_predict(server.url, image))

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 6 and all(label["label"] == expected for label, _, _ in results)

    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + os.urandom(2 * 1024 * 1024))
    boundary = "demo-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + big.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    request = urllib.request.Request(server.url + "gradio_api/upload", data=body, headers=headers)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413
    assert server.proc.poll() is None
