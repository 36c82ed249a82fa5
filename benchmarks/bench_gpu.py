"""Benchmark 6: MoVE-KD at paper widths on one GPU (bf16), against plain CLIP and plain LLaVA.

Sections, each measured side by side (interleaved rounds, CUDA-synchronised wall clock) and time-boxed:

- `encoder`: the MoLE student (CLIP-L/336, 24 layers, 3 experts, rank 32, LoRA dropout 0.05, sparse routing)
  forward + backward against plain CLIP-L/336, gradient to the pixels (as benchmark 1), per attention
  implementation: SDPA, and flash-attention 2 where `flash_attn` is installed. Two MoLE dispatches: the one-hot
  gate GPUs take (`MoLEMLP._one_hot_forward`) and, beside it, the LoRA inputs sorted by expert
  (`_sorted_lora_forward`, which GPUs took before).
- `teachers`: each v1.1 teacher's forward (`movekd_hf.distill.presets`, `pretrained=False`: the real
  architectures with random weights), on images at 1024 px; milliseconds per image.
- `stage1`, `stage2`: one training step (forward, backward, AdamW) of the MoVE-KD model (the student plus a
  7B-shaped LLaMA, Vicuna-7B widths, cut to `--llm-layers` layers), with online v1.1 teachers and with cached
  features (random tensors of the teachers' output shapes, held in pinned host memory and copied to the GPU in
  the step, as a cache read would), against plain LLaVA (stock transformers, same sizes) in the same stage.

Peak memory per variant (CUDA only): `state GB` is what the variant keeps between steps (its parameters,
buffers and optimizer state; teachers for online steps), `step GB` the rise of `torch.cuda.max_memory_allocated`
over the allocation before one call, `peak GB` their sum: the peak it would reach alone.

Everything is built from configs with random weights (no downloads). `--device cpu --tiny` runs the same code
at tiny widths (checks it on a machine without a GPU; tests/test_bench.py). Without a CUDA GPU and without
`--device cpu` it prints one line and exits 0.

    .venv/bin/python benchmarks/bench_gpu.py                          # one H200: a few minutes
    .venv/bin/python benchmarks/bench_gpu.py --device cpu --tiny      # tiny widths on CPU
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, write_result  # noqa: E402
from _kd_setup import (  # noqa: E402
    SIZES,
    StepParts,
    build_distiller,
    build_movekd,
    build_plain_llava,
    make_batch,
    online_source,
    optimizer_for,
    student_grid,
    teacher_specs,
    training_step,
)

from movekd_hf.distill import Teacher, TeacherOutput, build_teacher  # noqa: E402
from movekd_hf.distill.presets import CLIP_L_336, TINY_CONVNEXT, convnext_teacher  # noqa: E402
from movekd_hf.distill.presets import teacher_specs as preset_teacher_specs  # noqa: E402
from movekd_hf.modeling.configuration_movekd import MoVEKDVisionConfig  # noqa: E402
from movekd_hf.modeling.modeling_movekd import MoVEKDVisionModel  # noqa: E402
from movekd_hf.modeling.mole import MoLEMLP  # noqa: E402

SECTIONS = ("encoder", "teachers", "stage1", "stage2")
PAPER_DEFAULTS = dict(encoder_batch=16, teacher_batch=4, encoder_rounds=20, teacher_rounds=10, step_rounds=6, warmup=1)
TINY_DEFAULTS = dict(encoder_batch=2, teacher_batch=2, encoder_rounds=1, teacher_rounds=1, step_rounds=1, warmup=0)


def paper_sizes(llm_layers: int, batch: int, text_tokens: int) -> dict:
    """`_kd_setup` sizes at the paper's widths: CLIP-L/336 student, Vicuna-7B-shaped LLM cut to `llm_layers`."""
    vision = {
        k: CLIP_L_336[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    }
    return dict(
        vision=vision,
        image_size=CLIP_L_336["image_size"],
        patch_size=CLIP_L_336["patch_size"],
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=llm_layers, num_attention_heads=32),
        vocab_size=32000,
        text_tokens=text_tokens,
        lora_rank=32,
        teacher_image_size=1024,
        batch=batch,
    )


def tiny_sizes(batch: int) -> dict:
    return {**SIZES["quick"], "batch": batch}


def v11_teacher_specs(tiny: bool, sizes: dict) -> list:
    """The v1.1 teachers (clip, eva, convnext, sam) with random weights: the paper's architectures, or tiny
    ones (`_kd_setup`'s, with the `tiny` set's two-stage-wide ConvNeXt: CPU convolutions are slow)."""
    if not tiny:
        return preset_teacher_specs("v1.1", pretrained=False)
    size = sizes["teacher_image_size"]
    small = convnext_teacher(TINY_CONVNEXT, model_id="convnext_atto", image_size=size, pretrained=False)
    return [small if spec.slug == "convnext" else spec for spec in teacher_specs(sizes)]


