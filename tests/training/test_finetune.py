"""Fine-tuning: the two phases, the BatchNorm policy, resuming across the unfreeze, init_from, DDP."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil

import lightning as L
import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from fmnist_tl.backbones import registry as backbones
from fmnist_tl.config.schemas import FinetuneConfig
from fmnist_tl.core.errors import FmnistError
from fmnist_tl.runtime.checks import validate_config
from fmnist_tl.train import train
from fmnist_tl.training.finetune import finetune_options
from fmnist_tl.training.lr_plan import finetune_phase_factor, head_phase_factors
from fmnist_tl.training.model import TransferClassifier
from tests.helpers import DDP_SIM, REPO, make_cfg, run_cli, tiny_overrides

# A couple of batches per epoch: enough for every trainable tensor to move, fast on 2 cores.
FAST = (
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "+trainer.num_sanity_val_steps=0",
    "test=false",
)
TWO_PHASES = ("model.finetune.start_epoch=1", "trainer.max_epochs=2", *FAST)
# Every epoch's checkpoint, no last.ckpt copies (they only cost disk time here).
EVERY_EPOCH = ("callbacks.model_checkpoint.save_top_k=-1", "callbacks.model_checkpoint.save_last=false")
# Bit-for-bit comparable runs: deterministic kernels, no early stop.
PARITY = ("trainer.deterministic=true", "callbacks.early_stopping=null")
# One small member of each family beyond ResNet, at the smallest size it takes.
FAMILIES = [
    ("convnext_tiny", 32),
    ("efficientnet_b0", 32),
    ("mobilenet_v3_small", 32),
    ("regnet_y_400mf", 32),
    ("swin_t", 32),
    ("vit_b_32", 224),  # a ViT takes exactly its own size
]
# Family runs: a few images per batch (ViT-B costs ~0.3 s per image), the top stage unfrozen.
SMALL_TOP = ("data.batch_size=4", "data.eval_batch_size=4", "model.finetune.unfreeze=last_1")


def top_stage(backbone: str) -> tuple[tuple[str, ...], set[str]]:
    """`last_1`'s name prefixes, and the backbone parameters under them."""
    top = tuple(f"{stage}." for stage in backbones.last_stages(backbone, 1))
    net = backbones.strip_classifier(backbones.new_classifier(backbone, None, "meta"))
    return top, {n for n, _ in net.named_parameters() if n.startswith(top)}


def clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


class Recorder(L.Callback):
    """Backbone/head state at the start and after every epoch, LRs per epoch, BN modules in train mode."""

    def on_train_start(self, trainer, pl_module):
        self.states = [clone(pl_module.backbone.state_dict())]
        self.head_at_start = clone(pl_module.head.state_dict())
        self.lrs: list[dict[str, float]] = []
        self.bn_training: list[set[str]] = []
        self.stateful_params: list[set[str]] = []
        opt = trainer.optimizers[0]
        self.groups_at_start = [(g["name"], g["lr"], len(g["params"])) for g in opt.param_groups]
        # Keyed like a saved optimizer state: by position over the param groups.
        params = [p for g in opt.param_groups for p in g["params"]]
        self.opt_state_at_start = {
            i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params) if p in opt.state
        }

    def on_train_epoch_start(self, trainer, pl_module):
        self.lrs.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})
        self.bn_training.append(set())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.bn_training[-1] |= {
            n for n, m in pl_module.backbone.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and m.training
        }

    def on_train_epoch_end(self, trainer, pl_module):
        self.states.append(clone(pl_module.backbone.state_dict()))
        self.head_at_end = clone(pl_module.head.state_dict())
        names = {id(p): n for n, p in pl_module.backbone.named_parameters()}
        self.stateful_params.append({names[id(p)] for p in trainer.optimizers[0].state if id(p) in names})


