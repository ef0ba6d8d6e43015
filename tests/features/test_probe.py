"""Extraction chosen by measurement (fmnist_tl/features/probe.py) and int8 through ONNX Runtime (onnx_backend.py).

Timings are injected (never asserted); the int8 tests run the real quantiser on a tiny ResNet18 at 32 px.
"""

from __future__ import annotations

import json
import logging
import re
import time

import numpy as np
import pytest
import torch

from fmnist_tl.backbones.weights import build_backbone
from fmnist_tl.config.schemas import FeaturesConfig
from fmnist_tl.core import machine
from fmnist_tl.core.errors import FmnistError
from fmnist_tl.core.files import module_sha256
from fmnist_tl.data.fashion_mnist import ImagePreprocess
from fmnist_tl.features import onnx_backend, probe, ranking
from fmnist_tl.features.candidates import Candidate, candidates, split_samples, time_runner
from fmnist_tl.features.extraction import FeatureExtractor, extraction_settings, split_entry
from fmnist_tl.features.manifest import fingerprint_key
from fmnist_tl.features.probe import Planner
from fmnist_tl.runtime.build import build
from fmnist_tl.train import train
from fmnist_tl.training.precision import resolve_precision
from tests.helpers import attached, make_cfg, run_cli, tiny_overrides, tiny_split

RATES = {
    "torch:32": 10.0,
    "torch:bf16": 4.0,
    "torch:16": 2.0,
    "onnxruntime:32": 15.0,
    "onnxruntime:int8": 60.0,
    "onnxruntime:int8-r7": 40.0,
}


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_backbone("resnet18", None, None)[0].eval().requires_grad_(False)


@pytest.fixture(scope="module")
def train_images():
    return tiny_split(400, seed=5)[0].unsqueeze(1)


def planner(tmp_path, net, train_images, timer=None, quantiser=None, **settings) -> Planner:
    return Planner(
        root=tmp_path / "features",
        settings=FeaturesConfig(calibration_images=64, gate_images=32, progress=False, **settings),
        device=torch.device("cpu"),
        backbone=net,
        backbone_name="resnet18",
        preprocess=ImagePreprocess(32),
        weights_sha256=module_sha256(net),
        train_images=train_images,
        timer=timer,
        quantiser=quantiser,
    )


def faithful(planner_ref: list[Planner]):
    """An injected int8 'quantiser' that returns the fp32 features plus a little noise: passes the gate."""

    def run(c: Candidate, images: torch.Tensor) -> torch.Tensor:
        ref = planner_ref[0].runners.features(Candidate("torch", "32"), images)
        return ref + 1e-3 * ref.std() * torch.randn(ref.shape, generator=torch.Generator().manual_seed(0))

    return run


def broken(c: Candidate, images: torch.Tensor) -> torch.Tensor:
    """A saturating quantiser: features unrelated to the fp32 ones."""
    return torch.rand((len(images), 512), generator=torch.Generator().manual_seed(1))


def recording_timer(rates: dict[str, float], calls: list[str]):
    def timer(c: Candidate) -> float:
        calls.append(c.id)
        return rates[c.id]

    return timer


def choose(tmp_path, net, train_images, rates, quantiser=None, backend="auto", precision="auto", calls=None):
    calls = [] if calls is None else calls
    ref: list[Planner] = []
    p = planner(tmp_path, net, train_images, recording_timer(rates, calls), quantiser or faithful(ref))
    ref.append(p)
    return p.choose(backend, precision), calls


# --------------------------------------------------------------------------------------------
# The choice


