"""Each teacher's own view of an image, made once per image at the teacher's size, as uint8 (issue 18.3).

The collator (in the data-loader workers) resizes every square image straight to each teacher's input size with
torchvision's antialiased kernels on uint8 tensors, the kernels transformers' torchvision image processors
(`CLIPImageProcessor`, `SamImageProcessor`, `SiglipImageProcessor` in transformers 5) run: a `crop` view is those
processors' resize-and-centre-crop, a `squash` view their resize to the square, a `pad` view SAM's longest side
resize, placed at the top left of a zero canvas. On the device only the cast, the normalisation and SAM's padding
remain (`teachers.prepare_view`), so the pixels a teacher sees equal its transformers processor's output.

Teachers whose views are the same geometry (e.g. EVA-02 and ConvNeXt, both 1024 px crop bicubic) share one view.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as tvF
from torchvision.transforms import InterpolationMode

from .teachers import RESIZE_MODES, TeacherSpec, resized_size

# `TeacherSpec.interpolation` -> torchvision's mode (the names `teacher_by_id.PIL_RESAMPLE` produces).
INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


@dataclass(frozen=True)
class ViewSettings:
    """The geometry of one teacher's view (`TeacherSpec`'s fields of the same names); normalisation is left to
    the device. Equal settings give equal views, so teachers that share them share one tensor."""

    image_size: int
    resize_mode: str = "crop"
    resize_size: int | None = None
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"ViewSettings.resize_mode is {self.resize_mode!r}; expected one of {RESIZE_MODES}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"ViewSettings.interpolation is {self.interpolation!r}; expected one of {sorted(INTERPOLATIONS)}"
            )
        if self.image_size <= 0:
            raise ValueError(f"ViewSettings.image_size must be positive, got {self.image_size}")

    @classmethod
    def from_spec(cls, spec: TeacherSpec) -> ViewSettings:
        return cls(spec.image_size, spec.resize_mode, spec.resize_size, spec.interpolation)


def view_settings(specs: Iterable[TeacherSpec]) -> dict[str, ViewSettings]:
    """{slug: ViewSettings} of these teachers (what `MoVEKDDataCollator(teacher_views=...)` takes)."""
    return {spec.slug: ViewSettings.from_spec(spec) for spec in specs}


def image_tensor(image: Any) -> torch.Tensor:
    """An RGB PIL image -> uint8 [3, H, W] (a channels-last layout: torch's uint8 resampling kernels are fastest
    on it, and give the same values as on a contiguous tensor)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # [3, H, W]


def teacher_view(image: torch.Tensor, settings: ViewSettings) -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 [3, H, W] -> (uint8 [3, S, S] view, (h, w) of the image inside it), S = `settings.image_size`.

    crop: shortest side to `resize_size or S` (other side truncated), centre crop, as CLIPImageProcessor does;
    squash: both sides to S; pad: longest side to S (other side rounded, as SamImageProcessor), the image at the top
    left and zeros elsewhere, (h, w) < (S, S) telling the device where to pad after normalising.
    Resizing is torchvision's antialiased `resize` on uint8 (its separable kernels clamp to 0..255 between the two
    passes, as transformers' torchvision processors and PIL do).
    """
    size = settings.image_size
    target = resized_size(image.shape[-2], image.shape[-1], settings)  # type: ignore[arg-type]  # same fields
    x = tvF.resize(image, list(target), interpolation=INTERPOLATIONS[settings.interpolation], antialias=True)
    if settings.resize_mode == "crop":
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        return x[:, top : top + size, left : left + size], (size, size)
    if settings.resize_mode == "pad":
        canvas = x.new_zeros(3, size, size)  # [3, S, S]
        canvas[:, : x.shape[-2], : x.shape[-1]] = x
        return canvas, (x.shape[-2], x.shape[-1])
    return x, (size, size)


def make_views(
    images: Sequence[Any], settings: Mapping[str, ViewSettings]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """RGB PIL images (the collator's squares) -> ({slug: uint8 [N, 3, S_t, S_t]}, {slug: int64 [N, 2]}).

    The second dict has the (h, w) of the image inside each `pad` view, for `pad` teachers whose views hold
    padding (none for square images: the device then skips the masking pass). Every image is converted to a tensor
    once and resized once per distinct geometry; slugs with equal settings get the same tensor. Raises
    `ValueError` for an empty image list (the collator gives None then).
    """
    if not images:
        raise ValueError("make_views needs at least one image")
    tensors = [image_tensor(image) for image in images]
    made: dict[ViewSettings, tuple[torch.Tensor, torch.Tensor]] = {}
    for view in dict.fromkeys(settings.values()):
        pairs = [teacher_view(tensor, view) for tensor in tensors]
        pixels = torch.stack([pixels for pixels, _ in pairs])  # [N, 3, S, S]
        made[view] = pixels, torch.tensor([valid for _, valid in pairs], dtype=torch.long)  # [N, 2]
    views = {slug: made[view][0] for slug, view in settings.items()}
    padded = {
        view for view, (_, valid) in made.items() if view.resize_mode == "pad" and (valid < view.image_size).any()
    }
    sizes = {slug: made[view][1] for slug, view in settings.items() if view in padded}
    return views, sizes
