"""Training-time distillation: frozen teachers, adapters, and the MoVE-KD loss (METHOD.md sections 1, 3, 4)."""

from .adapters import ResampleAdapter, StudentPredictionHead, TokenMixAdapter, build_adapter
from .distiller import FeatureStandardizer, MoVEKDDistiller, TeacherShape
from .losses import KD_LOSS_PRESETS, KDLossConfig, mole_balance_loss
from .presets import (
    PAPER_TEACHERS,
    TEACHER_SETS,
    clip_teacher,
    convnext_teacher,
    eva_teacher,
    sam_teacher,
    teacher_specs,
)
from .teachers import Teacher, TeacherOutput, TeacherSpec, build_teacher

__all__ = [
    "KD_LOSS_PRESETS",
    "PAPER_TEACHERS",
    "TEACHER_SETS",
    "FeatureStandardizer",
    "KDLossConfig",
    "MoVEKDDistiller",
    "ResampleAdapter",
    "StudentPredictionHead",
    "Teacher",
    "TeacherOutput",
    "TeacherShape",
    "TeacherSpec",
    "TokenMixAdapter",
    "build_adapter",
    "build_teacher",
    "clip_teacher",
    "convnext_teacher",
    "eva_teacher",
    "mole_balance_loss",
    "sam_teacher",
    "teacher_specs",
]