def test_probe_picks_the_fastest_measured_candidate(tmp_path, net, train_images, caplog):
    with caplog.at_level(logging.INFO, logger="fmnist_tl.features.probe"):
        plan, calls = choose(tmp_path, net, train_images, RATES)
    assert plan.candidate.id == "onnxruntime:int8"
    assert sorted(calls) == sorted(RATES)  # every candidate timed once
    assert plan.gates["onnxruntime:int8"]["passed"] and plan.gates["onnxruntime:int8"]["mean_cosine"] > 0.999
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Extraction:")]
    assert len(lines) == 1
    assert lines[0].startswith("Extraction: onnxruntime:int8 (fastest measured; cosine to fp32 mean")
    assert (
        "probe img/s: onnxruntime:int8 60.0, onnxruntime:int8-r7 40.0, onnxruntime:32 15.0, torch:32 10.0" in lines[0]
    )
    # Other timings, other choice: fp32 torch needs no gate.
    slow_int8 = {**RATES, "torch:32": 100.0}
    plan, _ = choose(tmp_path / "other", net, train_images, slow_int8)
    assert plan.candidate.id == "torch:32" and plan.gates == {}
    assert isinstance(plan.extractor, FeatureExtractor) and plan.extractor.precision == "32"


def test_probe_is_cached_and_a_version_change_or_deleting_the_file_reprobes(tmp_path, net, train_images, monkeypatch):
    plan, calls = choose(tmp_path, net, train_images, RATES)
    assert len(calls) == len(RATES)
    (probe_file,) = (tmp_path / "features").glob("probe-*.json")
    record = json.loads(probe_file.read_text())
    assert record["fields"]["torch"] == torch.__version__ and record["fields"]["machine"].startswith("cpu:")
    assert {k: v["img_per_s"] for k, v in record["candidates"].items()} == RATES

    # Second run: nothing is timed, the gate's figures come from their record too, same choice.
    again, calls = choose(tmp_path, net, train_images, {k: 1.0 for k in RATES}, quantiser=broken)
    assert calls == [] and again.candidate.id == "onnxruntime:int8"

    # A new onnxruntime (or torch) version: the old timings no longer apply.
    monkeypatch.setattr(onnx_backend, "onnxruntime_version", lambda: "99.0")
    swapped = {**RATES, "onnxruntime:int8": 30.0}
    plan, calls = choose(tmp_path, net, train_images, swapped)
    assert sorted(calls) == sorted(RATES) and plan.candidate.id == "onnxruntime:int8-r7"
    assert len(list((tmp_path / "features").glob("probe-*.json"))) == 2
    monkeypatch.undo()

    # The same model name on another CPU generation (VMs often report a bare "AMD EPYC"):
    # other flags, other timings.
    monkeypatch.setattr(machine, "cpu_flags", lambda: ["fpu", "avx2"])
    _, calls = choose(tmp_path, net, train_images, RATES)
    assert sorted(calls) == sorted(RATES)
    assert len(list((tmp_path / "features").glob("probe-*.json"))) == 3
    monkeypatch.undo()

    probe_file.unlink()
    _, calls = choose(tmp_path, net, train_images, RATES)
    assert sorted(calls) == sorted(RATES)


def test_a_candidate_failing_the_gate_is_never_used(tmp_path, net, train_images, caplog, monkeypatch):
    ran = []
    monkeypatch.setattr(onnx_backend.OnnxExtractor, "run", lambda self, batch: ran.append(self.precision))
    with caplog.at_level(logging.INFO, logger="fmnist_tl.features.probe"):
        plan, _ = choose(tmp_path, net, train_images, RATES, quantiser=broken)
    # Both int8 variants fail; the next fastest (ONNX Runtime fp32) is used.
    assert plan.candidate.id == "onnxruntime:32"
    for variant in ("onnxruntime:int8", "onnxruntime:int8-r7"):
        assert not plan.gates[variant]["passed"] and plan.gates[variant]["worst_cosine"] < 0.98
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("fails the fidelity gate" in w and "falling back" in w for w in warnings)
    assert "fastest that passes the fidelity gate (onnxruntime:int8, onnxruntime:int8-r7 failed)" in caplog.text
    assert ran == []  # the int8 models never ran: the gate used the injected quantiser, extraction the fp32 model
    assert plan.summary()["gate"]["onnxruntime:int8"]["thresholds"] == {"mean": 0.999, "worst": 0.98}
    # A later run reads the failed verdict from the gate record and still never picks int8.
    again, calls = choose(tmp_path, net, train_images, RATES, quantiser=faithful([]))
    assert again.candidate.id == "onnxruntime:32" and calls == []


