"""The demo page in a real browser: `python -m bench.demo_latency [--checkpoint CKPT] [--predictions 200]`.

Starts `python -m fmnist_tl.demo` (default: a random-init ResNet50 at 224 px, the project's default
model; speed does not depend on the weights) once per `--runtimes` (default: onnx, what the page's
`--runtime auto` picks where it runs faster, then torch, side by side in one run), opens it in
headless Chromium (Debian's /usr/bin/chromium through Playwright) and uploads real Fashion-MNIST
test images one after the other. For each it times the round trip as a user sees it: from handing the file to the page's
input to the top label shown. It samples the server's RSS (/proc) after the warm-up and every 50
predictions. Writes bench/results/<date>-demo.json with the CPU model, the cores and the load
average: the browser and the server share the cores, and so do other users of a shared machine.

The browser helpers here (CHROMIUM_ARGS, open_page, upload, shown_label) are also what
tests/commands/test_demo.py drives the page with.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gzip
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CHROMIUM = Path("/usr/bin/chromium")
# Headless, no sandbox (CI runs as root), and none of Chromium's own calls home: every request the
# browser makes is then one the page asked for.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FASHION_MNIST_TEST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def log(msg: str) -> None:
    print(f"[bench demo {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Driving the page (shared with the test)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(checkpoint: Path, *extra: str, timeout: float = 180.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """`python -m fmnist_tl.demo` on a free port, as a user starts it; yields (url, process)."""
    port = free_port()
    cmd = [sys.executable, "-m", "fmnist_tl.demo", "--checkpoint", str(checkpoint), "--port", str(port), *extra]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the demo exited {proc.returncode}: {proc.stderr.read().strip()}")
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the demo did not serve its page within {timeout:.0f} s") from None
                time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def open_page(url: str) -> Iterator[tuple[Any, list[str]]]:
    """The page in headless Chromium with a fresh profile; yields (page, every URL it requested)."""
    from playwright.sync_api import sync_playwright

    requests: list[str] = []
    with sync_playwright() as pw, tempfile.TemporaryDirectory(prefix="demo-chromium-") as profile:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            context.on("request", lambda request: requests.append(request.url))
            page = context.new_page()
            page.goto(url)
            page.wait_for_selector("#input-image input[type=file]", state="attached", timeout=60_000)
            yield page, requests
        finally:
            context.close()


SHOWS_A_RESULT = "!!document.querySelector('#label h2') || !!document.querySelector('#status')?.innerText.trim()"


def clear(page: Any) -> None:
    """Remove the input image and wait for the outputs to empty, so the next result is told from this one."""
    if page.evaluate(SHOWS_A_RESULT):
        # click() waits for the button: the input's preview may still be drawing when the result shows.
        page.locator("#input-image button[aria-label='Remove Image']").first.click(timeout=60_000)
    page.wait_for_function(f"!({SHOWS_A_RESULT})", timeout=60_000)


def upload(page: Any, path: Path) -> None:
    clear(page)
    page.set_input_files("#input-image input[type=file]", str(path))


def shown_label(page: Any) -> str:
    page.wait_for_selector("#label h2", timeout=60_000)
    return page.inner_text("#label h2").strip()


# ---------------------------------------------------------------------------------------------
# The measurement


def resnet50_checkpoint(folder: Path) -> Path:
    """A random-init ResNet50 at 224 px saved as train saves it (Lightning checkpoint, hyper-parameters)."""
    import lightning as L

    from fmnist_tl.training import TransferClassifier

    model = TransferClassifier(backbone="resnet50", weights=None, image_size=224)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    path = folder / "resnet50-224.ckpt"
    trainer.save_checkpoint(path)
    return path


def fashion_mnist_pngs(folder: Path, count: int) -> list[Path]:
    """The first `count` real Fashion-MNIST test images as PNG files, as a user would upload them."""
    import numpy as np
    from PIL import Image

    if not FASHION_MNIST_TEST.is_file():
        raise SystemExit(f"error: {FASHION_MNIST_TEST} is missing: apt-get install dataset-fashion-mnist")
    with gzip.open(FASHION_MNIST_TEST) as f:
        f.seek(16)
        pixels = np.frombuffer(f.read(count * 28 * 28), dtype=np.uint8).reshape(count, 28, 28)
    paths = []
    for i, image in enumerate(pixels):
        paths.append(folder / f"test_{i:03d}.png")
        Image.fromarray(image, "L").save(paths[-1])
    return paths


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def measure(
    checkpoint: Path, predictions: int, warmup: int, folder: Path, screenshot: Path | None = None, runtime: str = "auto"
) -> dict[str, Any]:
    images = fashion_mnist_pngs(folder, min(predictions, 100))
    with serve(checkpoint, "--runtime", runtime) as (url, proc), open_page(url) as (page, requests):
        for path in images[:warmup]:
            upload(page, path)
            shown_label(page)
        rss = {"after_warmup": round(rss_mb(proc.pid), 1)}
        log(f"{runtime}: warm; server RSS {rss['after_warmup']:.0f} MB; {predictions} predictions")
        round_trips, server_ms = [], []
        for i in range(predictions):
            clear(page)
            start = time.perf_counter()
            page.set_input_files("#input-image input[type=file]", str(images[i % len(images)]))
            shown_label(page)
            round_trips.append((time.perf_counter() - start) * 1000)
            server_ms.append(float(page.inner_text("#status").split()[0]))
            if (i + 1) % 50 == 0:
                rss[f"after_{i + 1}"] = now = round(rss_mb(proc.pid), 1)
                log(f"{i + 1}: median round trip {statistics.median(round_trips):.0f} ms, server RSS {now} MB")
        outside = [u for u in requests if not u.startswith("http://127.0.0.1:")]
        if screenshot:  # the first test image, once it and the model's view have been drawn
            upload(page, images[0])
            shown_label(page)
            page.wait_for_function(
                "[...document.querySelectorAll('#input-image img, #model-view img')]"
                ".filter(i => i.complete && i.naturalWidth > 0 && i.height > 50).length >= 2"
            )
            page.screenshot(path=str(screenshot), full_page=True)
    quantiles = statistics.quantiles(round_trips, n=10)
    return {
        "round_trip_ms": {
            "median": round(statistics.median(round_trips), 1),
            "p10": round(quantiles[0], 1),
            "p90": round(quantiles[-1], 1),
            "min": round(min(round_trips), 1),
            "max": round(max(round_trips), 1),
        },
        "server_ms_median": round(statistics.median(server_ms), 1),
        "rss_mb": rss,
        "rss_growth_mb": round(rss[f"after_{predictions - predictions % 50}"] - rss["after_warmup"], 1),
        "requests_outside_127_0_0_1": outside,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.demo_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="default: a random-init ResNet50 at 224 px")
    parser.add_argument("--predictions", type=int, default=200, help="sequential predictions timed (default 200)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--results-dir", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--screenshot", type=Path, help="save the page after the last prediction (docs/demo.png)")
    parser.add_argument(
        "--runtimes",
        nargs="+",
        choices=["onnx", "torch"],
        default=["onnx", "torch"],
        help="the demo's --runtime values to time, side by side; the first is held to the goals (default: onnx torch)",
    )
    args = parser.parse_args(argv)
    if args.predictions < 50:
        parser.error("--predictions must be >= 50 (RSS is sampled every 50)")

    import torch

    from fmnist_tl.core import atomic_write_json, cpu_model

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-demo-") as tmp:
        checkpoint = args.checkpoint or resnet50_checkpoint(Path(tmp))
        runs = {}
        for i, runtime in enumerate(args.runtimes):
            shot = args.screenshot if i == 0 else None
            runs[runtime] = measure(checkpoint, args.predictions, args.warmup, Path(tmp), shot, runtime)
    figures = runs[args.runtimes[0]]
    cores = len(os.sched_getaffinity(0))
    report = {
        "date": dt.date.today().isoformat(),
        "command": " ".join(["python -m bench.demo_latency", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {
            "cpu": cpu_model(),
            "cores": cores,
            "torch": torch.__version__,
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
        },
        "model": "given checkpoint" if args.checkpoint else "resnet50, random init, 224 px",
        "predictions": args.predictions,
        "runtime": args.runtimes[0],
        **figures,
        "side_by_side": {
            runtime: {
                "round_trip_ms_median": run["round_trip_ms"]["median"],
                "round_trip_ms_p90": run["round_trip_ms"]["p90"],
                "server_ms_median": run["server_ms_median"],
                "rss_mb_after_warmup": run["rss_mb"]["after_warmup"],
                "rss_growth_mb": run["rss_growth_mb"],
            }
            for runtime, run in runs.items()
        },
        # Not `targets`: that key marks a `python -m bench` file (the README's per-machine table).
        "goals": {
            "round_trip_ms_median_max": 300,
            "rss_growth_mb_max": 50,
            "round_trip_met": figures["round_trip_ms"]["median"] <= 300,
            "rss_met": figures["rss_growth_mb"] <= 50,
        },
        "notes": (
            "Round trip: from handing the PNG to the page's file input to the top label shown, in headless "
            "Chromium, one prediction at a time; server_ms is the page's own latency line (decode, "
            f"preprocessing, forward pass). The top-level figures are the demo's --runtime {args.runtimes[0]}; "
            "side_by_side has every runtime timed in this run, one after the other. Browser and server share "
            f"the {cores} cores; the load average says how busy the machine was besides."
        ),
    }
    path = args.results_dir / f"{report['date']}-demo.json"
    atomic_write_json(path, report)
    for runtime, run in report["side_by_side"].items():
        print(f"{runtime}: {run}")
    print(
        f"{args.runtimes[0]}: round trip median {figures['round_trip_ms']['median']} ms "
        f"(p90 {figures['round_trip_ms']['p90']}), "
        f"server {figures['server_ms_median']} ms, RSS growth {figures['rss_growth_mb']} MB over "
        f"{args.predictions} predictions; wrote {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