# ------------------------------------------------------------------------------------------------ measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rounds(
    variants: Mapping[str, Callable[[], object]], rounds: int, warmup: int, box_s: float, device: torch.device
) -> dict[str, list[float]]:
    """Interleaved rounds (A, B, C, A, B, C, ...) after `warmup` untimed ones; stops after `rounds` rounds or once
    `box_s` seconds of timed rounds have passed (at least one round). Seconds per call, wall clock, synchronised."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    start = time.perf_counter()
    for _ in range(rounds):
        for name, run in variants.items():
            begin = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - begin)
        if time.perf_counter() - start > box_s:
            break
    return times


def state_bytes(modules: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> int:
    """Bytes of the distinct tensors the modules and optimizers keep: parameters, buffers, optimizer state."""
    seen: dict[int, int] = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    for optimizer in optimizers:
        for state in optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value) and value.device.type != "cpu":
                    seen[value.data_ptr()] = value.numel() * value.element_size()
    return sum(seen.values())


def step_peak_bytes(run: Callable[[], object], device: torch.device) -> int | None:
    """Rise of the allocator's peak over the allocation before one call (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def summarise(
    times: Mapping[str, list[float]], baseline: str, per: int = 1, memory: Mapping[str, tuple] | None = None
) -> dict[str, dict]:
    """Median (divided by `per`, e.g. images), IQR, ratio of medians to `baseline`, memory in GB."""
    base = statistics.median(times[baseline])
    out = {}
    for name, values in times.items():
        quartiles = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        state, step = (memory or {}).get(name, (None, None))
        out[name] = {
            "median_s": statistics.median(values) / per,
            "iqr_s": (quartiles[2] - quartiles[0]) / per,
            "ratio": statistics.median(values) / base,
            "rounds": len(values),
            "state_gb": None if state is None else state / 1e9,
            "step_gb": None if step is None else step / 1e9,
            "peak_gb": None if state is None or step is None else (state + step) / 1e9,
        }
    return out


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------------- sections


def encoder_section(args, sizes: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """Plain CLIP vs the MoLE student, forward + backward (gradient to the pixels), per attention backend."""
    vision = dict(**sizes["vision"], image_size=sizes["image_size"], patch_size=sizes["patch_size"])
    backends = ["sdpa"] + (["flash_attention_2"] if device.type == "cuda" and has_flash_attention() else [])
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.encoder_batch, 3, sizes["image_size"], sizes["image_size"], generator=generator)
    pixels = pixels.to(device=device, dtype=dtype)
    models, failed = {}, {}
    for backend in backends:
        try:
            pair = encoder_pair(vision, backend, device, dtype)
            for model in pair.values():
                encoder_step(model, pixels)()  # a backend that builds but cannot run fails here, not in the timing
        except Exception as error:
            if backend == "sdpa":
                raise
            failed[backend] = f"{type(error).__name__}: {str(error)[:200]}"  # the SDPA rows still count
            continue
        models.update(pair)
    variants = {name: encoder_step(model, pixels) for name, model in models.items()}
    times = timed_rounds(variants, args.encoder_rounds, 2 * args.warmup, args.box_s, device)
    memory = {
        name: (state_bytes([model], []), step_peak_bytes(variants[name], device)) for name, model in models.items()
    }
    summary = summarise(times, baseline="plain CLIP (sdpa)", memory=memory)
    return {
        "batch": args.encoder_batch,
        "unit": "ms per batch",
        "attention": [backend for backend in backends if backend not in failed],
        "failed": failed,
        "summary": summary,
    }


