"""PHI-S: the Hadamard-rotated isotropic standardisation of teacher features.

Source: Ranzinger, Heinrich, Molchanov, Kautz, Catanzaro, Tao, "PHI-S: Distribution Balancing for Label-Free
Multi-Teacher Distillation" (arXiv 2410.01680, 2024), the standardisation behind RADIOv2.5; the authors' reference
code is NVlabs/RADIO `examples/common/phi_s.py` and `examples/common/hadamard.py` (read, not copied).

Per teacher, with mean mu and covariance Sigma = U diag(lambda) U^T of its tokens (one calibration pass):

    x' = (1 / alpha) H U^T (x - mu),    alpha^2 = mean(lambda),

with H a normalised Hadamard matrix (H H^T = I, every entry +-1/sqrt(C)). The covariance of x' is
H diag(lambda) H^T / alpha^2, whose diagonal is mean(lambda) / alpha^2 = 1: every channel has unit variance, the
total variance is C, and no channel dominates a loss (it is not whitening: the off-diagonal terms stay).

Hadamard matrices: Sylvester (C a power of two), Paley I (C = q + 1, q a prime = 3 mod 4), Paley II
(C = 2(q + 1), q a prime = 1 mod 4), and Kronecker products of a Sylvester matrix with a Paley one, as RADIO
builds them. Every teacher width here has one: 1024, 256 (Sylvester), 1152 = 32 x 36 (Paley II, q = 17),
1536 = 128 x 12 and 48 = 4 x 12 (Paley I, q = 11), 1280 = 64 x 20 and 40 = 2 x 20 (q = 19), 24 = 2 x 12, 44 (q = 43).
No Hadamard matrix exists for C > 2 not divisible by 4. There RADIO falls back to a random +-1 matrix made
orthogonal by QR, which leaves the channel variances only roughly equal; this module instead rotates the
eigenbasis by Givens rotations until every diagonal entry equals mean(lambda) (the Bendel-Mickey construction,
Bendel & Mickey 1978, "Population correlation matrices for sampling experiments"): deterministic, and the
variances are exactly one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..modeling.mole import upcast

# ------------------------------------------------------------------------------------------ Hadamard matrices


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _sylvester(n: int) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix (+-1 entries), n a power of two."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i), chi the quadratic character mod the prime q (0 at 0): [q, q]."""
    squares = {(k * k) % q for k in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if r in squares else -1.0 for r in range(1, q)], dtype=torch.float64)
    index = torch.arange(q)
    return chi[(index[None, :] - index[:, None]) % q]


def _paley(q: int) -> torch.Tensor:
    """Paley I (q = 3 mod 4, size q + 1) or Paley II (q = 1 mod 4, size 2(q + 1)) Hadamard matrix, q prime."""
    jac = _jacobsthal(q)
    ones = torch.ones(q, dtype=torch.float64)
    if q % 4 == 3:  # I + S with S = [[0, 1^T], [-1, Q]] skew-symmetric, S S^T = q I
        s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = ones, -ones, jac
        return torch.eye(q + 1, dtype=torch.float64) + s
    # Symmetric conference matrix C = [[0, 1^T], [1, Q]]: zeros -> [[1, -1], [-1, -1]], +-1 -> +-[[1, 1], [1, -1]].
    conference = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    conference[0, 1:], conference[1:, 0], conference[1:, 1:] = ones, ones, jac
    zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    sign_block = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(conference, sign_block) + torch.kron((conference == 0).double(), zero_block)


def _paley_order(m: int) -> int | None:
    """The prime q of a Paley matrix of size m, or None."""
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return m - 1
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return m // 2 - 1
    return None


def hadamard_matrix(n: int) -> torch.Tensor | None:
    """A normalised n x n Hadamard matrix (H H^T = I, entries +-1/sqrt(n)) in float64, built as Sylvester x Paley
    (see the module docstring); None when no such construction exists (always for n > 2 not divisible by 4)."""
    if n < 1:
        raise ValueError(f"hadamard_matrix needs n >= 1, got {n}")
    power = 1
    while n % (power * 2) == 0:
        power *= 2
    # Largest Sylvester factor first: power 2^k, then 2^(k-1) with a Paley factor twice as large, ...
    while power >= 1:
        rest = n // power
        if rest == 1:
            return _sylvester(power) / math.sqrt(n)
        q = _paley_order(rest)
        if q is not None:
            return torch.kron(_sylvester(power), _paley(q)) / math.sqrt(n)
        power //= 2
    return None


def balanced_rotation(eigenvalues: torch.Tensor) -> torch.Tensor:
    """An orthogonal R [C, C] with diag(R diag(lambda) R^T) = mean(lambda) in every entry, for any C.

    Bendel & Mickey (1978): repeatedly take the entries i (furthest below the mean) and j (furthest above) of the
    diagonal and rotate the plane (i, j) so that entry i becomes the mean exactly; at most C - 1 rotations, each
    O(C). Used where no Hadamard matrix exists. eigenvalues [C] (>= 0), float64 recommended.
    """
    lam = eigenvalues.to(torch.float64)
    size = lam.shape[0]
    m = torch.diag(lam)
    rotation = torch.eye(size, dtype=torch.float64, device=lam.device)
    target = lam.mean()
    tol = 1e-12 * max(float(target), 1e-300)
    for _ in range(size - 1):
        deviation = torch.diagonal(m) - target
        i, j = int(deviation.argmin()), int(deviation.argmax())
        if float(deviation[j] - deviation[i]) <= tol:
            break
        a, b, c = m[i, i] - target, m[i, j], m[j, j] - target  # a < 0 < c
        t = (-b + torch.sqrt(b * b - a * c)) / c  # tan(theta) solving a + 2 b t + c t^2 = 0
        cos = torch.rsqrt(1 + t * t)
        sin = t * cos
        for mat in (m, rotation):  # rows i, j <- G [row_i; row_j]
            row_i, row_j = mat[i].clone(), mat[j].clone()
            mat[i], mat[j] = cos * row_i + sin * row_j, -sin * row_i + cos * row_j
        col_i, col_j = m[:, i].clone(), m[:, j].clone()  # columns: M <- M G^T
        m[:, i], m[:, j] = cos * col_i + sin * col_j, -sin * col_i + cos * col_j
    return rotation


