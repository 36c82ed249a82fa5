"""The sparse MoLE's CPU training dispatch (METHOD.md section 2; `mole.py` builds on it).

Training on the CPU (autograd on, no autocast), `MoLEMLP` runs the whole MLP on the tokens sorted by expert: one
gather of x in and one of y out (`Permute`, [T, D] each), and every expert reads a contiguous slice of fc1's and
fc2's inputs, the one sort serving both. Each linear is one autograd node (`SortedMoLELinearFunction`) whose every
term is a GEMM writing into its output (the base product, then each expert's B product with the biases as extra
inner columns, added in place; in the backward the base's input gradient added into the LoRA's), so no pass over
the [T, 4096] activations goes to bias broadcasts, gathers, index-adds or gradient sums.

LoRA dropout there: one Bernoulli draw per element costs more than the expert's matmuls, so the dropped elements
are drawn as the gaps between successive drops (`dropped_positions`, ~p * numel random numbers) and zeroed in the
LoRA input (in the input itself once the frozen base product is done, when the MLP gives its intermediates up,
`MoLEMLP.consume_fc_inputs`; else in a copy; the same positions zero its gradient), and the 1 / (1 - p) scales
the A product (a GEMM's alpha) instead of the input.

Remote code: imports only torch.
"""

import math

import torch


def dropped_positions(numel: int, p: float, device: torch.device, draws: int = 0) -> torch.Tensor:
    """The elements inverted dropout zeroes in a tensor of `numel` elements: each one independently with
    probability `p` (the Bernoulli draws of `nn.Dropout`, drawn by their gaps).

    The gaps between successive drops in a sequence of independent Bernoulli(p) trials are independent
    Geometric(p) variables on 1, 2, ...; their running sum gives the drop positions with the same joint
    distribution as one draw per element, from ~p * numel random numbers instead of `numel`. Each gap is drawn
    by inversion, as `Tensor.geometric_` draws one but vectorised: for U = (n + 1/2) / 2^31, n a uniform 31-bit
    integer, floor(log U / log(1 - p)) + 1 = k with probability (1 - p)^(k - 1) p to within 2^-31, the resolution
    of the 31-bit generator `Tensor.bernoulli_` uses on CPU (with MKL); 31-bit integers cost half the generator
    time of 53-bit doubles. The default generator of `device` draws them, so `torch.manual_seed` and
    checkpointing's RNG-state replay reproduce them.

    Args:
        draws: gaps drawn at a time (0: enough for all but ~1e-9 of calls; more are drawn when needed).
    Returns:
        `[K]` int64 flat indices, increasing, K ~ Binomial(numel, p).
    """
    mean = numel * p
    draws = draws or int(mean + 6.0 * math.sqrt(mean * (1.0 - p))) + 16  # the mean + 6 standard deviations
    inverse_log_keep = 1.0 / math.log1p(-p)
    chunks, start = [], 0
    while True:
        # U in (0, 1), never 0, so every gap is finite (at most ~22 / p).
        bits = torch.empty(draws, dtype=torch.int32, device=device).random_()  # uniform on [0, 2^31)
        uniform = bits.to(torch.float64).add_(0.5).mul_(2.0**-31)
        gaps = uniform.log_().mul_(inverse_log_keep).long().add_(1)  # `long` floors: the values are >= 0
        ends = gaps.cumsum_(0).add_(start - 1)  # each drop one gap after the previous one
        inside = int(torch.searchsorted(ends, numel))
        chunks.append(ends[:inside])
        if inside < draws:
            return torch.cat(chunks) if len(chunks) > 1 else chunks[0]
        start = int(ends[-1]) + 1