def encoder_pair(vision: dict, backend: str, device: torch.device, dtype: torch.dtype) -> dict[str, nn.Module]:
    """Plain CLIP (frozen) and the MoLE student (LoRA and routers train; 3 experts, rank 32, dropout 0.05), the latter
    twice: with the dispatch GPUs take, and with the LoRA inputs sorted by expert (the same weights)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device(device):
        torch.manual_seed(0)
        plain_config = CLIPVisionConfig(**vision, hidden_act="quick_gelu")
        plain = CLIPVisionModel._from_config(plain_config, attn_implementation=backend).requires_grad_(False)
        mole_config = MoVEKDVisionConfig(**vision, hidden_act="quick_gelu", lora_dropout=0.05)
        mole = MoVEKDVisionModel._from_config(mole_config, attn_implementation=backend)
    for name, param in mole.named_parameters():
        param.requires_grad_("lora_" in name or ".router." in name)
    sorted_mole = copy.deepcopy(mole)
    for module in sorted_mole.modules():
        if isinstance(module, MoLEMLP):  # the dispatch GPUs took before the one-hot gate
            module._sparse_forward = module._sorted_lora_forward
    return {
        f"plain CLIP ({backend})": plain.to(dtype).train(),
        f"MoLE student ({backend})": mole.to(dtype).train(),
        f"MoLE student, LoRA inputs sorted ({backend})": sorted_mole.to(dtype).train(),
    }


def encoder_step(model: nn.Module, pixels: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        x = pixels.detach().requires_grad_(True)
        hidden = model(pixel_values=x, output_hidden_states=True).hidden_states[-2]
        hidden.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    return run


def has_flash_attention() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def build_teachers_on(specs: list, device: torch.device, dtype: torch.dtype) -> list[Teacher]:
    teachers = []
    with torch.device(device):
        for spec in specs:
            torch.manual_seed(1)
            teachers.append(build_teacher(spec).to(dtype))
    return teachers


def teacher_section(args, sizes: dict, teachers: list[Teacher], device: torch.device) -> dict:
    """Each teacher's forward on `--teacher-batch` images at the teachers' input size; per image."""
    generator = torch.Generator().manual_seed(3)
    size = sizes["teacher_image_size"]
    images = torch.rand(args.teacher_batch, 3, size, size, generator=generator).to(device)
    variants = {f"{t.slug} teacher ({t.spec.image_size} px)": (lambda t=t: t(images)) for t in teachers}
    times = timed_rounds(variants, args.teacher_rounds, args.warmup, args.box_s, device)
    memory = {
        name: (state_bytes([teacher], []), step_peak_bytes(variants[name], device))
        for name, teacher in zip(variants, teachers)
    }
    baseline = next(iter(variants))
    summary = summarise(times, baseline=baseline, per=args.teacher_batch, memory=memory)
    return {"batch": args.teacher_batch, "image_size": size, "unit": "ms per image", "summary": summary}


def cached_source(outputs: Mapping[str, TeacherOutput], device: torch.device) -> Callable[[dict], dict]:
    """Random features of the teachers' output shapes in (pinned) host memory, copied to `device` per step."""
    generator = torch.Generator().manual_seed(4)

    def host(tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        value = torch.rand(tensor.shape, generator=generator).to(tensor.dtype)
        return value.pin_memory() if device.type == "cuda" else value

    stored = {
        slug: TeacherOutput(tokens=host(out.tokens), grid=out.grid, cls=host(out.cls), cls_attention=host(out.cls_attention))
        for slug, out in outputs.items()
    }  # fmt: skip

    def to_device(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(device, non_blocking=True)

    def read(_batch: dict) -> dict:
        return {
            slug: TeacherOutput(to_device(o.tokens), o.grid, to_device(o.cls), to_device(o.cls_attention))
            for slug, o in stored.items()
        }

    return read


def stage_section(args, stage: str, sizes: dict, teachers: list[Teacher], device, dtype) -> dict:
    """One training step of plain LLaVA, MoVE-KD with online teachers and with cached features, in `stage`."""
    batch = {
        key: value.to(device) if torch.is_tensor(value) else value
        for key, value in make_batch(sizes).items()
    }  # fmt: skip
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    grid = student_grid(sizes)
    with torch.device(device):
        model = build_movekd(sizes, stage).to(dtype)
        distiller = build_distiller(sizes, teachers, batch["teacher_images"], args.adapter).to(dtype).train()
        plain = build_plain_llava(sizes).to(dtype)
    for name, param in plain.named_parameters():  # LLaVA-1.5: stage 1 trains the projector, stage 2 the LLM too
        param.requires_grad_("multi_modal_projector" in name or (stage == "stage2" and "vision_tower" not in name))
    online = online_source(teachers)
    cached = cached_source(online(batch), device)
    parts = {
        f"plain LLaVA {stage}": StepParts(plain, optimizer_for(plain)),
        f"MoVE-KD {stage}, cached features": StepParts(model, optimizer_for(model, distiller), distiller, cached),
        f"MoVE-KD {stage}, online teachers": StepParts(model, optimizer_for(model, distiller), distiller, online),
    }
    variants = {name: (lambda p=p: training_step(p, batch, grid)) for name, p in parts.items()}
    times = timed_rounds(variants, args.step_rounds, args.warmup, args.box_s, device)
    memory = {}
    for name, part in parts.items():
        modules = [part.model] + ([part.distiller] if part.distiller is not None else [])
        modules += teachers if "online" in name else []
        memory[name] = (state_bytes(modules, [part.optimizer]), step_peak_bytes(variants[name], device))
    summary = summarise(times, baseline=f"plain LLaVA {stage}", memory=memory)
    return {"batch": sizes["batch"], "text_tokens": sizes["text_tokens"], "unit": "ms per step", "summary": summary}


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny widths: checks the code paths, e.g. on CPU")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--llm-layers", type=int, default=4, help="layers of the 7B-shaped LLM (32 is the full one)")
    parser.add_argument("--batch", type=int, default=8, help="samples per training step")
    parser.add_argument("--text-tokens", type=int, default=128, help="text tokens per sample (plus 576 image tokens)")
    parser.add_argument("--encoder-batch", type=int, default=None, help="images (default 16; --tiny 2)")
    parser.add_argument("--teacher-batch", type=int, default=None, help="images (default 4; --tiny 2)")
    parser.add_argument("--adapter", default="token_mix", choices=("token_mix", "resample"))
    parser.add_argument("--encoder-rounds", type=int, default=None, help="at most (default 20; --tiny 1)")
    parser.add_argument("--teacher-rounds", type=int, default=None, help="at most (default 10; --tiny 1)")
    parser.add_argument("--step-rounds", type=int, default=None, help="at most (default 6; --tiny 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1; --tiny 0)")
    parser.add_argument("--box-s", type=float, default=60.0, help="time box of each section's timed rounds (s)")
    parser.add_argument("--deadline-s", type=float, default=540.0, help="sections not started by then are skipped")
    parser.add_argument("--out", type=Path, default=None, help="JSON result path (default benchmarks/results/)")
    args = parser.parse_args(argv)
    defaults = TINY_DEFAULTS if args.tiny else PAPER_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"--sections: unknown {sorted(unknown)}; expected a subset of {SECTIONS}")
    return args


