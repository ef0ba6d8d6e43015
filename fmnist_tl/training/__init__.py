"""The LightningModule, its fine-tune options and LR plan, callbacks, checkpoints and precision."""

from fmnist_tl.training.callbacks import (
    AtomicCheckpointIO,
    FitProgress,
    ModelCheckpoint,
    ModelSummary,
    OnExceptionCheckpoint,
    RecordTestOutputs,
    ReseedEachEpoch,
    SilenceKnownNoise,
    fit_progress,
    silence_known_noise,
)
from fmnist_tl.training.checkpoints import check_checkpoint_file, check_resume_schedule, resolve_ckpt_path
from fmnist_tl.training.finetune import check_finetune, finetune_options
from fmnist_tl.training.lr_plan import legacy_lr_plan, schedule_kind
from fmnist_tl.training.model import TransferClassifier, build_head
from fmnist_tl.training.precision import resolve_precision

__all__ = [
    "AtomicCheckpointIO",
    "build_head",
    "check_checkpoint_file",
    "check_finetune",
    "check_resume_schedule",
    "finetune_options",
    "fit_progress",
    "FitProgress",
    "legacy_lr_plan",
    "ModelCheckpoint",
    "ModelSummary",
    "OnExceptionCheckpoint",
    "RecordTestOutputs",
    "ReseedEachEpoch",
    "resolve_ckpt_path",
    "resolve_precision",
    "schedule_kind",
    "silence_known_noise",
    "SilenceKnownNoise",
    "TransferClassifier",
]
