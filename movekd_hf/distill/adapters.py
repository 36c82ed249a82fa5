"""Adapters between a teacher's token space and the student's (METHOD.md section 3).

Every adapter has the same call: `adapter(tokens, grid, target_grid) -> tokens`, with `direction` saying which
side it maps. Teacher-to-student adapters (the paper's direction) map teacher tokens onto the student's grid and
width; the student-to-teacher head (as RADIO and Theia use) maps student tokens into a teacher's space instead.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling.llava_conventions import resample_tokens

ADAPTER_KINDS = ("token_mix", "resample", "student_head")


class TokenMixAdapter(nn.Module):
    """The paper's adapter: Linear(C_t -> D) on channels, GELU, Linear(N_t -> N_s) across the token axis.

    Fixed to one teacher token count and one student token count (one input resolution)."""

    direction = "teacher_to_student"

    def __init__(self, teacher_dim: int, student_dim: int, num_teacher_tokens: int, num_student_tokens: int):
        super().__init__()
        self.num_teacher_tokens = num_teacher_tokens
        self.channel_proj = nn.Linear(teacher_dim, student_dim)
        self.act = nn.GELU()
        self.token_proj = nn.Linear(num_teacher_tokens, num_student_tokens)

    def forward(self, tokens: torch.Tensor, grid=None, target_grid=None) -> torch.Tensor:
        """tokens [B, N_t, C_t] -> [B, N_s, D]."""
        if tokens.shape[1] != self.num_teacher_tokens:
            raise ValueError(
                f"TokenMixAdapter was built for {self.num_teacher_tokens} teacher tokens, got {tokens.shape[1]}; "
                "use the 'resample' adapter for other input sizes"
            )
        x = self.act(self.channel_proj(tokens))  # [B, N_t, D]
        return self.token_proj(x.transpose(1, 2)).transpose(1, 2)  # [B, N_s, D]


class ChannelMLP(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ResampleAdapter(nn.Module):
    """Resolution-free teacher-to-student adapter: resample the teacher grid onto the student grid, then a
    channel MLP (C_t -> hidden -> D). No parameter depends on a token count, so any input size works."""

    direction = "teacher_to_student"

    def __init__(self, teacher_dim: int, student_dim: int, hidden_dim: int | None = None):
        super().__init__()
        self.mlp = ChannelMLP(teacher_dim, hidden_dim or student_dim, student_dim)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], target_grid: tuple[int, int]) -> torch.Tensor:
        """tokens [B, h*w, C_t] on `grid` -> [B, th*tw, D] on `target_grid` (the student's)."""
        # Resample first: the MLP then runs on the (usually fewer) student positions.
        return self.mlp(resample_tokens(tokens, grid, target_grid))


class StudentPredictionHead(nn.Module):
    """Student-to-teacher head: a channel MLP (D -> hidden -> C_t) on the student tokens, resampled onto the
    teacher's grid, so the loss is taken in the teacher's own space and the teacher's tokens stay untouched."""

    direction = "student_to_teacher"

    def __init__(self, student_dim: int, teacher_dim: int, hidden_dim: int | None = None):
        super().__init__()
        self.mlp = ChannelMLP(student_dim, hidden_dim or max(student_dim, teacher_dim), teacher_dim)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], target_grid: tuple[int, int]) -> torch.Tensor:
        """student tokens [B, h*w, D] on `grid` -> [B, th*tw, C_t] on `target_grid` (the teacher's)."""
        return resample_tokens(self.mlp(tokens), grid, target_grid)


def build_adapter(
    kind: str,
    teacher_dim: int,
    student_dim: int,
    num_teacher_tokens: int | None = None,
    num_student_tokens: int | None = None,
    hidden_dim: int | None = None,
) -> nn.Module:
    """One adapter for one teacher. kind: "token_mix" (faithful), "resample", or "student_head"."""
    if kind == "token_mix":
        if not num_teacher_tokens or not num_student_tokens:
            raise ValueError("adapter kind 'token_mix' needs num_teacher_tokens and num_student_tokens")
        return TokenMixAdapter(teacher_dim, student_dim, num_teacher_tokens, num_student_tokens)
    if kind == "resample":
        return ResampleAdapter(teacher_dim, student_dim, hidden_dim)
    if kind == "student_head":
        return StudentPredictionHead(student_dim, teacher_dim, hidden_dim)
    raise ValueError(f"adapter kind {kind!r} is unknown; expected one of {ADAPTER_KINDS}")
