"""The Hub: model cards built from a run folder, one-commit publishing, conversion of the authors' checkpoints,
and export of the distilled student encoder."""

from .card import build_model_card, render_repo_files, write_card
from .convert import convert_authors_checkpoint
from .export import export_student_encoder
from .publish import PushError, collect_upload_files, push_run

__all__ = [
    "PushError",
    "build_model_card",
    "collect_upload_files",
    "convert_authors_checkpoint",
    "export_student_encoder",
    "push_run",
    "render_repo_files",
    "write_card",
]
