"""Other int8 runtimes against ONNX Runtime's, side by side (docs/feature-cache.md, last paragraph).

    pip install torchao==0.18.0                  # for --pt2e (not a dependency of fmnist_tl)
    pip install openvino==2026.4.1 nncf==3.4.0   # for --openvino (not dependencies either)
    python -m bench.int8_runtimes --weights FILE --models DIR [--pt2e] [--openvino]

DIR holds the fp32 and int8 ONNX models fmnist_tl built for the same backbone (`<workdir>/cache/models`
after `python -m bench.int8_fidelity --workdir <workdir>`). Each runtime quantises the same network
(torch PT2E: torchao's X86InductorQuantizer on a strict torch.export graph, then inductor with freezing;
OpenVINO: nncf.quantize on the fp32 ONNX model) on training images; then cosine to fp32 on 128 other
training images, and img/s at batch 16 in alternating rounds with ONNX Runtime's int8 models.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from fmnist_tl.backbones import build_backbone  # noqa: E402
from fmnist_tl.data import ImagePreprocess  # noqa: E402
from fmnist_tl.features import UInt8Backbone, session  # noqa: E402

BATCH = 16


def train_images() -> torch.Tensor:
    raw = gzip.open("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").read()[16:]
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(-1, 1, 28, 28)


def batches(images: torch.Tensor) -> list[torch.Tensor]:
    return [images[i : i + BATCH] for i in range(0, len(images), BATCH)]


def rate(run: Any, images: torch.Tensor) -> float:
    run(images[:BATCH])
    start = time.perf_counter()
    for b in batches(images):
        run(b)
    return round(len(images) / (time.perf_counter() - start), 1)


def cosine(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    c = nn.functional.cosine_similarity(ref.double(), got.double(), dim=1)
    return round(float(c.mean()), 6), round(float(c.min()), 6)


def pt2e(model: nn.Module, calib: torch.Tensor) -> Any:
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    # strict=True: the default non-strict graph fails in X86InductorQuantizer.annotate with
    # "Input partition has more than one output node".
    graph = torch.export.export(model, (calib[:BATCH],), strict=True).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(graph, quantizer)
    for b in batches(calib):
        prepared(b)
    compiled = torch.compile(convert_pt2e(prepared))

    def run(b: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch._inductor.config.patch(freezing=True):
            return compiled(b).float()

    return run


def openvino(fp32_onnx: Path, calib: torch.Tensor) -> Any:
    import nncf
    import openvino as ov

    quantised = nncf.quantize(ov.convert_model(str(fp32_onnx)), nncf.Dataset([b.numpy() for b in batches(calib)]))
    compiled = ov.Core().compile_model(quantised, "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads()})
    return lambda b: torch.from_numpy(compiled(b.numpy())[0])


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.int8_runtimes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--pt2e", action="store_true")
    parser.add_argument("--openvino", action="store_true")
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    images = train_images()
    calib, held, timing = images[10000 : 10000 + args.calibration], images[20000:20128], images[30000:30064]
    net, _ = build_backbone("resnet50", None, str(args.weights))
    model = UInt8Backbone(net.eval(), ImagePreprocess(224)).eval()
    with torch.no_grad():
        ref = torch.cat([model(b) for b in batches(held)])
    onnx_files = sorted(args.models.glob("*.onnx"))
    runners: dict[str, Any] = {}
    for path in onnx_files:
        if "-fp32-" not in path.name:
            s = session(path)
            runners[f"onnxruntime {path.name.split('-224px-')[1].rsplit('-', 1)[0]}"] = lambda b, s=s: torch.from_numpy(
                s.run(None, {"images": b.numpy()})[0]
            )
    for name, wanted, build in (
        ("torch PT2E", args.pt2e, lambda: pt2e(model, calib)),
        ("OpenVINO", args.openvino, lambda: openvino(next(p for p in onnx_files if "-fp32-" in p.name), calib)),
    ):
        if wanted:
            start = time.perf_counter()
            runners[name] = build()
            runners[name](calib[:BATCH])  # compile / first run
            print(f"{name}: quantise + compile {time.perf_counter() - start:.0f} s", flush=True)
    for name, run in runners.items():
        print(f"{name}: cosine to fp32 mean / worst {cosine(ref, torch.cat([run(b) for b in batches(held)]))}")
    for r in range(args.rounds):
        print(f"round {r}: " + ", ".join(f"{n} {rate(run, timing)} img/s" for n, run in runners.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
