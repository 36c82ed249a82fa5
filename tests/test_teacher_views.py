"""Each teacher's own uint8 view, made in the collator (issue 18.3): the same pixels as transformers' image
processors for every resize mode, the `clip` anchor's view the student's own processor output, views made in real
DataLoader workers, and training steps whose online teachers run on views (no float `teacher_images` built).

Tolerances, in 8-bit steps of the [0, 1] image (the normalised difference times 255 std):
- transformers' torchvision processors (CLIPImageProcessor / SamImageProcessor / SiglipImageProcessor): 1e-4
  steps, i.e. equal up to float rounding of the normalisation: the same torchvision uint8 kernels and the same
  fused `(x - 255 mean) / (255 std)` (measured: bit-equal on this machine).
- the PIL processor LLaVA-1.5 was trained with (CLIPImageProcessorPil, PIL bicubic): at most 2 steps anywhere and
  under 0.02 on average (torch's antialiased uint8 kernels follow PIL's filters; their fixed-point rounding differs
  by a step here and there; measured 0.002-0.005 on average).
- the old float path (`prepare_images` on the same image in [0, 1]): the view is rounded to bytes (half a step) and
  torchvision's separable uint8 resize clamps to 0..255 between its two passes where bicubic overshoots, so the
  mean stays under 0.5 steps and 99.9 % of values within 1 step (the clamped edge pixels of a bicubic view may
  differ by more: measured up to 12 steps on coffee()).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from torch.utils.data import DataLoader
from transformers import CLIPImageProcessor, CLIPImageProcessorPil, SamImageProcessor, SiglipImageProcessor
from transformers.image_utils import PILImageResampling

from movekd_hf.distill.anchor import ANCHOR, anchor_teacher_spec
from movekd_hf.distill.presets import PAPER_TEACHERS, TINY_TEACHERS
from movekd_hf.distill.teacher_views import ViewSettings, make_views, view_settings
from movekd_hf.distill.teachers import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TeacherSpec,
    build_teacher,
    prepare_images,
    prepare_view,
)
from movekd_hf.modeling.llava_conventions import mean_colour, square_view
from movekd_hf.models import build_image_processor, from_preset
from movekd_hf.training.arguments import MoVEKDTrainingArguments
from movekd_hf.training.collator import MoVEKDDataCollator
from movekd_hf.training.data_args import MoVEKDDataArguments, build_train_data
from movekd_hf.training.teacher_source import OnlineTeachers
from movekd_hf.training.toy_data import make_toy_llava_dataset
from movekd_hf.training.trainer import MoVEKDTrainer

PHOTOS = {"astronaut": data.astronaut, "chelsea": data.chelsea}  # 512 x 512 and 451 x 300 (non-square)
HALF = (0.5, 0.5, 0.5)
SPECS = {
    "crop": TeacherSpec("clip", "transformers", "clip", 336),
    "crop-resize-size": TeacherSpec("eva", "transformers", "eva", 336, resize_size=384),  # timm's crop_pct
    "pad": TeacherSpec(
        "sam",
        "transformers",
        "sam",
        1024,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resize_mode="pad",
        interpolation="bilinear",
    ),  # fmt: skip
    "squash": TeacherSpec(
        "siglip", "transformers", "siglip", 384, mean=HALF, std=HALF, resize_mode="squash", interpolation="bilinear"
    ),
}
RESAMPLE = {"bilinear": PILImageResampling.BILINEAR, "bicubic": PILImageResampling.BICUBIC}


def transformers_processor(spec: TeacherSpec):
    """The transformers image processor that prepares images as `spec` says (torchvision-backed in 5.x)."""
    common = dict(image_mean=list(spec.mean), image_std=list(spec.std), resample=RESAMPLE[spec.interpolation])
    size = spec.image_size
    if spec.resize_mode == "crop":
        edge = spec.resize_size or size
        return CLIPImageProcessor(size={"shortest_edge": edge}, crop_size={"height": size, "width": size}, **common)
    if spec.resize_mode == "pad":
        return SamImageProcessor(size={"longest_edge": size}, pad_size={"height": size, "width": size}, **common)
    return SiglipImageProcessor(size={"height": size, "width": size}, **common)


def steps(a: torch.Tensor, b: torch.Tensor, spec: TeacherSpec) -> torch.Tensor:
    """|a - b| of two normalised inputs in 8-bit steps of the image."""
    return (a - b).abs() * torch.tensor(spec.std).view(1, 3, 1, 1) * 255


def device_input(image: Image.Image, spec: TeacherSpec) -> torch.Tensor:
    """The view made as the collator makes it, then cast and normalised as `Teacher.forward` does."""
    views, sizes = make_views([image], view_settings([spec]))
    assert views[spec.slug].dtype == torch.uint8
    return prepare_view(views[spec.slug], spec, sizes.get(spec.slug))


@pytest.mark.parametrize("photo_name", sorted(PHOTOS))
@pytest.mark.parametrize("mode", sorted(SPECS))
def test_views_match_transformers_processors_and_the_float_path(mode, photo_name):
    spec, image = SPECS[mode], Image.fromarray(PHOTOS[photo_name]())
    ours = device_input(image, spec)  # [1, 3, S, S]
    theirs = transformers_processor(spec)(images=[image], return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (1, 3, spec.image_size, spec.image_size)
    assert steps(ours, theirs, spec).max() < 1e-4
    unit = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255  # [1, 3, H, W] in [0, 1]
    old = steps(ours, prepare_images(unit, spec), spec)
    assert old.mean() < 0.5 and old.flatten().kthvalue(int(old.numel() * 0.999)).values <= 1.001
    if mode == "pad" and image.width != image.height:  # SAM's zero padding, after normalising (a mask of 1 image)
        height = round(image.height * spec.image_size / image.width)
        assert ours[..., height:, :].abs().max() == 0 and ours[..., :height, :].abs().amax(dim=(0, 1, 3)).min() > 0


def test_the_clip_anchor_sees_what_the_student_processor_makes():
    model, processor = from_preset("tiny")
    student = processor.image_processor
    anchor = anchor_teacher_spec(model.config, student.image_mean, student.image_std)
    paper = build_image_processor(336)  # LLaVA-1.5's CLIP-L/336 processor, and the paper's clip teacher
    faithful = CLIPImageProcessorPil(
        **{k: paper.to_dict()[k] for k in ("size", "crop_size", "image_mean", "image_std")}
    )
    for name in PHOTOS:
        for image_processor, spec in ((student, anchor), (paper, PAPER_TEACHERS["clip"])):
            square = square_view(Image.fromarray(PHOTOS[name]()), "pad", mean_colour(image_processor))
            ours = device_input(square, spec)
            theirs = image_processor(images=[square], return_tensors="pt")["pixel_values"]
            assert steps(ours, theirs, spec).max() < 1e-4
        pil = steps(ours, faithful(images=[square], return_tensors="pt")["pixel_values"], spec)
        assert pil.max() <= 2.001 and pil.mean() < 0.02


def test_teachers_with_one_geometry_share_a_view_and_inputs_are_checked(photo):
    specs = [PAPER_TEACHERS[slug] for slug in ("clip", "eva", "convnext", "sam")]
    views, sizes = make_views([photo.resize((96, 96))], view_settings(specs))
    assert views["eva"] is views["convnext"]  # both 1024 px crop bicubic: made once
    assert {slug: tuple(v.shape) for slug, v in views.items()} == {
        "clip": (1, 3, 336, 336), "eva": (1, 3, 1024, 1024), "convnext": (1, 3, 1024, 1024), "sam": (1, 3, 1024, 1024)
    }  # fmt: skip
    assert sizes == {}  # a square fills SAM's view: nothing to pad on the device
    with pytest.raises(ValueError, match=r"uint8 view \[B, 3, 1024, 1024\]"):
        prepare_view(views["clip"], PAPER_TEACHERS["eva"])
    with pytest.raises(ValueError, match="interpolation"):
        ViewSettings(64, interpolation="lanczos")
    teacher = build_teacher(TINY_TEACHERS["convnext"])
    view = make_views([photo], view_settings([teacher.spec]))[0]["convnext"]
    with pytest.raises(ValueError, match="either `images` or `view`"):
        teacher(torch.rand(1, 3, 64, 64), view=view)
    assert teacher(view=view).tokens.shape == (1, 4, 40)


def toy_data(tmp_path, processor, num_samples: int):
    toy = make_toy_llava_dataset(tmp_path / "toy", num_samples=num_samples, image_size=80)
    return build_train_data(
        MoVEKDDataArguments(data_path=toy.pretrain_json, image_folder=toy.image_folder, template="plain"), processor
    )


def test_the_collator_makes_views_in_dataloader_workers(tmp_path):
    _, processor = from_preset("tiny")
    data = toy_data(tmp_path, processor, num_samples=8)
    specs = [*TINY_TEACHERS.values(), PAPER_TEACHERS["eva"]]  # clip 32 crop, convnext 64 crop, sam 64 pad, eva 1024
    collator = MoVEKDDataCollator(
        processor.image_processor, processor.tokenizer.pad_token_id, teacher_views=view_settings(specs)
    )
    loader = DataLoader(data.dataset, batch_size=4, num_workers=2, collate_fn=collator)
    batches = list(loader)
    assert len(batches) == 2
    for start, batch in zip((0, 4), batches, strict=True):
        assert "teacher_images" not in batch
        expected = collator([data.dataset[i] for i in range(start, start + 4)])  # in this process
        assert set(batch["teacher_views"]) == {"clip", "convnext", "sam", "eva"}
        for spec in specs:
            view = batch["teacher_views"][spec.slug]
            assert view.dtype == torch.uint8 and view.shape == (4, 3, spec.image_size, spec.image_size)
            assert torch.equal(view, expected["teacher_views"][spec.slug])
        assert batch["teacher_view_sizes"] == {}  # the collator's squares fill the `pad` view of sam


def test_training_steps_feed_online_teachers_their_views(tmp_path):
    model, processor = from_preset("tiny")
    data = toy_data(tmp_path, processor, num_samples=8)
    args = MoVEKDTrainingArguments(
        output_dir=str(tmp_path / "run"), stage="stage1", kd_preset="default", max_steps=2, logging_steps=1,
        per_device_train_batch_size=4, save_strategy="no", report_to="none", disable_tqdm=True,
        ddp_find_unused_parameters=True,
    )  # fmt: skip
    trainer = MoVEKDTrainer(model, args, teachers="tiny", train_dataset=data.dataset, processing_class=processor)
    collator, source = trainer.data_collator, trainer.teacher_source
    assert isinstance(source, OnlineTeachers) and collator.teacher_image_size is None
    assert set(collator.teacher_views) == {ANCHOR, "convnext", "sam"}
    seen: list[tuple[str, bool, torch.dtype]] = []

    def record(teacher, args_, kwargs):
        view = kwargs.get("view")
        seen.append((teacher.slug, bool(args_) or kwargs.get("images") is not None, getattr(view, "dtype", None)))

    for teacher in source.teachers.values():
        teacher.register_forward_pre_hook(record, with_kwargs=True)
    trainer.train()
    assert trainer.state.global_step == 2
    assert sorted(seen) == sorted([(slug, False, torch.uint8) for slug in source.teachers] * 2)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all("kd_loss" in entry and "kd/sam_weight" in entry for entry in logs)


def test_the_benchmark_reports_views_equal_to_the_processors(tmp_path):
    """benchmarks/bench_teacher_inputs.py --quick: its `pixels` entry (what benchmarks/README.md quotes)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_teacher_inputs.py"
    out = tmp_path / "teacher_inputs.json"
    subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)], check=True, capture_output=True)
    result = json.loads(out.read_text())
    assert set(result["summary"]) >= {"HF image processors", "teacher views + normalise on CPU (ours)"}
    differences = {slug: d["max"] for slug, d in result["pixels"]["teacher views"].items()}
    assert set(differences) == {"clip", "eva", "convnext", "sam"} and max(differences.values()) < 1e-4
