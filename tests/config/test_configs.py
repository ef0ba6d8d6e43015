from __future__ import annotations

import importlib.machinery
import importlib.resources
import os
import re
import subprocess
import sys
import types

import lightning as L
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from fmnist_tl.config import schemas
from fmnist_tl.config.compose import CONFIG_MODULE
from fmnist_tl.core.errors import FmnistError
from fmnist_tl.data.fashion_mnist import FashionMNISTDataModule
from fmnist_tl.data.image_folder import ImageFolderDataModule
from fmnist_tl.features.cache import feature_cache_for
from fmnist_tl.runtime.build import build, finetune_trainer_overrides
from fmnist_tl.runtime.checks import validate_config
from fmnist_tl.training.model import TransferClassifier
from fmnist_tl.training.precision import resolve_precision
from tests.helpers import REPO, compose_cfg, make_entry_cfg, run_cli


def config_options() -> list[str]:
    """`group=option` for every YAML of every config group the package ships, nested groups too."""
    options = []

    def walk(folder, group: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir() and not entry.name.startswith(("_", ".")):
                walk(entry, f"{group}/{entry.name}" if group else entry.name)
            elif group and entry.name.endswith(".yaml"):
                options.append(f"{group}={entry.name.removesuffix('.yaml')}")

    walk(importlib.resources.files(CONFIG_MODULE), "")
    return sorted(options)


def _instantiate_all(group: DictConfig | None) -> list:
    return [build(c) for c in (group or {}).values() if c is not None and "_target_" in c]


def _trainer_fits_here(trainer_cfg: DictConfig) -> dict:
    """GPU options on a machine with fewer GPUs than they ask for: the same trainer on CPU."""
    if trainer_cfg.get("accelerator") == "gpu" and torch.cuda.device_count() < trainer_cfg.get("devices", 1):
        return {"accelerator": "cpu"}
    return {}


def test_config_options_cover_nested_groups():
    options = config_options()
    assert {"model/scheduler=onecycle", "logger=tensorboard", "trainer=ddp_sim", "hparams_search=head_optuna"} <= set(
        options
    )
    assert len(options) == len(list(REPO.glob("conf/*/**/*.yaml")))


@pytest.mark.parametrize("option", config_options())
def test_every_config_option_composes_and_instantiates(option, tmp_path):
    """As lightning-hydra-template's config tests: each option composes, validates and builds.

    The model is random-init (model.weights=null after validation); nothing is fitted.
    """
    required = [f"data.root={tmp_path}"] if option == "data=image_folder" else []  # the folder: built, not set up
    cfg = compose_cfg("train", [option, f"paths.root_dir={tmp_path}", *required], hydra=True)
    HydraConfig().set_config(cfg)
    for plugin in (cfg.hydra.sweeper, cfg.hydra.launcher):
        if not plugin._target_.startswith("hydra._internal."):  # Hydra's basic ones: only Hydra may build them
            assert build(plugin) is not None
    assert all(isinstance(cb, Callback) for cb in _instantiate_all(cfg.hydra.callbacks))
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        del cfg.hydra
        if _trainer_fits_here(cfg.trainer):  # refused here (test_a_gpu_trainer_without_a_gpu_is_one_line)
            with pytest.raises(FmnistError, match="asks for"):
                validate_config(cfg)
            cfg.trainer.update(accelerator="cpu", devices=1)
    validate_config(cfg)
    model = build(cfg.model, _recursive_=False, weights=None)
    assert isinstance(model, TransferClassifier)
    datamodule = build(cfg.data)
    assert isinstance(datamodule, ImageFolderDataModule if option == "data=image_folder" else FashionMNISTDataModule)
    feature_cache_for(cfg, model, datamodule)
    callbacks = _instantiate_all(cfg.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    trainer = build(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        precision=resolve_precision(cfg.trainer),
        **finetune_trainer_overrides(cfg),
    )
    assert isinstance(trainer, L.Trainer)
    assert len(trainer.loggers) == len(loggers)


@pytest.mark.parametrize("config_name", ["evaluate", "export"])
def test_entry_configs_compose_and_instantiate(config_name, tmp_path):
    cfg = make_entry_cfg(config_name, [f"paths.root_dir={tmp_path}"], tmp_path / "run")
    assert isinstance(build(cfg.data), FashionMNISTDataModule)
    if "trainer" in cfg:
        assert isinstance(build(cfg.trainer, precision=resolve_precision(cfg.trainer)), L.Trainer)


@pytest.mark.parametrize("option", ["logger=tensorboard", "logger=many_loggers"])
def test_tensorboard_logger_without_tensorboard_is_refused_up_front(option, monkeypatch):
    for name in ("tensorboard", "tensorboardX"):  # what importlib sees when neither is installed
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(FmnistError) as e:
        validate_config(compose_cfg("train", [option]))
    assert str(e.value) == "logger.tensorboard needs tensorboard, not installed: pip install 'fmnist_tl[tensorboard]'"


def test_tensorboard_logger_runs_on_tensorboardx_alone(monkeypatch):
    """Lightning's TensorBoardLogger takes either package: tensorboardX alone is not refused."""
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    fake = types.ModuleType("tensorboardX")
    fake.__spec__ = importlib.machinery.ModuleSpec("tensorboardX", None)
    monkeypatch.setitem(sys.modules, "tensorboardX", fake)
    validate_config(compose_cfg("train", ["logger=tensorboard"]))


@pytest.mark.slow
def test_cli_missing_optional_dependency_one_line(tmp_path):
    hide = (
        "import runpy, sys; sys.modules.update(tensorboard=None, tensorboardX=None); "
        "runpy.run_module('fmnist_tl.train', run_name='__main__', alter_sys=True)"
    )
    args = ["logger=many_loggers", f"paths.root_dir={tmp_path}", "model.weights=null"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", hide, *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "error: logger.tensorboard needs tensorboard, not installed: pip install 'fmnist_tl[tensorboard]'"
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.optimizer.lr=-1", "model.optimizer.lr=-1 must be a positive"),
        ("model.optimizer.lr=abc", "model.optimizer.lr='abc' must be a positive finite number"),
        ("features.precision=int4", "features.precision='int4' must be one of auto, 32, bf16, 16, int8"),
        ("data.pin_memory=maybe", "data.pin_memory='maybe' must be one of auto, true, false"),
        ("model.finetune.bn=eval", "model.finetune.bn='eval' must be one of frozen, train"),
        ("+data.colour=1", "unknown config key 'data.colour'"),
        ("model.backbone=vgg99", "model.backbone=vgg99 is not a torchvision classifier; did you mean vgg19"),
        ("model.weights=/no/such.pth", "model.weights=/no/such.pth does not exist"),
        ("model.weights=IMAGENET1K_V9", "model.weights=IMAGENET1K_V9 is not a torchvision weights name"),
        ("data.batch_size=0", "data.batch_size=0 must be an integer >= 1"),
        ("model.image_size=16", "model.image_size=16 must be an integer >= 32"),
        ("model=vit_b_16 model.image_size=64", "model.image_size=64 does not fit vit_b_16 (Wrong image height"),
        ("model=convnext_tiny model.finetune.unfreeze=[layer4]", "layer4 is not a stage of convnext_tiny"),
        ("model=swin_t model.finetune.unfreeze=last_10", "swin_t has 8 stages (features.0 ... features.7)"),
        ("+nonexistent=1", "unknown config key 'nonexistent'"),
        ("model.head.dropout=1.5", "model.head.dropout=1.5 must be in"),
        ("ckpt_path=/no/such.ckpt", "ckpt_path=/no/such.ckpt does not exist"),
        ("objective.mode=maximize", "objective.mode='maximize' must be one of max, min"),
        ("objective.metric=test/acc", "objective.metric='test/acc' must be a validation metric"),
    ],
)
def test_bad_values_rejected_by_validation(override, message):
    cfg = compose_cfg("train", override.split())
    with pytest.raises(FmnistError, match=re.escape(message)):
        validate_config(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.image_size=64", "data.image_size moved to model.image_size; use model.image_size=64"),
        ("+data.channels_last=false", "data.channels_last moved to model.channels_last; use model.channels_last=false"),
        ("data.mean=[0.5,0.5,0.5]", "data.mean moved to model.mean; use model.mean=[0.5,0.5,0.5]"),
    ],
)
def test_a_moved_key_names_its_new_place(override, message):
    """The model owns its preprocessing: data.image_size/mean/std/channels_last are model.* keys now."""
    with pytest.raises(FmnistError) as err:
        validate_config(compose_cfg("train", [override]))
    assert str(err.value) == message
    assert compose_cfg("train", ["model.image_size=64"]).model.image_size == 64