def noisier(variant: str, ref: list[Planner]):
    """An injected quantiser: both int8 variants pass the gate, `variant` with the lower worst cosine."""

    def run(c: Candidate, images: torch.Tensor) -> torch.Tensor:
        good = faithful(ref)(c, images)
        scale = 3e-2 if c.variant == variant else 1e-3
        return good + scale * good.std() * torch.randn(good.shape, generator=torch.Generator().manual_seed(3))

    return run


@pytest.mark.parametrize("less_faithful, expected", [("int8-r7", "onnxruntime:int8"), ("int8", "onnxruntime:int8-r7")])
def test_near_equal_timings_are_a_tie_that_fidelity_breaks(
    tmp_path, net, train_images, caplog, less_faithful, expected
):
    """Two fresh probes on one machine that rank the int8 variants either way (the rates of issue #30,
    within the probe's noise) give one choice: the more faithful variant, and the plan says why."""
    chosen = []
    for i, (int8, r7) in enumerate(((856.0, 827.0), (1024.0, 1076.0))):
        ref: list[Planner] = []
        rates = {**RATES, "onnxruntime:int8": int8, "onnxruntime:int8-r7": r7}
        p = planner(tmp_path / str(i), net, train_images, recording_timer(rates, []), noisier(less_faithful, ref))
        ref.append(p)
        with caplog.at_level(logging.INFO, logger="fmnist_tl.features.probe"):
            plan = p.choose("auto", "auto")
        gates = plan.gates
        assert gates["onnxruntime:int8"]["passed"] and gates["onnxruntime:int8-r7"]["passed"]
        assert gates[expected]["worst_cosine"] > min(g["worst_cosine"] for g in gates.values())
        tie = plan.summary()["tie"]
        assert tie["by"] == "fidelity" and tie["chosen"] == expected and tie["within"] == ranking.PROBE_NOISE
        assert sorted(tie["candidates"]) == ["onnxruntime:int8", "onnxruntime:int8-r7"]
        assert "within 5%, a tie: the most faithful wins (worst cosine to fp32" in plan.reason
        chosen.append(plan.candidate.id)
    assert chosen == [expected, expected]
    assert f"Extraction: {expected} (onnxruntime:" in caplog.text


def test_a_tie_prefers_fp32_then_the_fixed_order_and_a_clear_lead_still_wins(tmp_path, net, train_images):
    # int8 1% ahead of fp32: a tie, and fp32 (worst cosine 1 by definition) is the more faithful.
    rates = {**RATES, "onnxruntime:int8": 101.0, "onnxruntime:32": 100.0, "torch:32": 99.0}
    plan, _ = choose(tmp_path / "a", net, train_images, rates)
    assert plan.candidate.id == "torch:32" and plan.tie["by"] == "order"
    assert plan.tie["candidates"] == ["onnxruntime:int8", "onnxruntime:32", "torch:32"]
    assert "equally faithful, the first in the fixed order wins (torch:32, " in plan.reason
    # 8% apart is a measured difference, not noise: the fastest, however faithful the other is.
    rates = {**RATES, "onnxruntime:int8": 900.0, "onnxruntime:int8-r7": 827.0}
    plan, _ = choose(tmp_path / "b", net, train_images, rates)
    assert plan.candidate.id == "onnxruntime:int8" and plan.tie is None and plan.reason == "fastest measured"
    # A candidate within the noise that fails the gate is left out of the tie, without a warning.
    rates = {**RATES, "torch:32": 100.0, "onnxruntime:int8": 99.0, "onnxruntime:int8-r7": 98.0}
    plan, _ = choose(tmp_path / "c", net, train_images, rates, quantiser=broken)
    assert plan.candidate.id == "torch:32" and plan.tie is None and plan.reason == "fastest measured"
    assert not plan.gates["onnxruntime:int8"]["passed"]


