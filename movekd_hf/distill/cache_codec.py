"""How a teacher-feature cache stores tokens: the optional channel compression and the number format.

cache.py keys, reads and streams caches, cache_writer.py writes them; both encode and decode tokens through the
`TokenCodec` here, and the basis a compressed cache is written with lives next to its rows in `PROJECTION_FILE`.

Compression (optional, per teacher; `compression` picks the kind, `compress` the rank k per teacher):
- "random": a fixed random orthogonal projection Q [C, k] (seeded). The cache keeps Q^T t per token and training
  reads Q Q^T t: the teacher's features projected onto a random k-dimensional subspace. It needs no pass over the
  data; `cache.json` records the fraction of feature energy kept.
- "pca": a basis fitted on a calibration pass over `calibration_images` images (a seeded pick of the dataset): the
  mean mu [C], the top-k principal directions V [C, k] of the stored tokens and each coordinate's standard
  deviation s [k]. The cache keeps z = (t - mu) V / s (whitened, so every stored channel has unit variance and a
  per-token int8 scale fits all of them) and training reads mu + (z * s) V^T. On features with a decaying spectrum
  (trained teachers) it keeps far more than a random subspace of the same size.
Both store the basis in `projection.safetensors`; a PCA cache's `cache.json` key also holds the basis's sha256,
checked on every read, and a writer never refits a basis for shards already written.

Number format (`token_dtype`, every teacher): float16 (default); int8 with one float32 scale per token (absmax /
127, `token_scales` column); float8_e4m3fn (stored as its uint8 bits, absmax / 448 per token). The anchor teacher's
tokens are compared with the student's directly, so compress it (`compress`) only knowingly; quantising it changes
them by its int8/fp8 rounding only (see benchmarks/README.md for the measured fidelity). Compression and number
format apply to the tokens alone: the per-image vectors (`cls`, `cls_attention`, `pooled`, `pool_attention`; one C-
or N_t-vector each, small beside N x C tokens) are always stored as float32, so the anchor's summary and the
attention row its token weights come from are read back exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PROJECTION_FILE = "projection.safetensors"
TOKEN_DTYPE = "float16"  # the default number format
COMPRESSION_KINDS = ("random", "pca")
# Stored number formats: Arrow value type, bytes per value, the largest stored magnitude (None: no scale).
TOKEN_DTYPES = {"float16": ("float16", 2, None), "int8": ("int8", 1, 127.0), "float8_e4m3fn": ("uint8", 1, 448.0)}


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of `tensors` (sorted by name): the identity of a fitted basis."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def random_orthogonal(channels: int, rank: int, seed: int) -> torch.Tensor:
    """[channels, rank] with orthonormal columns (QR of a seeded Gaussian matrix, signs fixed)."""
    if rank > channels:
        raise ValueError(f"compression to {rank} channels needs at least {rank} teacher channels, got {channels}")
    gaussian = torch.randn(channels, rank, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))).float()  # sign fix: the factorisation is then unique


def pca_basis(total: torch.Tensor, outer: torch.Tensor, count: int, rank: int) -> dict[str, torch.Tensor]:
    """The top-`rank` principal directions of tokens summarised by their sum `total` [C], the sum of their outer
    products `outer` [C, C] (float64) and their number `count`.

    Returns float32 {"mean": [C], "projection": [C, k] orthonormal columns by decreasing variance, "scale": [k]
    the standard deviation along each (floored at 1e-6 of the largest, so whitening never divides by zero)}.
    Each column's sign makes its largest-magnitude entry positive, so the same statistics give the same bytes.
    """
    channels = total.shape[0]
    if rank > channels:
        raise ValueError(f"compression to {rank} channels needs at least {rank} teacher channels, got {channels}")
    if count < 2:
        raise ValueError(f"a PCA basis needs at least 2 calibration tokens, got {count}")
    mean = total / count
    covariance = (outer - count * torch.outer(mean, mean)) / (count - 1)  # [C, C]
    variances, vectors = torch.linalg.eigh(covariance)  # ascending
    variances, vectors = variances.flip(0)[:rank], vectors.flip(1)[:, :rank]
    peaks = vectors.gather(0, vectors.abs().argmax(0, keepdim=True))  # [1, k]
    vectors = vectors * torch.sign(peaks)
    scale = variances.clamp_min(0).sqrt()
    scale = scale.clamp_min(1e-6 * float(scale.max().clamp_min(1e-30)))
    return {"mean": mean.float(), "projection": vectors.float().contiguous(), "scale": scale.float()}


@dataclass
class TokenCodec:
    """How one teacher's tokens [B, N, C] are stored: an optional affine map to k channels, z = ((t - mean) @
    projection) / scale (random: projection only; pca: all three), then a number format (TOKEN_DTYPES) with a
    per-token absmax scale for the quantised ones. `decode(encode(t))` is t up to the subspace and the rounding."""

    token_dtype: str = TOKEN_DTYPE
    projection: torch.Tensor | None = None  # [C, k]
    mean: torch.Tensor | None = None  # [C]
    scale: torch.Tensor | None = None  # [k]

    def tensors(self) -> dict[str, torch.Tensor]:
        named = {"projection": self.projection, "mean": self.mean, "scale": self.scale}
        return {name: t.contiguous() for name, t in named.items() if t is not None}

    def encode(self, tokens: torch.Tensor) -> dict[str, np.ndarray]:
        """tokens [B, N, C] (float32 or wider) -> {"tokens": [B, N * k] in the storage type, and for quantised
        formats "token_scales": [B, N] float32}."""
        z = tokens if self.mean is None else tokens - self.mean.to(tokens)
        z = z if self.projection is None else z @ self.projection.to(tokens)
        z = z if self.scale is None else z / self.scale.to(tokens)  # [B, N, k]
        limit = TOKEN_DTYPES[self.token_dtype][2]
        if limit is None:
            return {"tokens": z.to(torch.float16).flatten(1).cpu().numpy()}
        scales = (z.abs().amax(-1, keepdim=True) / limit).float().clamp_min(torch.finfo(torch.float32).tiny)
        scaled = z / scales.to(z)
        if self.token_dtype == "int8":
            stored = scaled.round().clamp(-limit, limit).to(torch.int8)
        else:  # float8 e4m3: Arrow has no such type, its bytes go as uint8
            stored = scaled.clamp(-limit, limit).to(torch.float8_e4m3fn).view(torch.uint8)
        return {"tokens": stored.flatten(1).cpu().numpy(), "token_scales": scales.squeeze(-1).cpu().numpy()}

    def decode(self, stored: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
        """stored [B, N, k] as read (float16, int8 or the uint8 bits of float8) and scales [B, N] -> float32
        tokens [B, N, C] back in the teacher's channels."""
        if self.token_dtype == "float8_e4m3fn":
            stored = stored.view(torch.float8_e4m3fn)
        z = stored.float()
        if scales is not None:
            z = z * scales.float().unsqueeze(-1)
        if self.scale is not None:
            z = z * self.scale.to(z)
        if self.projection is not None:
            z = z @ self.projection.to(z).t()
        return z if self.mean is None else z + self.mean.to(z)


def load_codec(directory: Path, meta: Mapping) -> TokenCodec:
    """The codec a cache was written with: its number format and, when compressed, the basis stored next to it,
    whose sha256 must match the key's `basis_sha256` when the key has one (a refitted basis never reads old rows)."""
    token_dtype = meta["shape"].get("token_dtype", TOKEN_DTYPE)
    path = directory / PROJECTION_FILE
    if not path.exists():
        if meta["key"].get("compression") is not None:
            raise ValueError(f"cache {directory} is compressed but has no {PROJECTION_FILE}")
        return TokenCodec(token_dtype)
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    expected = meta["key"].get("basis_sha256")
    if expected is not None and tensors_sha256(tensors) != expected:
        raise ValueError(
            f"cache {directory}: {PROJECTION_FILE} is not the basis its rows were written with (sha256 "
            f"{tensors_sha256(tensors)[:12]}, key has {expected[:12]}); rebuild the cache"
        )
    return TokenCodec(token_dtype, **tensors)
