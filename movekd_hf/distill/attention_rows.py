"""The anchor's attention rows a teacher returns with its tokens (METHOD.md section 4): the CLS query's attention
over the patch keys of a CLIP-style layer (`TeacherSpec.cls_attention`), and the probe's attention of SigLIP's
attention-pooling head (`TeacherSpec.pool_attention`, the stand-in for a student without CLS)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..modeling.mole import upcast

# ----------------------------------------------------------------------------------------- CLS attention row


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The `encoder.layers` list of a CLIP/SigLIP-style model; `TypeError` for a model without one."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.endswith("encoder.layers"):
            return module
    raise TypeError(
        f"{type(model).__name__} has no `encoder.layers`; cls_attention supports CLIP/SigLIP-style encoders"
    )


def cls_attention_row(normed: torch.Tensor, attention: nn.Module) -> torch.Tensor:
    """CLS query's attention over the patch keys, from a layer's normalised input.

    normed: [B, 1 + N, D] (the layer's input after layer_norm1); attention: module with q_proj, k_proj,
    num_heads, head_dim, scale. Softmax over all 1 + N keys (in at least float32), keep the N patch keys, mean over
    heads. Returns [B, N] in `normed`'s dtype.
    """
    b, n, _ = normed.shape
    q = attention.q_proj(normed[:, :1]).view(b, 1, attention.num_heads, attention.head_dim).transpose(1, 2)
    k = attention.k_proj(normed).view(b, n, attention.num_heads, attention.head_dim).transpose(1, 2)
    scores = (upcast(q) @ upcast(k).transpose(-1, -2)) * attention.scale  # [B, H, 1, 1 + N]
    probs = scores.softmax(dim=-1)
    return probs[:, :, 0, 1:].mean(dim=1).to(normed.dtype)


# ------------------------------------------------------------------------------ attention-pooling head row


def _pooling_head(model: nn.Module) -> nn.Module:
    """The attention-pooling head of a SigLIP-style vision model: `head` with a `probe` query and an
    `nn.MultiheadAttention` (on transformers 4.x under `.vision_model`)."""
    head = getattr(getattr(model, "vision_model", model), "head", None)
    if (
        head is None
        or not hasattr(head, "probe")
        or not isinstance(getattr(head, "attention", None), nn.MultiheadAttention)
    ):
        raise TypeError(
            f"{type(model).__name__} has no attention-pooling head (`head.probe`, `head.attention`); pool_attention "
            "supports SigLIP-style towers built with vision_use_head=True"
        )
    return head


def pool_attention_row(tokens: torch.Tensor, probe: torch.Tensor, attention: nn.MultiheadAttention) -> torch.Tensor:
    """The probe query's attention over the tokens of an attention-pooling head (SigLIP's MAP head), recomputed
    from the head's `nn.MultiheadAttention` projections, so it works under any attention backend.

    tokens: [B, N, D], the head's input (SigLIP: the tower's final, post-layernormed tokens); probe: [1, 1, D].
    Softmax over the N keys with scale head_dim^-0.5, in at least float32, then the mean over heads (what
    `attention(probe, tokens, tokens, need_weights=True)` returns as weights). Returns [B, N] in `tokens`' dtype,
    rows sum to 1. Raises `ValueError` for an attention with extra keys (`bias_k`, `add_zero_attn`).
    """
    if attention.bias_k is not None or attention.add_zero_attn:
        raise ValueError("pool_attention_row: an attention with bias_k / add_zero_attn attends beyond the tokens")
    dim, heads = attention.embed_dim, attention.num_heads
    if attention.in_proj_weight is not None:  # q, k, v packed
        w_q, w_k = attention.in_proj_weight[:dim], attention.in_proj_weight[dim : 2 * dim]
    else:
        w_q, w_k = attention.q_proj_weight, attention.k_proj_weight
    bias = attention.in_proj_bias
    b_q, b_k = (None, None) if bias is None else (upcast(bias[:dim]), upcast(bias[dim : 2 * dim]))
    b, n, _ = tokens.shape
    q = F.linear(upcast(probe.reshape(1, -1)), upcast(w_q), b_q).view(heads, dim // heads)  # [H, d]
    k = F.linear(upcast(tokens), upcast(w_k), b_k).view(b, n, heads, dim // heads)  # [B, N, H, d]
    scores = torch.einsum("hd,bnhd->bhn", q, k) * (dim // heads) ** -0.5  # [B, H, N]
    return scores.softmax(dim=-1).mean(dim=1).to(tokens.dtype)


def hook_pooling_head(model: nn.Module, captured: dict[str, torch.Tensor]):
    """Record the pooling head's output (`pooled`) and its probe row (`pool_attention`) in `captured` on the
    next forward; returns the hook handle."""
    head = _pooling_head(model)

    def hook(module, args, kwargs, output):
        tokens = args[0] if args else next(iter(kwargs.values()))
        captured["pool_attention"] = pool_attention_row(tokens, module.probe, module.attention)
        captured["pooled"] = output

    return head.register_forward_hook(hook, with_kwargs=True)
