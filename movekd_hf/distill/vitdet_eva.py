"""EVA-02 as a ViTDet detection backbone: the paper's `eva` teacher (METHOD.md section 1).

Neither transformers nor timm ships this variant (timm's EVA-02 is the patch-14 classification/CLIP model), so it is
written here: patch 16, SwiGLU MLP with a sub-layer norm, 2D rotary embeddings, separate q/k/v projections with q/v
biases only, 16 x 16-token window attention except in the global blocks, no final norm. Parameter names follow the
authors' detectron2 layout, so `eva02_L_coco_det_sys_o365.pth` loads by stripping its `backbone.net.` prefix.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CHECKPOINT_PREFIX = "backbone.net."


@dataclass
class EVA02ViTDetConfig:
    """Architecture of the EVA-02 ViTDet backbone. Defaults are EVA-02-L at 1024 px (METHOD.md section 1)."""

    image_size: int = 1024
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    mlp_ratio: float = 4 * 2 / 3
    window_size: int = 16
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11, 14, 17, 20, 23)
    # The absolute position table is stored at the pre-training grid (224 / 16 = 14, plus a CLS slot) and
    # resampled to the input grid; the rotary tables are defined on a 16-step reference grid.
    pretrain_image_size: int = 224
    rope_reference_grid: int = 16
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        self.global_attn_indexes = tuple(int(i) for i in self.global_attn_indexes)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if (self.hidden_size // self.num_attention_heads) % 4:
            raise ValueError(
                f"head dim {self.hidden_size // self.num_attention_heads} must be divisible by 4 for 2D rotary embeddings"
            )
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} out of range for num_hidden_layers={self.num_hidden_layers}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


def rotary_tables(
    head_dim: int, grid: tuple[int, int], reference: int, theta: float, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of EVA-02's 2D rotary embedding for a `grid` of (h, w) positions.

    Half the head dims rotate with the row index, half with the column index; positions are rescaled onto a
    `reference`-step grid (how EVA-02 transfers rotary frequencies across resolutions). Returns two [h*w, head_dim].
    """
    axis_dim = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, axis_dim, 2, device=device, dtype=torch.float32) / axis_dim)
    per_axis = []
    for length in grid:
        t = torch.arange(length, device=device, dtype=torch.float32) / length * reference
        per_axis.append(torch.outer(t, freqs).repeat_interleave(2, dim=-1))  # [length, axis_dim]
    h, w = grid
    angles = torch.cat(
        [per_axis[0][:, None, :].expand(h, w, axis_dim), per_axis[1][None, :, :].expand(h, w, axis_dim)], dim=-1
    ).reshape(h * w, head_dim)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin). x: [..., N, D]; cos/sin: [N, D]."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """[B, H, W, C] -> [B * nW, window, window, C], zero-padding H and W up to multiples of `window`."""
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: torch.Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]):
    """Inverse of `window_partition`: [B * nW, window, window, C] -> [B, H, W, C]."""
    hp, wp = padded
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(b, hp // window, wp // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, -1)[:, : size[0], : size[1]]


class EVA02PatchEmbed(nn.Module):
    def __init__(self, config: EVA02ViTDetConfig):
        super().__init__()
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values).permute(0, 2, 3, 1)  # [B, h, w, C]


class EVA02Attention(nn.Module):
    """Multi-head attention with rotary q/k. The authors' layout keeps bias-free projections plus separate
    q and v biases (no k bias: it would cancel in the softmax)."""

    def __init__(self, config: EVA02ViTDetConfig):
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        q = F.linear(x, self.q_proj.weight, self.q_bias)
        k = F.linear(x, self.k_proj.weight)
        v = F.linear(x, self.v_proj.weight, self.v_bias)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))  # [B, H, N, hd]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, c))


class EVA02SwiGLU(nn.Module):
    def __init__(self, config: EVA02ViTDetConfig):
        super().__init__()
        hidden = int(config.hidden_size * config.mlp_ratio)
        self.w1 = nn.Linear(config.hidden_size, hidden)
        self.w2 = nn.Linear(config.hidden_size, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.w3 = nn.Linear(hidden, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class EVA02Block(nn.Module):
    def __init__(self, config: EVA02ViTDetConfig, window_size: int):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = EVA02Attention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = EVA02SwiGLU(config)

    def forward(self, x: torch.Tensor, rope: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            size = x.shape[1:3]
            x, padded = window_partition(x, self.window_size)
            x = self.attn(x, *rope["window"])
            x = window_unpartition(x, self.window_size, padded, size)
        else:
            x = self.attn(x, *rope["global"])
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class EVA02ViTDet(nn.Module):
    """EVA-02 ViTDet backbone. forward(pixel_values [B, 3, H, W]) -> last block's map [B, C, H/16, W/16]."""

    def __init__(self, config: EVA02ViTDetConfig):
        super().__init__()
        self.config = config
        self.patch_embed = EVA02PatchEmbed(config)
        pretrain_grid = config.pretrain_image_size // config.patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pretrain_grid**2, config.hidden_size))
        self.blocks = nn.ModuleList(
            EVA02Block(config, 0 if i in config.global_attn_indexes else config.window_size)
            for i in range(config.num_hidden_layers)
        )
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def absolute_positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """The pre-training position table without its CLS slot, resampled (bicubic) to `grid`: [1, h, w, C]."""
        table = self.pos_embed[:, 1:]
        side = math.isqrt(table.shape[1])
        table = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if (side, side) != tuple(grid):
            table = F.interpolate(table, size=grid, mode="bicubic", align_corners=False)
        return table.permute(0, 2, 3, 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values)  # [B, h, w, C]
        grid = (x.shape[1], x.shape[2])
        x = x + self.absolute_positions(grid)
        cfg = self.config
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        # Rotary tables are recomputed from the grid rather than stored, so they follow device and input size.
        window = (cfg.window_size, cfg.window_size)
        rope = {
            "window": rotary_tables(head_dim, window, cfg.rope_reference_grid, cfg.rope_theta, x.device),
            "global": rotary_tables(head_dim, grid, cfg.rope_reference_grid, cfg.rope_theta, x.device),
        }
        for block in self.blocks:
            x = block(x, rope)
        return x.permute(0, 3, 1, 2)  # [B, C, h, w]