def table_rows(results: Mapping[str, dict]) -> list[dict]:
    rows = []
    for section, result in results.items():
        if "error" in result or "skipped" in result:
            rows.append({"section": section, "variant": result.get("error") or result["skipped"]})
            continue
        for name, stats in result["summary"].items():
            rows.append({
                "section": section,
                "variant": name,
                "rounds": stats["rounds"],
                "median ms": stats["median_s"] * 1e3,
                "ratio": stats["ratio"],
                "state GB": "" if stats["state_gb"] is None else stats["state_gb"],
                "step GB": "" if stats["step_gb"] is None else stats["step_gb"],
                "peak GB": "" if stats["peak_gb"] is None else stats["peak_gb"],
            })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: skipped: no CUDA GPU here (run with --device cpu --tiny to check the code paths)")
        return 0
    started = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    sizes = tiny_sizes(2) if args.tiny else paper_sizes(args.llm_layers, args.batch, args.text_tokens)
    wanted = args.sections.split(",")
    results: dict[str, dict] = {}
    teachers: list[Teacher] = []
    for section in SECTIONS:
        if section not in wanted:
            continue
        if time.perf_counter() - started > args.deadline_s:
            results[section] = {"skipped": f"skipped: past --deadline-s {args.deadline_s:g}"}
            continue
        began = time.perf_counter()
        try:
            if section != "encoder" and not teachers:
                teachers = build_teachers_on(v11_teacher_specs(args.tiny, sizes), device, dtype)
            if section == "encoder":
                results[section] = encoder_section(args, sizes, device, dtype)
            elif section == "teachers":
                results[section] = teacher_section(args, sizes, teachers, device)
            else:
                results[section] = stage_section(args, section, sizes, teachers, device, dtype)
        except Exception as error:  # one failing section must not cost the others their run
            traceback.print_exc()
            results[section] = {"error": f"failed: {type(error).__name__}: {str(error)[:200]}"}
        results[section]["seconds"] = time.perf_counter() - began
        free(device)
    print(
        f"MoVE-KD at {'tiny' if args.tiny else 'paper'} widths on {describe(device)}, {args.dtype}, "
        f"LLM {sizes['text']['num_hidden_layers']} layers, step batch {sizes['batch']}, "
        f"{time.perf_counter() - started:.0f} s"
    )
    columns = ["section", "variant", "rounds", "median ms", "ratio", "state GB", "step GB", "peak GB"]
    print(format_table(table_rows(results), columns))
    print("ratios: to the section's first row; teachers: median ms per image")
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    payload = {"settings": settings, "sizes": sizes, "device": describe(device), "results": results}
    path = write_result("gpu", payload, args.out, args.tiny)
    print(f"wrote {path}")
    return 1 if any("error" in result for result in results.values()) else 0


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return f"{device.type} (torch {torch.__version__})"


if __name__ == "__main__":
    sys.exit(main())