class SortedDroppedRows(torch.autograd.Function):
    """`x.index_select(0, order)` with the elements at the flat positions `dropped` (of the result) set to zero.

    The copy that sorting makes anyway takes the dropout in place; the backward saves only `order` and the
    positions (no float mask) and scatters the gradient with one `index_copy_` (`order` is a permutation).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        out = x.index_select(0, order)  # [T, in]
        if dropped.numel():
            out.view(-1).index_fill_(0, dropped, 0.0)
        ctx.save_for_backward(order, dropped)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        order, dropped = ctx.saved_tensors
        grad_x = torch.empty_like(grad, memory_format=torch.contiguous_format).index_copy_(0, order, grad)
        if dropped.numel():
            width = grad.shape[1]  # the same positions, in x's row order
            grad_x.view(-1).index_fill_(0, order[dropped // width] * width + dropped % width, 0.0)
        return grad_x, None, None


class SortedRouting:
    """What a `MoLELinear` needs to run the sparse MoLE on tokens sorted by expert.

    Attributes:
        gate: `[T, 1]` each (sorted) token's output weight: the chosen expert's gate value times `alpha / r`.
        counts: tokens per expert (Python ints summing to T), in expert order.
        dropout: the LoRA dropout probability p when dropout is active (training), else 0.
        consume_inputs: the linears may write the dropout's zeros into their input once their base product is
            done (the caller's inputs are intermediates no other autograd node saved, as in `MoLEMLP`).
    """

    def __init__(self, gate: torch.Tensor, counts: list, dropout: float, consume_inputs: bool = False):
        self.gate, self.counts, self.dropout = gate, tuple(counts), dropout
        self.keep_scale = 1.0 / (1.0 - dropout) if dropout else 1.0
        self.consume_inputs = consume_inputs

    def dropped(self, x: torch.Tensor):
        """Flat positions of `x`'s elements that dropout zeroes (each independently with probability p), or None."""
        return dropped_positions(x.numel(), self.dropout, x.device) if self.dropout else None


def _expert_pieces(counts) -> list:
    """(expert, row slice) of each expert with tokens, for rows sorted by expert."""
    pieces, start = [], 0
    for expert, rows in enumerate(counts):
        if rows:
            pieces.append((expert, slice(start, start + rows)))
        start += rows
    return pieces


def _per_expert_buffer(like: torch.Tensor, shape: tuple, pieces: list) -> torch.Tensor:
    """An `[E, ...]` buffer for per-expert results: uninitialised where an expert has rows, zero where not."""
    buffer = like.new_empty(shape)
    if len(pieces) < shape[0]:
        buffer[[e for e in range(shape[0]) if e not in dict(pieces)]] = 0.0
    return buffer


def _columns(tensors: list) -> torch.Tensor:
    """`tensors` side by side (`torch.cat` along dim 1), without a copy for one."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)


def _rows_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, alpha: float = 1.0, bias=None) -> torch.Tensor:
    """`out = alpha * a @ b (+ bias)`, with a one-row `a` computed as two rows: a one-row matmul takes BLAS's
    matrix-vector path, whose rounding depends on the weights' memory alignment (checkpoints loaded by mmap are
    not 64-byte aligned); as a GEMM a loaded model computes bit for bit what the saved one did."""
    if a.shape[0] == 1:
        full = _rows_mm(a.expand(2, -1), b, a.new_empty(2, b.shape[1]), alpha, bias)
        return out.copy_(full[:1])
    if bias is None:
        return torch.mm(a, b, out=out) if alpha == 1.0 else torch.addmm(out, a, b, beta=0.0, alpha=alpha, out=out)
    return torch.addmm(bias, a, b, alpha=alpha, out=out)


class SortedMoLELinearFunction(torch.autograd.Function):
    """Base linear plus each token's expert LoRA, tokens sorted by expert, with inverted LoRA dropout (CPU training).

    For the rows of expert e: out = x W^T + b + g * (B_e (A_e drop(x) + bA_e) + bB_e), drop(x) zeroing the
    elements at the flat positions `dropped` and scaling by `keep_scale` (as the GEMM's alpha on A_e x). The base
    product x W^T writes the output (beta = 0), and each expert's B product adds into its rows in place (beta = 1)
    with the biases as extra inner columns ([g low | g | 1] against [B_e | bB_e | b]): the output gets the two
    passes a plain addmm gives it (its bias broadcast, then its GEMM), not a third for the biases or the LoRA. The
    backward adds the base's input gradient into the LoRA's the same way. Beyond the matmuls
    nothing passes over `[T, out]` or `[T, in]` except, with dropout, the zeroing of the dropped positions in x
    (saved for the A gradient; in x itself once the base product is done when `consume` is set and the base
    weight is frozen, else in a copy) and in the LoRA's input gradient.
    """

    @staticmethod
    def forward(
        ctx, x, weight, bias, lora_A, lora_B, lora_A_bias, lora_B_bias, gate, counts, dropped, keep_scale, consume
    ):
        x = x.contiguous()
        pieces = _expert_pieces(counts)
        num_rows, rank = x.shape[0], lora_A.shape[1]
        out = x @ weight.t()  # [T, out]: the base product writes the output (beta = 0, no bias pass)
        lora_input = x
        if dropped is not None:
            # The base product is done: when the caller gives x up and the base weight is frozen (x is then not
            # saved), the mask goes into x itself rather than into a copy.
            lora_input = x if consume and not weight.requires_grad else x.clone()
            lora_input.view(-1).index_fill_(0, dropped, 0.0)
        low = x.new_empty(num_rows, rank)  # [T, r]: A_e drop(x) + bA_e, before the gate
        for expert, piece in pieces:
            if lora_A_bias is None:
                _rows_mm(lora_input[piece], lora_A[expert].t(), out=low[piece], alpha=keep_scale)
            else:
                _rows_mm(lora_input[piece], lora_A[expert].t(), out=low[piece], alpha=keep_scale,
                         bias=lora_A_bias[expert])  # fmt: skip
        # The biases ride in each expert's B product as extra inner columns: [g A_e drop(x) | g | 1] against
        # [B_e | bB_e | b], added into the base output in the one pass that adds B_e anyway.
        ones = [gate.new_ones(num_rows, 1)] if bias is not None else []
        weighted = _columns([low * gate] + ([gate] if lora_B_bias is not None else []) + ones)  # [T, r (+1) (+1)]
        for expert, piece in pieces:
            b_weight = _columns(  # [out, r (+1) (+1)]
                [lora_B[expert]]
                + ([lora_B_bias[expert].unsqueeze(1)] if lora_B_bias is not None else [])
                + ([bias.unsqueeze(1)] if bias is not None else [])
            )
            if piece.stop - piece.start == 1:  # see `_rows_mm`
                out[piece] += _rows_mm(weighted[piece], b_weight.t(), out.new_empty(1, out.shape[1]))
            else:
                out[piece].addmm_(weighted[piece], b_weight.t())
        ctx.counts, ctx.keep_scale = counts, keep_scale
        ctx.save_for_backward(
            x if weight.requires_grad else None, weight, lora_input, lora_A, lora_B, lora_B_bias, low, weighted,
            gate, dropped,
        )  # fmt: skip
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_input, lora_A, lora_B, lora_B_bias, low, weighted, gate, dropped = ctx.saved_tensors
        grad = grad.contiguous()
        needs = ctx.needs_input_grad
        pieces = _expert_pieces(ctx.counts)
        num_experts, rank, _ = lora_A.shape
        with_b_bias = lora_B_bias is not None
        grad_bt = grad_a = grad_a_bias = grad_gate = None
        if needs[4] or needs[6]:  # B^T and bB of each expert: one [r (+1), out] product, rows the weighted input
            grad_bt = _per_expert_buffer(grad, (num_experts, rank + with_b_bias, grad.shape[1]), pieces)
            weighted_aug = weighted[:, : rank + with_b_bias]  # [T, r (+1)]: g A_e drop(x) (and g)
            for expert, piece in pieces:
                torch.mm(weighted_aug[piece].t(), grad[piece], out=grad_bt[expert])
        grad_low = grad.new_empty(low.shape)  # [T, r]
        for expert, piece in pieces:
            _rows_mm(grad[piece], lora_B[expert], out=grad_low[piece])
        if needs[7]:  # the gate multiplies B_e low + bB_e
            grad_gate = (grad_low * low).sum(1, keepdim=True)
            if with_b_bias:
                for expert, piece in pieces:
                    grad_gate[piece] += grad[piece] @ lora_B_bias[expert].unsqueeze(1)
        grad_low = grad_low * gate
        if needs[5]:
            grad_a_bias = grad.new_zeros(num_experts, rank)
            for expert, piece in pieces:
                grad_a_bias[expert] = grad_low[piece].sum(0)
        grad_low = grad_low * ctx.keep_scale if ctx.keep_scale != 1.0 else grad_low  # dropout's 1 / (1 - p)
        if needs[3]:
            grad_a = _per_expert_buffer(grad, lora_A.shape, pieces)
            for expert, piece in pieces:
                torch.mm(grad_low[piece].t(), lora_input[piece], out=grad_a[expert])
        grad_x = None
        if needs[0]:
            grad_x = torch.empty_like(lora_input)
            for expert, piece in pieces:
                _rows_mm(grad_low[piece], lora_A[expert], out=grad_x[piece])
            if dropped is not None:
                grad_x.view(-1).index_fill_(0, dropped, 0.0)
            grad_x.addmm_(grad, weight)  # the base's input gradient, added in place
        return (
            grad_x,
            grad.t() @ x if needs[1] else None,
            grad.sum(0) if needs[2] else None,
            grad_a,
            grad_bt[:, :rank].transpose(1, 2) if needs[4] else None,
            grad_a_bias,
            grad_bt[:, rank] if needs[6] else None,
            grad_gate,
            None,
            None,
            None,
            None,
        )


class Permute(torch.autograd.Function):
    """`x.index_select(0, order)` whose backward gathers with the inverse permutation (no scatter-add)."""

    @staticmethod
    def forward(ctx, x, order, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None