def _read_checkpoint(path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if isinstance(path_or_state_dict, Mapping):
        state = path_or_state_dict
    elif str(path_or_state_dict).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path_or_state_dict))
    else:
        state = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
    # detectron2 checkpoints wrap the weights as {"model": state_dict, ...}.
    if "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    return state


def load_eva02_det_state_dict(
    model: EVA02ViTDet, path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor]
) -> EVA02ViTDet:
    """Load the authors' detection checkpoint (keys under `backbone.net.`) or a bare backbone state dict.

    Rotary buffers are skipped (recomputed); detector heads outside `backbone.net.` are ignored. Any other key
    the backbone does not have, any missing key and any shape mismatch raise a ValueError naming them.
    """
    state = _read_checkpoint(path_or_state_dict)
    prefixed = any(k.startswith(CHECKPOINT_PREFIX) for k in state)
    weights = {}
    for key, value in state.items():
        if prefixed:
            if not key.startswith(CHECKPOINT_PREFIX):
                continue
            key = key[len(CHECKPOINT_PREFIX) :]
        if any(part.startswith("rope") for part in key.split(".")):
            continue  # rope, rope_win, rope_glb: rotary tables are recomputed
        weights[key] = value
    expected = model.state_dict()
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise ValueError(f"EVA-02 ViTDet checkpoint has keys the backbone does not: {unexpected[:10]}")
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"EVA-02 ViTDet checkpoint lacks backbone keys: {missing[:10]}")
    for key, value in weights.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            hint = " (set pretrain_image_size to match)" if key == "pos_embed" else ""
            raise ValueError(
                f"EVA-02 ViTDet checkpoint key {key!r} has shape {tuple(value.shape)}, "
                f"the backbone expects {tuple(expected[key].shape)}{hint}"
            )
    model.load_state_dict(weights, strict=True, assign=expected["pos_embed"].is_meta)
    return model