@pytest.fixture
def recorder(monkeypatch) -> Recorder:
    rec = Recorder()
    orig_fit = L.Trainer.fit

    def fit(self, *args, **kwargs):
        self.callbacks.append(rec)
        return orig_fit(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", fit)
    return rec


@pytest.mark.slow
@pytest.mark.parametrize(
    "bn, stages",
    [("frozen", ["layer4"]), ("train", ["layer3"])],
    ids=["bn_frozen-layer4", "bn_train-layer3"],
)
def test_two_phases_backbone_identical_then_only_chosen_stages_change(tiny_cfg, recorder, caplog, bn, stages):
    cfg = tiny_cfg(*TWO_PHASES, f"model.finetune.bn={bn}", f"model.finetune.unfreeze=[{','.join(stages)}]")
    with caplog.at_level(logging.INFO, logger="fmnist_tl.training.model"):
        train(cfg)
    start, after_head, after_finetune = recorder.states
    # Head-only epoch: every backbone tensor, BN running stats included, bit-identical; and the
    # optimizer never touched a backbone parameter (no gradient, so no Adam state either).
    assert changed(start, after_head) == set()
    assert recorder.stateful_params[0] == set()
    assert recorder.bn_training[0] == set()
    # Fine-tune epoch: the chosen stages' weights (conv and BN affine) all moved, nothing else did.
    moved = changed(after_head, after_finetune)
    chosen = {k for k in start if k.split(".")[0] in stages}
    resnet18 = torchvision.models.resnet18()
    stage_params = {n for n, _ in resnet18.named_parameters()}
    assert chosen & stage_params <= moved <= chosen
    assert recorder.stateful_params[1] == chosen & stage_params
    stats = {k for k in chosen if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    if bn == "frozen":
        assert moved.isdisjoint(stats)
        assert recorder.bn_training[1] == set()
    else:
        assert stats <= moved
        bn_layers = {n for n, m in resnet18.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
        assert recorder.bn_training[1] == {n for n in bn_layers if n.split(".")[0] in stages}
    # LRs: head alone at the configured LR, backbone at 0; then the backbone at 0.1 x the head LR.
    assert recorder.lrs == [
        {"head": pytest.approx(1e-3), "backbone": 0.0},
        {"head": pytest.approx(1e-3), "backbone": pytest.approx(1e-4)},
    ]
    announced = [r.getMessage() for r in caplog.records if "Fine-tune phase" in r.getMessage()]
    assert len(announced) == 1 and f"training backbone {'+'.join(stages)} at lr 0.0001" in announced[0]


@pytest.mark.slow
@pytest.mark.parametrize("backbone, size", FAMILIES)
def test_two_phases_in_every_family_train_only_the_top_stage(tiny_cfg, recorder, backbone, size, tmp_path):
    """Random init at the family's smallest size: the backbone, BatchNorm statistics included, is
    bit-identical after the head epoch; then only `last_1`'s parameters move, through the optimizer's
    backbone group. Resumed from the head epoch's checkpoint, the fine-tune epoch is the same one:
    same groups and LRs, same weights (dropout and stochastic depth included)."""
    run = (*TWO_PHASES, *SMALL_TOP, f"model.backbone={backbone}", f"model.image_size={size}", *EVERY_EPOCH, *PARITY)
    train(tiny_cfg(*run, output="straight"))
    start, after_head, after_finetune = recorder.states
    straight_lrs, straight_groups, straight_head = list(recorder.lrs), recorder.groups_at_start, recorder.head_at_end
    assert changed(start, after_head) == set()
    assert recorder.stateful_params[0] == set()
    _, chosen = top_stage(backbone)
    assert chosen and recorder.stateful_params[1] == chosen
    moved = changed(after_head, after_finetune)
    assert moved and moved <= chosen  # BatchNorm frozen: no statistics moved either
    assert recorder.bn_training[1] == set()

    head_epoch = tmp_path / "straight" / "checkpoints" / "epoch_000.ckpt"
    train(tiny_cfg(*run, f"ckpt_path={head_epoch}", output="resumed"))
    groups = [(name, n) for name, _, n in recorder.groups_at_start]
    assert groups == [(name, n) for name, _, n in straight_groups] and recorder.lrs == straight_lrs[1:]
    assert changed(after_head, recorder.states[0]) == set()
    assert changed(after_finetune, recorder.states[1]) == set()
    assert changed(straight_head, recorder.head_at_end) == set()


@pytest.mark.slow
def test_resume_across_the_unfreeze_keeps_groups_lrs_and_optimizer_state(tiny_cfg, recorder, tmp_path):
    three = ("model.finetune.start_epoch=1", "trainer.max_epochs=3", *EVERY_EPOCH)
    train(tiny_cfg(*three, *FAST, output="straight"))
    straight_lrs = list(recorder.lrs)
    assert straight_lrs[0]["backbone"] == 0.0 and straight_lrs[1]["backbone"] > straight_lrs[2]["backbone"] > 0
    ckpts = tmp_path / "straight" / "checkpoints"

    # From the checkpoint saved after the unfreeze epoch: same groups, same LRs, Adam state restored.
    after_unfreeze = ckpts / "epoch_001.ckpt"
    saved = torch.load(after_unfreeze, weights_only=True)
    train(tiny_cfg(*three, *FAST, f"ckpt_path={after_unfreeze}", output="resumed_after"))
    assert [(name, n) for name, _, n in recorder.groups_at_start] == [("head", 4), ("backbone", 15)]
    assert recorder.lrs == straight_lrs[2:]
    saved_state = saved["optimizer_states"][0]["state"]
    assert sorted(recorder.opt_state_at_start) == sorted(saved_state) and len(saved_state) == 4 + 15
    for i, state in saved_state.items():
        assert torch.equal(recorder.opt_state_at_start[i]["exp_avg"], state["exp_avg"])
        assert torch.equal(recorder.opt_state_at_start[i]["exp_avg_sq"], state["exp_avg_sq"])
    assert changed(recorder.states[0], recorder.states[1]) and all(
        k.startswith("layer4.") for k in changed(recorder.states[0], recorder.states[1])
    )

    # From the checkpoint saved before it: the unfreeze still happens, at the same epoch and LRs.
    train(tiny_cfg(*three, *FAST, f"ckpt_path={ckpts / 'epoch_000.ckpt'}", output="resumed_before"))
    assert recorder.lrs == straight_lrs[1:]
    assert changed(recorder.states[0], recorder.states[1])


@pytest.fixture(scope="module")
def head_ckpt(tiny_mirror, tmp_path_factory):
    """The last checkpoint of a head-only run (resnet18, 32 px, random init)."""
    tmp = tmp_path_factory.mktemp("head_run")
    train(make_cfg([*tiny_overrides(tiny_mirror, tmp), *FAST], tmp / "run"))
    return tmp / "run" / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_init_from_starts_from_the_head_run_and_fine_tunes(tiny_cfg, recorder, head_ckpt, tmp_path):
    head_copy = tmp_path / "head.ckpt"
    shutil.copy(head_ckpt, head_copy)
    metrics = train(tiny_cfg(f"model.finetune.init_from={head_copy}", *FAST))
    # The head run's checkpoint holds its head and the identity of its frozen backbone (a seeded
    # random init here), which the fine-tune run rebuilds: it starts from exactly the head run's model.
    head_run = TransferClassifier.from_checkpoint(head_ckpt)
    assert not any(k.startswith("backbone.") for k in torch.load(head_ckpt, weights_only=True)["state_dict"])
    assert all(torch.equal(v, head_run.backbone.state_dict()[k]) for k, v in recorder.states[0].items())
    assert all(torch.equal(v, head_run.head.state_dict()[k]) for k, v in recorder.head_at_start.items())
    # start_epoch null with init_from: the whole run is the fine-tune phase.
    assert recorder.lrs == [{"head": pytest.approx(1e-3), "backbone": pytest.approx(1e-4)}]
    moved = changed(recorder.states[0], recorder.states[1])
    assert moved and all(k.startswith("layer4.") for k in moved)
    assert metrics["weights_id"].startswith("init_from:head.ckpt:sha256=")
    assert metrics["weights_id"].endswith("(from random-init)")
    # The fine-tuned checkpoint rebuilds on its own: the init_from file is not needed any more.
    head_copy.unlink()
    tuned = TransferClassifier.from_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert tuned.finetune_start == 0 and tuned.weights_id == metrics["weights_id"]
    assert all(torch.equal(v, recorder.states[1][k]) for k, v in tuned.backbone.state_dict().items())


@pytest.mark.slow
def test_resuming_an_init_from_run_needs_no_init_from_file(tiny_cfg, head_ckpt, tmp_path):
    head_copy = tmp_path / "head.ckpt"
    shutil.copy(head_ckpt, head_copy)
    first = train(tiny_cfg(f"model.finetune.init_from={head_copy}", "trainer.max_epochs=1", *FAST))
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)["state_dict"]
    head_copy.unlink()
    cfg = tiny_cfg(
        f"model.finetune.init_from={head_copy}",
        "trainer.max_epochs=2",
        f"ckpt_path={last}",
        *FAST,
    )
    metrics = train(cfg)
    assert metrics["epochs"] == 2 and metrics["weights_id"] == first["weights_id"]
    resumed = torch.load(last, weights_only=True)["state_dict"]
    assert changed({k: v for k, v in saved.items() if k.startswith("head.")}, resumed)  # it trained on


@pytest.mark.slow
def test_init_from_wrong_architecture_is_clear(head_ckpt, tmp_path):
    with pytest.raises(
        FmnistError, match=r"does not fit this model: it has backbone=resnet18, .*model.backbone=resnet34"
    ):
        TransferClassifier(backbone="resnet34", weights=None, finetune={"init_from": str(head_ckpt)})
    with pytest.raises(FmnistError, match=re.escape("head.hidden_dims=[256], the config model.head.hidden_dims=[64]")):
        TransferClassifier(
            backbone="resnet18", weights=None, head={"hidden_dims": [64]}, finetune={"init_from": str(head_ckpt)}
        )
    plain = tmp_path / "plain.pth"
    torch.save(torchvision.models.resnet18().state_dict(), plain)
    with pytest.raises(FmnistError, match="is not an fmnist_tl checkpoint"):
        TransferClassifier(backbone="resnet18", weights=None, finetune={"init_from": str(plain)})
    assert TransferClassifier.from_checkpoint(head_ckpt).finetune_start is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.finetune.unfreeze=[layer5]"], "unfreeze: layer5 is not a stage of resnet18; did you mean layer4"),
        (["model.finetune.start_epoch=3", "trainer.max_epochs=3"], "start_epoch=3 leaves no fine-tune epoch"),
        (["model.finetune.start_epoch=1", "model.freeze_backbone=false"], "model.finetune needs model.freeze_backbone"),
        (["model.finetune.bn=sometimes"], "model.finetune.bn='sometimes' must be one of frozen, train"),
        (["model.finetune.start_epoch=-1"], "model.finetune.start_epoch=-1 must be an integer >= 0 or null"),
        (["model.finetune.backbone_lr_factor=0"], "model.finetune.backbone_lr_factor=0.0 must be a positive"),
        (["model.finetune.lr=-1"], "model.finetune.lr=-1.0 must be a positive"),
        (["model.finetune.init_from=/no/such.ckpt"], "model.finetune.init_from=/no/such.ckpt does not exist"),
    ],
)
def test_bad_finetune_values_rejected_before_training(tiny_cfg, overrides, message):
    with pytest.raises(FmnistError, match=re.escape(message)):
        validate_config(tiny_cfg(*overrides))