@pytest.mark.parametrize("entry", ["evaluate", "export"])
def test_a_moved_key_added_with_plus_is_refused_by_the_schema_check(entry):
    """`+key=` slips past Hydra's struct check; the schema check gives the moved key's line, worded for the entry."""
    cfg = compose_cfg(entry, ["+data.channels_last=false"])
    with pytest.raises(FmnistError) as err:
        schemas.check_config(cfg)
    assert str(err.value) == (
        f"data.channels_last moved to model.channels_last; {entry} takes it from the checkpoint (ckpt_path): "
        "drop that override"
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, override, line",
    [
        ("fmnist_tl.train", "data.image_size=64", "data.image_size moved to model.image_size; use model.image_size=64"),
        (
            "fmnist_tl.evaluate",
            "data.std=[0.5,0.5,0.5]",
            "data.std moved to model.std; evaluate takes it from the checkpoint (ckpt_path): drop that override",
        ),
    ],
)
def test_cli_moved_key_one_line_exit_2(module, override, line, tmp_path):
    proc = run_cli(override, f"paths.root_dir={tmp_path}", module=module)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {line}"]
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "config_name, override, message",
    [
        ("train", "model.optimzer.lr=1", "unknown config key 'model.optimzer'; did you mean model.optimizer?"),
        ("train", "model.head.dropot=0.1", "unknown config key 'model.head.dropot'; did you mean model.head.dropout?"),
        ("train", "trainer.max_epoch=3", "unknown config key 'trainer.max_epoch'; did you mean trainer.max_epochs"),
        ("train", "data.batch_size=abc", "data.batch_size=abc: Value 'abc' of type 'str' could not be converted to"),
        (
            "train",
            "model=resnet99",
            "model=resnet99: no such option in model; choose one of convnext_tiny, "
            "efficientnet_b0, efficientnet_v2_s, mobilenet_v3_large, regnet_y_1_6gf, resnet18, resnet50, swin_t, "
            "vit_b_16",
        ),
        ("train", "+data.batch_size=3", "+data.batch_size: the key exists already; drop the +"),
        ("train", "data.batch_size==3", "Error parsing override 'data.batch_size==3'"),
        ("evaluate", "model.weights=null", "model.weights: evaluate takes the model from the checkpoint (ckpt_path)"),
        ("export", "model.backbone=resnet18", "model.backbone: export takes the model from the checkpoint (ckpt_path)"),
    ],
)
def test_hydra_override_errors_are_one_line(config_name, override, message):
    """What Hydra refuses while composing comes out as one FmnistError line naming the key."""
    with pytest.raises(FmnistError) as e:
        compose_cfg(config_name, [override])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "config_name, overrides, message",
    [
        ("evaluate", ["report.top_pairs=-1"], "report.top_pairs=-1 must be an integer >= 0"),
        ("evaluate", ["data.eval_batch_size=0"], "data.eval_batch_size=0 must be an integer >= 1 or null"),
        ("export", ["format=xyz"], "format='xyz' must be one of onnx, torchscript"),
        ("export", ["verify.num_images=2"], "verify.num_images=2 must be an integer >= 3"),
    ],
)
def test_entry_schemas_check_ranges(config_name, overrides, message):
    with pytest.raises(FmnistError, match=re.escape(message)):
        schemas.check_config(compose_cfg(config_name, ["ckpt_path=x.ckpt", *overrides]))