def phi_s_transform(mean: torch.Tensor, covariance: torch.Tensor) -> dict[str, torch.Tensor]:
    """The PHI-S map of a teacher from its token mean [C] and covariance [C, C] (float64 recommended).

    Returns {"mean": [C], "transform": [C, C] = (1/alpha) H U^T (apply as (x - mean) @ transform.T),
    "alpha": [] = sqrt(mean(lambda)), "eigenvalues": [C] (ascending, negatives from round-off set to 0),
    "hadamard": bool [] (False: the Givens fallback of `balanced_rotation`)}.
    Eigenvector signs are fixed (largest-magnitude entry positive), so the same statistics give the same map on
    every machine. Raises ValueError for a covariance with no variance (constant features).
    """
    sym = (covariance + covariance.transpose(0, 1)) / 2
    eigenvalues, vectors = torch.linalg.eigh(sym)  # ascending; columns are eigenvectors
    eigenvalues = eigenvalues.clamp_min(0)
    signs = torch.sign(vectors.gather(0, vectors.abs().argmax(dim=0, keepdim=True)))  # [1, C]
    vectors = vectors * torch.where(signs == 0, 1.0, signs)
    alpha = eigenvalues.mean().sqrt()
    if not float(alpha) > 0:
        raise ValueError("PHI-S: the calibration tokens have no variance (constant features)")
    hadamard = hadamard_matrix(sym.shape[0])
    rotation = balanced_rotation(eigenvalues) if hadamard is None else hadamard.to(sym)
    return {
        "mean": mean,
        "transform": rotation @ vectors.transpose(0, 1) / alpha,
        "alpha": alpha,
        "eigenvalues": eigenvalues,
        "hadamard": torch.tensor(hadamard is not None),
    }


# --------------------------------------------------------------------------------------------------- module


class PhiSStandardizer(nn.Module):
    """PHI-S standardisation of one teacher's tokens, estimated once on a calibration pass (METHOD.md has no such
    step: an option of `KDLossConfig.feature_standardization`, faithful "none").

    Buffers (saved with the adapters in distill_adapters.safetensors): `mean` [C], `transform` [C, C],
    `alpha` [], `num_tokens` [] (tokens the statistics came from; 0 = not calibrated). The sums of a calibration
    pass live outside the state (`observe` / `finish`), in float64.
    """

    def __init__(self, num_channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_channels))
        self.register_buffer("transform", torch.eye(num_channels))
        self.register_buffer("alpha", torch.ones(()))
        self.register_buffer("num_tokens", torch.zeros((), dtype=torch.long))
        self._sums: list[torch.Tensor] | None = None  # [count [], sum [C], sum of outer products [C, C]]

    @property
    def calibrated(self) -> bool:
        return bool(self.num_tokens > 0)

    @torch.no_grad()
    def observe(self, tokens: torch.Tensor) -> None:
        """Add a batch of tokens [..., C] to the calibration sums (float64, on the tokens' device)."""
        flat = tokens.detach().reshape(-1, tokens.shape[-1]).to(torch.float64)
        if self._sums is None:
            self._sums = [
                flat.new_zeros(()),
                flat.new_zeros(flat.shape[1]),
                flat.new_zeros(flat.shape[1], flat.shape[1]),
            ]
        self._sums[0] += flat.shape[0]
        self._sums[1] += flat.sum(dim=0)
        self._sums[2] += flat.transpose(0, 1) @ flat

    @torch.no_grad()
    def finish(self, all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Set the buffers from the sums (population covariance), then drop the sums.

        all_reduce: sums a tensor over processes (None: one process); called on every rank the same number of
        times, so a rank that saw no tokens still joins with zeros. Raises ValueError when no token was seen.
        """
        size = self.mean.shape[0]
        sums = self._sums or [torch.zeros((), dtype=torch.float64, device=self.mean.device),
                              torch.zeros(size, dtype=torch.float64, device=self.mean.device),
                              torch.zeros(size, size, dtype=torch.float64, device=self.mean.device)]  # fmt: skip
        if all_reduce is not None:
            sums = [all_reduce(s) for s in sums]
        self._sums = None
        count = float(sums[0])
        if count < 2:
            raise ValueError(f"PHI-S calibration saw {int(count)} token(s); it needs at least 2")
        mean = sums[1] / count
        covariance = sums[2] / count - torch.outer(mean, mean)
        phi = phi_s_transform(mean, covariance)
        self.mean.copy_(phi["mean"].to(self.mean))
        self.transform.copy_(phi["transform"].to(self.transform))
        self.alpha.copy_(phi["alpha"].to(self.alpha))
        self.num_tokens.fill_(int(count))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, C] -> (tokens - mean) @ transform^T, same shape and dtype (computed in >= float32).
        Raises RuntimeError before calibration."""
        if not self.calibrated:
            raise RuntimeError(
                "the PHI-S standardiser has no statistics yet: run a calibration pass first "
                "(MoVEKDTrainer does it before step 1; by hand: MoVEKDDistiller.calibrate)"
            )
        x = upcast(tokens)
        return ((x - self.mean.to(x.dtype)) @ self.transform.to(x.dtype).transpose(0, 1)).to(tokens.dtype)