def test_model_finetune_has_one_set_of_defaults_and_is_parsed_once():
    """conf/model/resnet50.yaml's model.finetune is FinetuneConfig's defaults; a parsed one is passed on as is."""
    yaml_defaults = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "model" / "resnet50.yaml").finetune)
    assert yaml_defaults == dataclasses.asdict(FinetuneConfig())
    ft = finetune_options({"start_epoch": 1, "unfreeze": "last_2"}, "resnet18")
    assert isinstance(ft, FinetuneConfig) and ft.unfreeze == ["layer3", "layer4"] and ft.first_epoch == 1
    assert finetune_options(ft, "resnet18") is ft
    model = TransferClassifier(backbone="resnet18", weights=None, image_size=32, finetune=ft)
    assert model.finetune is ft and model.hparams.finetune == ft.as_dict()  # checkpoints hold plain containers
    assert finetune_options(model.hparams.finetune, "resnet18") == ft
    assert finetune_options({"init_from": "head.ckpt"}, "resnet18").first_epoch == 0


def test_finetune_built_in_python_is_checked_by_the_same_schema():
    with pytest.raises(FmnistError, match=re.escape("model.finetune.bn='x' must be one of frozen, train")):
        TransferClassifier(backbone="resnet18", weights=None, finetune={"bn": "x"})
    with pytest.raises(FmnistError, match=re.escape("'model.finetune.stat_epoch'; did you mean model.finetune.start")):
        finetune_options({"stat_epoch": 1}, "resnet18")
    with pytest.raises(FmnistError, match=re.escape("model.finetune.unfreeze=[] must be a list of resnet18's stage")):
        finetune_options({"unfreeze": []}, "resnet18")