@pytest.mark.slow
@pytest.mark.parametrize(
    "module, override",
    [("fmnist_tl.evaluate", "model.weights=null"), ("fmnist_tl.train", "model.optimzer.lr=1")],
)
def test_cli_hydra_error_one_line(module, override, tmp_path):
    """Hydra's own multi-line report (and its HYDRA_FULL_ERROR hint) becomes our one line; with
    HYDRA_FULL_ERROR=1 the user gets the full trace."""
    proc = run_cli("ckpt_path=x.ckpt", override, f"paths.root_dir={tmp_path}", module=module)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: ")
    assert not list(tmp_path.iterdir())
    full = run_cli("ckpt_path=x.ckpt", override, env={**os.environ, "HYDRA_FULL_ERROR": "1"}, module=module)
    assert full.returncode != 0 and "Traceback" in full.stderr


# One refusal per path to the CLI's error line: our checks (every message is checked in-process
# above) and Hydra's composition. A CLI costs seconds of imports; the messages do not need one each.
@pytest.mark.slow
@pytest.mark.parametrize("override", ["model.optimizer.lr=-1", "+nonexistent=1"])
def test_cli_bad_override_one_line_exit_nonzero(override, tmp_path):
    proc = run_cli(override, f"paths.root_dir={tmp_path}", "model.weights=null")
    assert proc.returncode != 0
    err_lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert err_lines and err_lines[-1].startswith("error: ")
    assert "Traceback" not in proc.stderr
    # Nothing was trained: no checkpoint anywhere under the run root.
    assert not list(tmp_path.rglob("*.ckpt"))


