"""Benchmark 1: MoLE overhead in the student encoder (forward + backward), against plain CLIP.

Variants, all on the same CLIP encoder layers at ViT-L widths (hidden 1024, MLP 4096, 577 tokens), base weights
frozen, gradient flowing to the encoder input and to the LoRA experts and routers:

- `plain CLIP`: the stock MLP (the baseline).
- `MoLE sparse (ours)`: `movekd_hf.modeling.mole.MoLEMLP`, top-1 routing (3 experts, rank 32): in training on
  CPU the whole MLP on tokens sorted by expert, each linear one autograd node of GEMMs writing in place.
- `MoLE sparse, bias pass`: ours as it was before its biases joined the B GEMMs: each linear's biases written into
  the output by a pass of their own, the base product and every expert's B product then added (three passes over
  the output against a plain addmm's two), and the dropout's gaps drawn from 53-bit uniforms.
- `MoLE sparse, LoRA inputs sorted`: `MoLEMLP`'s previous training dispatch (still its inference/GPU path): only
  the LoRA inputs sorted by expert (a gather per linear), each expert's output index-added back into the base
  output in token order; dropout drawn by gaps as in ours.
- `MoLE sparse, nn.Dropout`: our dispatch as it was before (the "before" of the dropout change): `nn.Dropout`
  (one Bernoulli draw per element, a float mask saved for backward) on the sorted copy `index_select` makes,
  and the B bias added in a pass of its own. Same values without dropout; with dropout both keep each element
  with probability 1 - p, scaled by 1 / (1 - p).
- `MoLE sparse, expert loop`: a plain re-implementation of the authors' dispatch: a Python loop over experts,
  each taking its tokens by index and scattering its output back (`index_add_`).
- `MoLE sparse, all experts batched`: the previous `MoLEMLP` dispatch (every expert's A as one matmul, a one-hot
  gate, every expert's B as one matmul): exact, no loop, but three experts' arithmetic.
- `MoLE dense (ours)`: every expert, weighted by the router's probabilities.

With `--ablation`, three more rows take the pieces of ours away one at a time (same dispatch, same weights):
`routing only` (router, sort bookkeeping, then the stock fc1/fc2), `rank 1, no dropout` (every gather, pass
and Python call of ours with next to no LoRA arithmetic) and `no dropout`. Their steps against plain CLIP split
ours' overhead into routing, the sorted dispatch's fixed costs, the rank-r arithmetic and the dropout.

Arithmetic limit: the chosen expert adds 2 r (1024 + 4096) multiply-adds per token to a layer's ~13.7M (MLP
8.4M, attention projections 4.2M, attention ~1.2M at 577 tokens) and needs three such products (forward, input
gradient, weight gradient) against the frozen layer's two: 1.036x. All three experts' products: 1.11x.

    .venv/bin/python benchmarks/bench_mole_overhead.py [--quick] [--layers 2] [--threads 1] [--ablation]
"""

from __future__ import annotations

import copy
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, format_table, interleaved_timings, summarise, timing_rows, write_result  # noqa: E402

from movekd_hf import MoVEKDConfig  # noqa: E402
from movekd_hf.modeling.modeling_movekd import vision_encoder_layers  # noqa: E402
from movekd_hf.modeling.mole import (  # noqa: E402
    MoLELinear,
    MoLEMLP,
    expert_gate,
    init_mole_linear,
    mole_mlp_from,
    top1_route,
)
from movekd_hf.modeling.mole_sorted import SortedMoLELinearFunction, SortedRouting, _expert_pieces, _rows_mm  # noqa: E402

VIT_L = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336, patch_size=14)
QUICK = dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, image_size=56, patch_size=14)