def test_unfreeze_all_and_requires_grad_fixed_for_the_whole_run():
    m = TransferClassifier(backbone="resnet18", weights=None, finetune={"start_epoch": 2, "unfreeze": "all"})
    assert m.finetune.unfreeze == ["all"] and m.finetune_stages == [m.backbone]
    assert all(p.requires_grad for p in m.backbone.parameters())
    assert finetune_options({"unfreeze": ["layer4", "layer3", "layer4"]}, "resnet18").unfreeze == ["layer3", "layer4"]
    assert finetune_options({"unfreeze": "last_2"}, "resnet18").unfreeze == ["layer3", "layer4"]
    m = TransferClassifier(backbone="resnet18", weights=None, finetune={"start_epoch": 2})
    trainable = {n.split(".")[0] for n, p in m.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer4"}
    # Not attached to a trainer (epoch 0 < start): no gradient reaches the backbone yet.
    m.train()
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in m.backbone.parameters())
    assert all(p.grad is not None for p in m.head.parameters())
    # A head-only model is unchanged: backbone fully frozen.
    assert not any(p.requires_grad for p in TransferClassifier(backbone="resnet18", weights=None).backbone.parameters())


def test_phase_schedules():
    # model.scheduler (cosine, T_max null) spans the head-only epochs.
    cosine = {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "_partial_": True, "T_max": None}
    assert head_phase_factors(cosine, 4) == pytest.approx([0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)])
    assert head_phase_factors(None, 2) == [1.0, 1.0]
    step = {"_target_": "torch.optim.lr_scheduler.StepLR", "_partial_": True, "step_size": 1, "gamma": 0.5}
    assert head_phase_factors(step, 3) == pytest.approx([1.0, 0.5, 0.25])
    one_cycle = {"_target_": "torch.optim.lr_scheduler.OneCycleLR", "_partial_": True}
    with pytest.raises(FmnistError, match="OneCycleLR cannot drive the head epochs"):
        head_phase_factors(one_cycle, 2)
    # The fine-tune phase's own schedule: warm-up, then a half cosine that never reaches 0.
    factors = [finetune_phase_factor(j, 4, 1, "cosine") for j in range(4)]
    assert factors == pytest.approx([0.5, 1.0, 0.75, 0.25])
    assert [finetune_phase_factor(j, 3, 0, "constant") for j in range(3)] == [1.0, 1.0, 1.0]