def test_slurm_launcher_asks_for_what_the_trainer_uses():
    """hydra/launcher=slurm: one task per GPU on each node, so Lightning's DDP takes its ranks from SLURM."""
    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    cfg = compose_cfg("train", [*overrides, "hydra.launcher.partition=gpu"], hydra=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)
    assert launcher["partition"] == "gpu" and launcher["timeout_min"] == 60
    assert launcher["cpus_per_task"] and launcher["mem_gb"] and launcher["array_parallelism"]


@pytest.mark.parametrize("override", ["trainer=gpu", "trainer=ddp", "trainer.accelerator=gpu"])
def test_a_gpu_trainer_without_a_gpu_is_one_line(override, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FmnistError) as e:
        validate_config(compose_cfg("train", [override]))
    assert str(e.value) == (
        "trainer.accelerator=gpu asks for a GPU, but this machine has none (torch.cuda.is_available() is False); "
        "use trainer=cpu, or trainer=default (any device)"
    )


def test_more_gpus_than_the_machine_has_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(FmnistError, match=re.escape("trainer.devices=2 asks for 2 GPUs, but this machine has 1")):
        validate_config(compose_cfg("train", ["trainer=ddp"]))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without a GPU")
def test_cli_gpu_trainer_without_a_gpu_exit_2_and_no_run_dir(tmp_path):
    proc = run_cli("trainer=gpu", f"paths.root_dir={tmp_path}", "model.weights=null")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: trainer.accelerator=gpu asks for a GPU, but this machine has none "
        "(torch.cuda.is_available() is False); use trainer=cpu, or trainer=default (any device)"
    ]
    assert not list(tmp_path.glob("logs/train/runs/*"))


# One test per kind of error Hydra or OmegaConf raises while composing: hydra_error_line reads each
# one's fields (missing_cfg_file, options, override, full_key, value), never its wording.
@pytest.mark.parametrize(
    "override, kind, line",
    [
        ("data.batch_size==3", "OverrideParseException", "Error parsing override 'data.batch_size==3' (extraneous"),
        ("model/scheduler=nope", "MissingConfigException", "model/scheduler=nope: no such option in model/scheduler; "
         "choose one of cosine, onecycle"),
        ("hydra/launcher=nope", "MissingConfigException", "hydra/launcher=nope: no such option in hydra/launcher; "
         "choose one of basic, joblib, slurm, submitit_local, submitit_slurm"),
        ("model.optimzer.lr=1", "ConfigKeyError", "unknown config key 'model.optimzer'; did you mean model.optimizer?"),
        ("model.head.dropot=0.1", "ConfigAttributeError",
         "unknown config key 'model.head.dropot'; did you mean model.head.dropout?"),
        ("data.batch_size=abc", "ValidationError", "data.batch_size=abc: Value 'abc' of type 'str' could not be "
         "converted to Integer (see conf/train.yaml and its groups)"),
        ("+data.batch_size=3", "ConfigCompositionException", "+data.batch_size: the key exists already; drop the + "
         "(write data.batch_size=...)"),
        ("~model.nothere", "ConfigCompositionException",
         "Could not delete from config. 'model.nothere' does not exist."),
    ],
)  # fmt: skip
def test_each_hydra_error_type_is_its_own_first_line_and_our_hint(override, kind, line):
    with pytest.raises(FmnistError) as e:
        compose_cfg("train", [override])
    hydra_error = e.value.__cause__
    assert kind in {type(hydra_error).__name__, type(hydra_error.__cause__).__name__}
    assert str(e.value).startswith(line) and "\n" not in str(e.value)


def test_the_options_of_a_group_come_from_hydras_config_repository():
    """A group's options as Hydra finds them, less our schema entries: a new option file shows up at once."""
    with pytest.raises(FmnistError) as e:
        compose_cfg("train", ["trainer=nope"])
    options = [o.removeprefix("trainer=") for o in config_options() if o.startswith("trainer=")]
    assert str(e.value) == f"trainer=nope: no such option in trainer; choose one of {', '.join(options)}"
