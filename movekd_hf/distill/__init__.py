"""Training-time distillation: frozen teachers, adapters, and the MoVE-KD loss (METHOD.md sections 1, 3, 4)."""

from .adapters import ResampleAdapter, StudentPredictionHead, TokenMixAdapter, build_adapter
from .cache import CachedTeachers, CacheSettings
from .distiller import FeatureStandardizer, MoVEKDDistiller, TeacherShape
from .losses import KD_LOSS_PRESETS, KDLossConfig, mole_balance_loss
from .presets import (
    MODERN_TEACHERS,
    PAPER_TEACHERS,
    TEACHER_SETS,
    aimv2_teacher,
    clip_teacher,
    convnext_teacher,
    dinov3_convnext_teacher,
    dinov3_teacher,
    eva_teacher,
    radio_teacher,
    sam2_teacher,
    sam3_teacher,
    sam_teacher,
    siglip2_teacher,
    teacher_specs,
)
from .teacher_by_id import teacher_from_pretrained
from .teachers import Teacher, TeacherOutput, TeacherSpec, build_teacher

__all__ = [
    "KD_LOSS_PRESETS",
    "MODERN_TEACHERS",
    "PAPER_TEACHERS",
    "TEACHER_SETS",
    "CacheSettings",
    "CachedTeachers",
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
    "aimv2_teacher",
    "build_adapter",
    "build_teacher",
    "clip_teacher",
    "convnext_teacher",
    "dinov3_convnext_teacher",
    "dinov3_teacher",
    "eva_teacher",
    "mole_balance_loss",
    "radio_teacher",
    "sam2_teacher",
    "sam3_teacher",
    "sam_teacher",
    "siglip2_teacher",
    "teacher_from_pretrained",
    "teacher_specs",
]