@pytest.mark.slow
@pytest.mark.parametrize("backbone, size", [("resnet18", 32), *FAMILIES])
def test_ddp_sim_two_phase_run(tiny_mirror, tmp_path, backbone, size):
    """Two CPU processes, head epoch then the top stage (ResNet's layer4; Swin's last block and
    closing norm, stochastic depth on): DDP needs find_unused_parameters for the head epoch.
    The ranks are forked, at about half the cost of trainer=ddp_sim's spawned ones: the question
    here is each family's model under DDP; test_train runs the spawned ranks."""
    proc = run_cli(
        *tiny_overrides(tiny_mirror, tmp_path),
        *DDP_SIM,
        *EVERY_EPOCH,
        *TWO_PHASES,
        *SMALL_TOP,
        f"model.backbone={backbone}",
        f"model.image_size={size}",
        "trainer.strategy=ddp_fork",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (metrics_file,) = (tmp_path / "logs" / "train" / "runs").glob("*/metrics.json")
    assert json.loads(metrics_file.read_text())["status"] == "completed"
    ckpts = metrics_file.parent / "checkpoints"
    head_epoch = torch.load(ckpts / "epoch_000.ckpt", weights_only=True)
    finetune_epoch = torch.load(ckpts / "epoch_001.ckpt", weights_only=True)
    # The run's initial model, rebuilt the way train() builds it (seeded, then constructed).
    L.seed_everything(42)
    initial = TransferClassifier(backbone=backbone, weights=None, image_size=size).backbone.state_dict()
    assert all(torch.equal(v, head_epoch["state_dict"][f"backbone.{k}"]) for k, v in initial.items())
    top, top_params = top_stage(backbone)
    moved = {k for k, v in initial.items() if not torch.equal(v, finetune_epoch["state_dict"][f"backbone.{k}"])}
    assert moved and all(k.startswith(top) and "running" not in k for k in moved)
    # Under DDP the head epoch left the backbone without gradients: Adam holds state for the head only.
    assert [g["name"] for g in head_epoch["optimizer_states"][0]["param_groups"]] == ["head", "backbone"]
    assert len(head_epoch["optimizer_states"][0]["state"]) == 4
    assert len(finetune_epoch["optimizer_states"][0]["state"]) == 4 + len(top_params)


@pytest.mark.slow
def test_extending_a_fine_tune_run_continues_its_cosine(tiny_cfg, recorder, tmp_path):
    # Phase epochs 1..3 of a 4-epoch run, then extended to 6: the phase's cosine goes on down from
    # the LR of epoch 3, where rebuilding it for 6 epochs would jump back up.
    train(tiny_cfg("model.finetune.start_epoch=1", "trainer.max_epochs=4", *FAST, output="a"))
    first = [lrs["backbone"] for lrs in recorder.lrs]
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    train(tiny_cfg("model.finetune.start_epoch=1", "trainer.max_epochs=6", f"ckpt_path={last}", *FAST, output="b"))
    lrs = first + [lrs["backbone"] for lrs in recorder.lrs]
    assert len(lrs) == 6 and lrs[0] == 0.0
    assert all(b < a for a, b in zip(lrs[1:], lrs[2:], strict=False)) and lrs[-1] > 0
    assert lrs[4:] == pytest.approx([first[3] * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in (1, 2)])
    assert torch.load(last, weights_only=True)["lr_plan"]["replans"] == [[3, pytest.approx(0.25), 6]]


def test_log_lines_count_epochs_from_1_as_the_progress_bar_and_curves_do():
    """start_epoch=3 is the 4th epoch: the bar shows 'Epoch 4', curves.png 'fine-tune from epoch 4'."""
    from fmnist_tl.training.finetune import check_finetune, phase_message

    ft = finetune_options({"start_epoch": 3, "unfreeze": "last_1"}, "resnet18")
    line = phase_message(ft, 3, {"head": 1e-3, "backbone": 1e-4})
    assert line.startswith("Fine-tune phase from epoch 4 (model.finetune.start_epoch=3): ")
    resumed = phase_message(ft, 5, {"head": 1e-3, "backbone": 1e-4})
    assert resumed.startswith("Fine-tune phase from epoch 4 (model.finetune.start_epoch=3, resumed at epoch 6): ")
    with pytest.raises(FmnistError, match=r"raise trainer.max_epochs above 3 \(fine-tuning runs from epoch 4 to"):
        check_finetune(ft, True, 3, check_files=False)


def test_a_job_parses_model_finetune_once_for_its_checks_and_once_in_the_model(tiny_cfg, monkeypatch):
    """validate_config parses it and the job passes the result on (resume check, model build, DDP
    strategy); the model parses its own hyper-parameters once, as a model read from a checkpoint must."""
    import fmnist_tl.training.finetune as finetune_module
    from fmnist_tl.runtime.build import build_model, finetune_trainer_overrides

    parsed = []
    real = finetune_module.parse
    monkeypatch.setattr(finetune_module, "parse", lambda *a, **k: parsed.append(a[2]) or real(*a, **k))
    cfg = tiny_cfg("model.finetune.start_epoch=1", "trainer.max_epochs=2", "+trainer.strategy=ddp")
    finetune = validate_config(cfg)
    model = build_model(cfg, None, finetune)
    assert finetune_trainer_overrides(cfg, finetune) == {"strategy": "ddp_find_unused_parameters_true"}
    assert model.finetune == finetune and len(parsed) == 2