class LoopDispatchMoLEMLP(MoLEMLP):
    """Sparse MoLE as the authors' code dispatches it: for each expert, gather its tokens, run its LoRA, scatter
    the result back. Same parameters and values as `MoLEMLP` (sparse, output scale "none")."""

    def _expert_delta(self, layer, x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        delta = x.new_zeros(x.shape[0], layer.out_features)  # [T, out]
        for expert in range(self.num_experts):
            index = torch.nonzero(chosen == expert).squeeze(-1)
            if index.numel() == 0:
                continue
            tokens = x.index_select(0, index)
            low = tokens @ layer.lora_A[expert].t() + layer.lora_A_bias[expert]
            delta = delta.index_add(0, index, low @ layer.lora_B[expert].t() + layer.lora_B_bias[expert])
        return delta

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = self.router(x)
        self.router_logits = logits.view(*shape[:-1], self.num_experts)
        chosen = logits.argmax(dim=-1)
        h = self.fc1(x) + self.scaling * self._expert_delta(self.fc1, self.lora_dropout(x), chosen)
        h = self.activation_fn(h)
        y = self.fc2(h) + self.scaling * self._expert_delta(self.fc2, self.lora_dropout(h), chosen)
        return y.view(*shape[:-1], -1)


def _dropped_positions_53_bit(numel: int, p: float, device: torch.device) -> torch.Tensor:
    """`dropped_positions` as it drew the gaps before: by inversion of 53-bit uniforms."""
    mean = numel * p
    draws, start, chunks = int(mean + 6.0 * math.sqrt(mean * (1.0 - p))) + 16, 0, []
    while True:
        uniform = torch.empty(draws, dtype=torch.float64, device=device).uniform_(2.0**-53, 1.0)
        ends = uniform.log_().mul_(1.0 / math.log1p(-p)).long().add_(1).cumsum_(0).add_(start - 1)
        inside = int(torch.searchsorted(ends, numel))
        chunks.append(ends[:inside])
        if inside < draws:
            return torch.cat(chunks)
        start = int(ends[-1]) + 1


class _BiasPassFunction(SortedMoLELinearFunction):
    """The sorted linear's forward before its biases joined the B GEMMs (with LoRA and base biases, as here): b +
    g bB_e written per expert by `addcmul`, then the base x W^T and each expert's B product added in place. Its
    saved tensors are ours', so ours' backward serves it."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, lora_A_bias, lora_B_bias, gate, counts, dropped, keep, consume):
        x, pieces = x.contiguous(), _expert_pieces(counts)
        out = x.new_empty(x.shape[0], weight.shape[0])  # [T, out]
        for expert, piece in pieces:
            torch.addcmul(bias, gate[piece], lora_B_bias[expert], out=out[piece])
        out.addmm_(x, weight.t())
        lora_input = x
        if dropped is not None:
            lora_input = x if consume and not weight.requires_grad else x.clone()
            lora_input.view(-1).index_fill_(0, dropped, 0.0)
        low = x.new_empty(x.shape[0], lora_A.shape[1])  # [T, r]
        for expert, piece in pieces:
            _rows_mm(lora_input[piece], lora_A[expert].t(), out=low[piece], alpha=keep, bias=lora_A_bias[expert])
        weighted = torch.cat([low * gate, gate], dim=1)  # [T, r + 1], as ours saves it (less the ones column)
        for expert, piece in pieces:
            out[piece].addmm_(weighted[piece, :-1], lora_B[expert].t())
        ctx.counts, ctx.keep_scale = counts, keep
        saved_x = x if weight.requires_grad else None
        ctx.save_for_backward(saved_x, weight, lora_input, lora_A, lora_B, lora_B_bias, low, weighted, gate, dropped)
        return out


class _BiasPassLinear(MoLELinear):
    def forward(self, x: torch.Tensor, routing=None) -> torch.Tensor:
        if not isinstance(routing, SortedRouting):
            return super().forward(x, routing)
        dropped = _dropped_positions_53_bit(x.numel(), routing.dropout, x.device) if routing.dropout else None
        return _BiasPassFunction.apply(
            x, self.weight, self.bias, self.lora_A, self.lora_B, self.lora_A_bias, self.lora_B_bias, routing.gate,
            routing.counts, dropped, routing.keep_scale, routing.consume_inputs,
        )  # fmt: skip


class BiasPassMoLEMLP(MoLEMLP):
    """`MoLEMLP` with the previous round's CPU training linears (`_BiasPassFunction`, 53-bit dropout draws): same
    values, same dispatch otherwise."""

    def __init__(self, *args):
        super().__init__(*args)
        self.fc1.__class__ = self.fc2.__class__ = _BiasPassLinear


class NNDropoutMoLEMLP(MoLEMLP):
    """`MoLEMLP`'s sparse dispatch as it was before the dropout change (same values without dropout):
    `nn.Dropout` on `inputs.index_select(0, order)` (autograd's gather), and each expert's B bias added to its
    [T_e, out] output in a pass of its own."""

    def _sparse_forward(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        chosen, weight = top1_route(logits, self.output_scale)
        order = torch.argsort(chosen, stable=True)
        counts = F.one_hot(chosen, self.num_experts).sum(dim=0).tolist()
        weight = weight.index_select(0, order) * self.scaling

        def with_lora(layer, inputs: torch.Tensor) -> torch.Tensor:
            out = layer(inputs)
            lora_input = self.lora_dropout(inputs.index_select(0, order))
            a_weights, a_biases = layer.lora_A.unbind(0), layer.lora_A_bias.unbind(0)
            b_weights, b_biases = layer.lora_B.unbind(0), layer.lora_B_bias.unbind(0)
            pieces = zip(lora_input.split(counts), weight.split(counts), order.split(counts))
            for e, (tokens, scale, positions) in enumerate(pieces):
                low_rank = F.linear(tokens, a_weights[e], a_biases[e]) * scale
                out.index_add_(0, positions, F.linear(low_rank, b_weights[e]) + scale * b_biases[e])
            return out

        return with_lora(self.fc2, self.activation_fn(with_lora(self.fc1, x)))


class LoRASortedMoLEMLP(MoLEMLP):
    """`MoLEMLP`'s dispatch that sorts only the LoRA inputs (its inference/GPU path), run in training too."""

    def _sparse_forward(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self._sorted_lora_forward(x, logits)


class AllExpertsMoLEMLP(MoLEMLP):
    """Sparse MoLE computed for every expert and masked by a one-hot gate (the dense path's matmuls)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        logits = self.router(x)
        self.router_logits = logits.view(*shape[:-1], self.num_experts)
        gate = expert_gate(logits, "sparse", self.output_scale)
        h = self.fc1(x) + self.scaling * self.fc1.lora_delta(self.lora_dropout(x), gate)
        h = self.activation_fn(h)
        y = self.fc2(h) + self.scaling * self.fc2.lora_delta(self.lora_dropout(h), gate)
        return y.view(*shape[:-1], -1)


class RoutingOnlyMoLEMLP(MoLEMLP):
    """Ours' routing (router, top-1, sort order, slice sizes) followed by the stock fc1 -> act -> fc2: the cost of
    routing alone (values are plain CLIP's)."""

    def _sparse_forward(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        chosen, weight = top1_route(logits, self.output_scale)
        order = torch.argsort(chosen, stable=True)
        F.one_hot(chosen, self.num_experts).sum(dim=0).tolist()
        weight.index_select(0, order)
        return self.fc2(self.activation_fn(self.fc1(x)))


def ablation_encoders(sizes: dict, layers: int, experts: int, rank: int) -> dict[str, nn.Module]:
    """Ours with its pieces taken away (see the module docstring): routing only, rank 1 without dropout, and
    rank `rank` without dropout."""
    no_dropout = build_encoders(sizes, layers, experts, rank, 0.0, mine_only=True)["MoLE sparse (ours)"]
    rank_one = build_encoders(sizes, layers, experts, 1, 0.0, mine_only=True)["MoLE sparse (ours)"]
    routing_only = copy.deepcopy(no_dropout)
    for layer in vision_encoder_layers(routing_only):
        layer.mlp.__class__ = RoutingOnlyMoLEMLP  # same module, same weights; only the forward differs
    return {
        "ours, routing only": routing_only,
        "ours, rank 1, no dropout": rank_one,
        "ours, no dropout": no_dropout,
    }


def build_encoders(
    sizes: dict, layers: int, experts: int, rank: int, dropout: float, mine_only: bool = False, core: bool = False
) -> dict[str, nn.Module]:
    """Plain CLIP and every MoLE variant on the same weights (`mine_only`: plain CLIP and ours only; `core`: and
    the previous round, `bias pass`)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    vision = CLIPVisionConfig(**sizes, num_hidden_layers=layers, hidden_act="quick_gelu")
    vision._attn_implementation = "sdpa"
    torch.manual_seed(0)
    plain = CLIPVisionModel(vision).eval()
    encoders = {"plain CLIP": plain}
    settings = dict(num_experts=experts, lora_rank=rank, lora_dropout=dropout, lora_b_init="kaiming")
    variants = (
        ("MoLE sparse (ours)", "sparse", None),
        ("MoLE sparse, bias pass", "sparse", BiasPassMoLEMLP),
        ("MoLE sparse, LoRA inputs sorted", "sparse", LoRASortedMoLEMLP),
        ("MoLE sparse, nn.Dropout", "sparse", NNDropoutMoLEMLP),
        ("MoLE sparse, expert loop", "sparse", LoopDispatchMoLEMLP),
        ("MoLE sparse, all experts batched", "sparse", AllExpertsMoLEMLP),
        ("MoLE dense (ours)", "dense", None),
    )
    for name, routing, mlp_class in variants[: 1 if mine_only else 2 if core else len(variants)]:
        config = MoVEKDConfig(
            vision_config=vision.to_dict(), mole_routing=routing, expert_output_scale="none", **settings
        )
        model = copy.deepcopy(plain)
        for index, layer in enumerate(vision_encoder_layers(model)):
            torch.manual_seed(index)  # the same experts and routers in every MoLE variant
            mole = mole_mlp_from(layer.mlp, config)
            for linear in (mole.fc1, mole.fc2):
                init_mole_linear(linear, "kaiming")
            if mlp_class is not None:
                swapped = mlp_class(config, mole.fc1.in_features, mole.fc1.out_features, mole.activation_fn)
                swapped.load_state_dict(mole.state_dict())  # same weights, other dispatch
                mole = swapped
            layer.mlp = mole
        encoders[name] = model
    for model in encoders.values():
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name or ".router." in name)
    return encoders


def encoder_step(model: nn.Module, embeddings: torch.Tensor, probe: torch.Tensor):
    """Forward through the encoder layers + backward of a fixed linear read-out; gradients are dropped."""

    def run() -> None:
        x = embeddings.detach().requires_grad_(True)
        hidden = x
        for layer in vision_encoder_layers(model):
            hidden = layer(hidden, None)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        (hidden * probe).sum().backward()
        model.zero_grad(set_to_none=True)

    return run


def check_same_values(encoders: dict[str, nn.Module], embeddings: torch.Tensor) -> float:
    """Every sparse dispatch must compute what `MoLEMLP` computes in training (dropout off): max abs difference."""
    outs = {}
    names = (
        "MoLE sparse (ours)",
        "MoLE sparse, bias pass",
        "MoLE sparse, LoRA inputs sorted",
        "MoLE sparse, nn.Dropout",
        "MoLE sparse, expert loop",
        "MoLE sparse, all experts batched",
    )
    names = [name for name in names if name in encoders]
    for name in names:
        model = encoders[name].eval()
        hidden = embeddings
        with torch.enable_grad():  # the training dispatch (without autograd `MoLEMLP` keeps token order)
            for layer in vision_encoder_layers(model):
                out = layer(hidden, None)
                hidden = out[0] if isinstance(out, tuple) else out
        outs[name] = hidden.detach()
        model.train()
    return max(float((outs[names[0]] - outs[name]).abs().max()) for name in names[1:])


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="0.05 is the paper's training value")
    parser.add_argument("--ablation", action="store_true", help="add ours with pieces taken away (see above)")
    parser.add_argument(
        "--core", action="store_true", help="plain CLIP, ours and bias pass only: a run short enough for a quiet spell"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = QUICK if args.quick else VIT_L
    repeats = args.repeats or (3 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    rank = 8 if args.quick else 32
    encoders = build_encoders(sizes, args.layers, 3, rank, args.lora_dropout, core=args.core)
    if args.ablation:
        encoders.update(ablation_encoders(sizes, args.layers, 3, rank))
    tokens = (sizes["image_size"] // sizes["patch_size"]) ** 2 + 1
    embeddings = torch.randn(args.batch, tokens, sizes["hidden_size"], generator=torch.Generator().manual_seed(2))
    probe = torch.randn_like(embeddings)
    difference = check_same_values(encoders, embeddings)
    for model in encoders.values():
        model.train()  # LoRA dropout active, as in training
    times = interleaved_timings(
        {n: encoder_step(m, embeddings, probe) for n, m in encoders.items()}, repeats, warmup, args.clock
    )
    summary = summarise(times, baseline="plain CLIP")
    for name, values in times.items():
        # Ratio of the fastest rounds: on a loaded machine other jobs only ever add time, so the minima are the
        # steadiest estimate of each variant's own cost (the medians move by +-5 % with the load).
        summary[name]["best_ratio"] = min(values) / min(times["plain CLIP"])
    ours = times["MoLE sparse (ours)"]

    def over(other: str) -> dict:
        before = times[other]
        return {
            "paired_ratio": statistics.median(a / b for a, b in zip(ours, before)),
            "best_ratio": min(ours) / min(before),
        }

    before = {"bias pass": "MoLE sparse, bias pass", "LoRA inputs sorted": "MoLE sparse, LoRA inputs sorted"}
    before["nn.Dropout"] = "MoLE sparse, nn.Dropout"
    changes = {label: over(row) for label, row in before.items() if row in times}
    print(
        f"MoLE overhead, forward+backward: {args.layers} layers, batch {args.batch}, {tokens} tokens, "
        f"hidden {sizes['hidden_size']}, MLP {sizes['intermediate_size']}, LoRA dropout {args.lora_dropout}, "
        f"{args.threads} thread(s), {args.clock} clock, "
        f"{repeats} interleaved rounds"
    )
    rows = [{**row, "best ratio": summary[row["variant"]]["best_ratio"]} for row in timing_rows(summary)]
    print(format_table(rows, ["variant", "median ms", "IQR ms", "ratio", "paired ratio", "best ratio"]))
    for label, change in changes.items():
        print(f"ours / {label} dispatch: paired {change['paired_ratio']:.3f}, best {change['best_ratio']:.3f}")
    print(f"other sparse dispatches vs ours, max |difference| of outputs: {difference:.2e}")
    name = ("mole_overhead" if args.lora_dropout else "mole_overhead_no_dropout") + (
        "_ablation" if args.ablation else "_core" if args.core else ""
    )
    path = write_result(
        name,
        {
            "settings": {
                **sizes,
                "layers": args.layers,
                "batch": args.batch,
                "tokens": tokens,
                "repeats": repeats,
                "lora_dropout": args.lora_dropout,
                "threads": args.threads,
                "clock": args.clock,
                "ablation": args.ablation,
                "core": args.core,
            },
            "summary": summary,
            "ours_over": changes,
            "times_s": times,
            "max_abs_difference_vs_ours": difference,
        },
        args.out,
        args.quick,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