@pytest.mark.parametrize(
    "backend, precision, expected",
    [
        ("torch", "bf16", "torch:bf16"),
        ("torch", "16", "torch:16"),
        ("torch", "32", "torch:32"),
        ("onnxruntime", "32", "onnxruntime:32"),
    ],
)
def test_an_explicit_setting_is_obeyed_without_timing(tmp_path, net, train_images, backend, precision, expected):
    plan, calls = choose(tmp_path, net, train_images, RATES, backend=backend, precision=precision)
    assert plan.candidate.id == expected and calls == [] and plan.reason == "set explicitly"


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ([], "auto: below features.probe_min_images=4000 ("),
        (["features.backend=onnxruntime"], "auto: below features.probe_min_images=4000 ("),
        (["features.backend=torch", "features.precision=32"], "set explicitly"),
    ],
)
def test_a_small_job_says_auto_skipped_the_probe_not_set_explicitly(tiny_cfg, caplog, overrides, reason):
    from fmnist_tl.features.cache import feature_cache_for

    cfg = tiny_cfg(*overrides)
    model, dm = build(cfg.model, _recursive_=False), build(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    trainer = attached(dm, model)
    trainer.datamodule = dm  # what fit() sets: the callback reads the splits from it
    cache = feature_cache_for(cfg, model, dm)
    with caplog.at_level(logging.INFO, logger="fmnist_tl.features"):
        cache.setup(trainer, model, "fit")
    summary = cache.extraction_summary()
    assert summary["reason"].startswith(reason) and summary["probe"] == {}
    lines = [r.getMessage() for r in caplog.records if "Extraction" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"Extraction: {summary['candidate']} ({reason}")


def test_explicit_precision_is_obeyed_even_when_it_fails_the_gate(tmp_path, net, train_images, caplog):
    with caplog.at_level(logging.WARNING, logger="fmnist_tl.features.probe"):
        plan, calls = choose(tmp_path, net, train_images, RATES, quantiser=broken, backend="torch", precision="bf16")
    assert plan.candidate.id == "torch:bf16" and calls == []
    assert [r.getMessage() for r in caplog.records][0].startswith("features: torch:bf16 fails the fidelity gate")
    # Explicit int8 with two variants: the probe picks between those two only.
    plan, calls = choose(tmp_path, net, train_images, RATES, precision="int8")
    assert plan.candidate.id == "onnxruntime:int8" and sorted(calls) == ["onnxruntime:int8", "onnxruntime:int8-r7"]


def test_explicit_int8_with_every_variant_failing_the_gate_uses_the_most_faithful(tmp_path, net, train_images, caplog):
    ref: list[Planner] = []

    def noisy_r7(c: Candidate, images: torch.Tensor) -> torch.Tensor:
        if c.variant != "int8-r7":
            return broken(c, images)
        good = faithful(ref)(c, images)
        return good + 0.5 * good.std() * torch.randn(good.shape, generator=torch.Generator().manual_seed(2))

    p = planner(tmp_path, net, train_images, recording_timer(RATES, []), noisy_r7)
    ref.append(p)
    with caplog.at_level(logging.WARNING, logger="fmnist_tl.features.probe"):
        plan = p.choose("auto", "int8")
    gates = plan.gates
    assert not gates["onnxruntime:int8"]["passed"] and not gates["onnxruntime:int8-r7"]["passed"]
    assert gates["onnxruntime:int8-r7"]["mean_cosine"] > gates["onnxruntime:int8"]["mean_cosine"]
    # The slower variant, because it is the more faithful one; said in a warning and in the plan.
    assert plan.candidate.id == "onnxruntime:int8-r7"
    assert plan.reason.startswith("most faithful of onnxruntime:int8, onnxruntime:int8-r7, all failing")
    assert caplog.records[-1].getMessage().startswith("features.precision=int8: most faithful of")


# --------------------------------------------------------------------------------------------
# Samples and keys


def test_calibration_and_gate_samples_are_disjoint_seeded_training_images(train_images):
    cal, gate, identity = split_samples(train_images, 64, 32, seed=0)
    assert len(cal) == 64 and len(gate) == 32 and identity["split"] == "train"
    rows = {bytes(x.numpy()) for x in train_images}
    assert all(bytes(x.numpy()) in rows for x in torch.cat([cal, gate]))
    assert not {bytes(x.numpy()) for x in cal} & {bytes(x.numpy()) for x in gate}
    again = split_samples(train_images, 64, 32, seed=0)
    assert torch.equal(again[0], cal) and again[2] == identity
    assert split_samples(train_images, 64, 32, seed=1)[2]["calibration_sha256"] != identity["calibration_sha256"]


class _UInt8Convs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3), torch.nn.AdaptiveAvgPool2d(1)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float() / 255).flatten(1)


