"""Benchmark: what MoVE-KD's forward adds around LLaVA's own forward (0.2.0: call the parent, read the projector
input, wrap checkpoint functions, build the `MoVEKD<Parent>` output).

Variants, on one model instance and one batch, forward only (no_grad) and forward + backward:

- `LLaVA forward`: `LlavaModel.forward` called directly on the MoVE-KD model, so the same MoLE tower runs but
  nothing of the wrapper (no router logits or student tokens are collected).
- `MoVE-KD forward`: the model's own forward, returning `router_logits` and `vision_hidden_states` too.

The wrapper's cost is Python work per call, independent of size, so a small model shows it at its largest relative
share: the default is a 2-layer ViT-B-wide tower at 224 px and a 2-layer LLM of width 512.

    .venv/bin/python benchmarks/bench_forward_wrapper.py [--quick] [--repeats 50]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, format_table, interleaved_timings, summarise, timing_rows, write_result  # noqa: E402

from movekd_hf import MoVEKDConfig, MoVEKDModel  # noqa: E402

SIZES = {
    "default": dict(vision=(768, 3072, 12, 224, 16), text=(512, 1024, 8), tokens=64),
    "quick": dict(vision=(32, 48, 4, 32, 8), text=(40, 56, 4), tokens=8),
}


def build(size: dict) -> tuple[MoVEKDModel, dict]:
    hidden, mlp, heads, image, patch = size["vision"]
    vision = CLIPVisionConfig(
        hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=2, num_attention_heads=heads, image_size=image,
        patch_size=patch,
    )  # fmt: skip
    text_hidden, text_mlp, text_heads = size["text"]
    text = LlamaConfig(
        vocab_size=1000, hidden_size=text_hidden, intermediate_size=text_mlp, num_hidden_layers=2,
        num_attention_heads=text_heads, num_key_value_heads=text_heads,
    )  # fmt: skip
    patches = (image // patch) ** 2
    config = MoVEKDConfig(vision_config=vision, text_config=text, image_token_index=999, image_seq_length=patches,
                          lora_dropout=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = MoVEKDModel(config).train()
    input_ids = torch.randint(0, 998, (2, size["tokens"] + patches))
    input_ids[:, 1 : 1 + patches] = 999
    batch = {"input_ids": input_ids, "pixel_values": torch.randn(2, 3, image, image)}
    return model, batch


def main(argv: list[str] | None = None) -> int:
    args = base_parser(__doc__.splitlines()[0]).parse_args(argv)
    torch.set_num_threads(args.threads)
    model, batch = build(SIZES["quick" if args.quick else "default"])
    repeats = args.repeats or (3 if args.quick else 50)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)

    def llava(backward: bool):
        out = LlavaModel.forward(model, **batch)
        if backward:
            out.last_hidden_state.sum().backward()

    def movekd(backward: bool):
        out = model(**batch)
        if backward:
            out.last_hidden_state.sum().backward()

    results = {}
    for backward in (False, True):
        variants = {"LLaVA forward": lambda b=backward: llava(b), "MoVE-KD forward": lambda b=backward: movekd(b)}
        with torch.set_grad_enabled(backward):
            times = interleaved_timings(variants, repeats, warmup, args.clock)
        label = "forward+backward" if backward else "forward (no_grad)"
        summary = summarise(times, "LLaVA forward")
        added_us = (summary["MoVE-KD forward"]["median_s"] - summary["LLaVA forward"]["median_s"]) * 1e6
        results[label] = {"summary": summary, "added_us": added_us}
        print(f"{label}, {repeats} interleaved rounds, {args.clock} clock; MoVE-KD adds {added_us:.0f} us per call")
        print(format_table(timing_rows(summary), ["variant", "median ms", "IQR ms", "ratio", "paired ratio"]))
    settings = {"sizes": SIZES["quick" if args.quick else "default"], "repeats": repeats, "threads": args.threads}
    # The outputs agree where both have them: the wrapper only adds fields.
    with torch.no_grad():
        same = torch.equal(LlavaModel.forward(model, **batch).last_hidden_state, model(**batch).last_hidden_state)
    result = {"settings": settings, "results": results, "same_last_hidden_state": same}
    print(f"wrote {write_result('forward_wrapper', result, args.out, args.quick)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