def test_calibration_folds_in_batch_by_batch_to_the_same_ranges_and_model(tmp_path, train_images):
    """quantize() folds each batch's ranges in as it goes (bounded memory); the result is the whole-set one."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    reader = onnx_backend.CalibrationReader(train_images[:10], batch_size=4)
    seen = []
    for start in range(len(reader)):  # what quantize_static's CalibStridedMinMax loop does
        reader.set_range(start, start + 1)
        while (batch := reader.get_next()) is not None:
            seen.append(batch["images"])
    assert [len(b) for b in seen] == [4, 4, 2] and (torch.from_numpy(np.concatenate(seen)) == train_images[:10]).all()

    torch.manual_seed(0)
    fp32 = tmp_path / "fp32.onnx"
    onnx_backend.export_onnx(_UInt8Convs().eval(), torch.zeros((2, 1, 28, 28), dtype=torch.uint8), fp32)
    strided, whole = tmp_path / "strided", tmp_path / "whole"
    strided.mkdir(), whole.mkdir()
    onnx_backend.quantize(fp32, strided / "int8.onnx", "int8", train_images[:40], strided)
    quantize_static(
        str(strided / "prepared.onnx"),
        str(whole / "int8.onnx"),
        onnx_backend.CalibrationReader(train_images[:40], batch_size=40),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    assert (strided / "int8.onnx").read_bytes() == (whole / "int8.onnx").read_bytes()


def test_int8_feature_entries_have_their_own_key(tmp_path, net, train_images):
    images, labels = tiny_split(40, seed=2)
    pre, sha = ImagePreprocess(32), module_sha256(net)
    args = ("resnet18", sha, pre)
    fp32_name, fp32_fp = split_entry(*args, "32", "float16", "train", images.unsqueeze(1), labels)
    a_name, a_fp = split_entry(*args, "int8", "float16", "train", images.unsqueeze(1), labels, "aaaa")
    b_name, _ = split_entry(*args, "int8", "float16", "train", images.unsqueeze(1), labels, "bbbb")
    assert len({fp32_name, a_name, b_name}) == 3 and "-int8-" in a_name and "quantization" not in fp32_fp
    assert a_fp["quantization"] == "aaaa"
    # The quantised model's key changes with the calibration set and with the quantiser's settings.
    runners = planner(tmp_path, net, train_images, calibration_seed=0).runners
    keys = {runners.quantization(Candidate("onnxruntime", "int8", v))["key"] for v in ("int8", "int8-r7")}
    runners = planner(tmp_path, net, train_images, calibration_seed=1).runners
    keys.add(runners.quantization(Candidate("onnxruntime", "int8", "int8"))["key"])
    assert len(keys) == 3


# --------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["features.backend=torch", "features.precision=int8"], "features.precision=int8 runs on onnxruntime"),
        (["features.backend=onnxruntime", "features.precision=bf16"], "features.precision=bf16 with features.backend"),
        (["features.backend=tensorrt"], "features.backend='tensorrt' must be one of auto, torch, onnxruntime"),
        (["features.gate_mean_cosine=2"], "features.gate_mean_cosine=2.0 must be in [-1, 1]"),
    ],
)
def test_impossible_settings_are_one_line_errors(tiny_cfg, overrides, message):
    from fmnist_tl.features.cache import feature_cache_for

    cfg = tiny_cfg(*overrides)
    with pytest.raises(FmnistError, match=re.escape(message)):
        feature_cache_for(cfg, build(cfg.model, _recursive_=False), build(cfg.data))


def test_int8_without_onnxruntime_is_a_one_line_error(monkeypatch):
    real = onnx_backend.importlib.util.find_spec
    monkeypatch.setattr(
        onnx_backend.importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a)
    )
    with pytest.raises(FmnistError, match=r"^features.precision=int8 needs onnxruntime: pip install"):
        extraction_settings({"precision": "int8"})
    # auto simply has no ONNX Runtime candidates then
    assert {c.backend for c in candidates("auto", "auto", torch.device("cpu"))} == {"torch"}


def test_gpu_without_bf16_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    with pytest.raises(FmnistError, match=r"features.precision=bf16: the GPU \(Tesla T4\) has no bf16"):
        candidates("torch", "bf16", torch.device("cuda"))
    with pytest.raises(FmnistError, match=r"ONNX Runtime extraction .* runs on the CPU"):
        candidates("auto", "int8", torch.device("cuda"))
    assert [c.id for c in candidates("auto", "auto", torch.device("cuda"))] == ["torch:32", "torch:16"]
    cfg = {"precision": "bf16-mixed", "accelerator": "gpu"}
    with pytest.raises(FmnistError, match=r"trainer.precision=bf16-mixed: the GPU \(Tesla T4\) has no bf16"):
        resolve_precision(cfg)
    assert resolve_precision({"precision": "auto", "accelerator": "gpu"}) == "32-true"


@pytest.mark.slow
def test_cli_error_line_for_int8_on_torch(tiny_mirror, tmp_path):
    proc = run_cli(*tiny_overrides(tiny_mirror, tmp_path), "features.backend=torch", "features.precision=int8")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: features.precision=int8 runs on onnxruntime: set features.backend=onnxruntime or auto"
    )


# --------------------------------------------------------------------------------------------
# trainer.precision=auto on a CPU


def test_trainer_precision_auto_on_cpu_follows_the_measurement(tmp_path, net, monkeypatch):
    settings = FeaturesConfig()
    pre = ImagePreprocess(32)
    fields = probe.probe_fields(torch.device("cpu"), "resnet18", 32, 16)
    path = tmp_path / f"probe-{fingerprint_key(fields, 20)}.json"
    monkeypatch.setattr(Planner, "measure", lambda self, c: pytest.fail(f"{c.id} measured although recorded"))
    for bf16, expected in ((30.0, "bf16-mixed"), (5.0, "32-true")):
        record = {"fields": fields, "candidates": {"torch:32": {"img_per_s": 10.0}, "torch:bf16": {"img_per_s": bf16}}}
        path.write_text(json.dumps(record))
        chosen, rates = probe.measured_trainer_precision(tmp_path, settings, net, "resnet18", pre)
        assert chosen == expected and rates == {"torch:32": 10.0, "torch:bf16": bf16}
        assert resolve_precision({"precision": "auto", "accelerator": "cpu"}, lambda c=chosen: c) == expected
    # No measurement when the backbone does not run in the trainer (cached features), and explicit wins.
    assert resolve_precision({"precision": "auto", "accelerator": "cpu"}) == "32-true"
    assert resolve_precision({"precision": "bf16-mixed", "accelerator": "cpu"}, lambda: "32-true") == "bf16-mixed"


def test_trainer_precision_probe_measures_once_and_caches(tmp_path, net):
    settings = FeaturesConfig(probe_batches=1)
    chosen, rates = probe.measured_trainer_precision(tmp_path, settings, net, "resnet18", ImagePreprocess(32))
    assert chosen == ("bf16-mixed" if rates["torch:bf16"] > rates["torch:32"] else "32-true")
    (record,) = tmp_path.glob("probe-*.json")
    assert set(json.loads(record.read_text())["candidates"]) == {"torch:32", "torch:bf16"}


# --------------------------------------------------------------------------------------------
# int8 for real: ONNX Runtime quantize_static on a tiny ResNet18, through training


@pytest.mark.slow
def test_int8_run_end_to_end_with_cached_models(tiny_mirror, tmp_path, monkeypatch, caplog):
    calibrated: list[torch.Tensor] = []
    real_quantize = onnx_backend.quantize

    def recording_quantize(fp32_path, out, variant, images, work):
        calibrated.append(images.clone())
        return real_quantize(fp32_path, out, variant, images, work)

    monkeypatch.setattr(onnx_backend, "quantize", recording_quantize)
    overrides = [
        *tiny_overrides(tiny_mirror, tmp_path),
        "features.precision=int8",
        "features.calibration_images=64",
        "features.gate_images=32",
        # Random-init weights at 32 px: the quantiser is checked for plumbing here, not for fidelity.
        "features.gate_mean_cosine=0.5",
        "features.gate_worst_cosine=0.0",
    ]
    with caplog.at_level(logging.INFO):
        metrics = train(make_cfg(overrides, tmp_path / "first"))
    extraction = metrics["extraction"]
    assert extraction["precision"] == "int8" and extraction["backend"] == "onnxruntime"
    gate = extraction["gate"][extraction["candidate"]]
    assert 0.5 < gate["mean_cosine"] <= 1.0 and gate["worst_cosine"] <= gate["mean_cosine"]
    assert extraction["quantization"]["quantization"]["per_channel"] is True
    assert metrics["test/acc"] is not None

    # Calibration images: training split only (the train part of the seeded train/val split).
    dm = build(make_cfg(overrides, tmp_path / "x").data)
    dm.prepare_data()
    dm.setup("fit")
    train_rows = {bytes(x.numpy()) for x in dm.data_train.tensors[0]}
    other_rows = {bytes(x.numpy()) for x in torch.cat([dm.data_val.tensors[0], dm.data_test.tensors[0]])}
    assert calibrated and all(len(c) == 64 for c in calibrated)
    for images in calibrated:
        rows = {bytes(x.numpy()) for x in images}
        assert rows <= train_rows and not rows & other_rows

    # Feature entries: int8 keys of their own, gate figures in their manifests; the models are cached.
    cache = tmp_path / "cache" / "features"
    manifests = [json.loads(p.read_text()) for p in cache.glob("*-int8-*.json")]
    assert sorted(m["fingerprint"]["split"] for m in manifests) == ["test", "train", "val"]
    assert all(m["fingerprint"]["quantization"] == extraction["quantization"]["key"] for m in manifests)
    assert all(m["extraction"]["gate"] == extraction["gate"] for m in manifests)
    models = sorted(p.name for p in (cache / "models").glob("*.onnx"))
    assert len(models) == 3  # fp32 + two int8 variants
    assert not list((cache / "models").glob(".work-*"))

    # Warm: every split a hit, nothing quantised or exported again, the same choice.
    n_quantised = len(calibrated)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again = train(make_cfg(overrides, tmp_path / "second"))
    assert {v["status"] for v in again["feature_cache"].values()} == {"hit"}
    assert len(calibrated) == n_quantised and "Built" not in caplog.text
    assert again["extraction"]["candidate"] == extraction["candidate"]

    # A damaged model file is detected by its checksum and rebuilt, not run.
    int8_model = next(p for p in (cache / "models").glob("*.onnx") if "-fp32-" not in p.name)
    int8_model.write_bytes(int8_model.read_bytes()[:-100])
    for p in cache.glob("*-int8-*.safetensors"):
        p.unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train(make_cfg(overrides, tmp_path / "third"))
    assert "unusable" in caplog.text and "rebuilding it" in caplog.text


def test_a_candidate_slower_than_a_quarter_of_the_best_stops_after_its_warm_up():
    calls = []

    def slow(batch: torch.Tensor) -> None:
        calls.append(len(batch))
        time.sleep(0.02)  # at most 16 / 0.02 = 800 img/s, far below the 10^6 img/s bar

    images = torch.zeros((16 * 5, 1, 28, 28), dtype=torch.uint8)
    result = time_runner(slow, images, 16, max_batches=4, max_seconds=60, give_up_below=1e6)
    assert result["warmup_only"] and calls == [16]
    calls.clear()
    result = time_runner(slow, images, 16, max_batches=4, max_seconds=60)
    assert "warmup_only" not in result and result["timed_images"] == 64 and calls == [16] * 5
