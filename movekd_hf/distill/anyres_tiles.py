"""LLaVA-OneVision's AnyRes tiles as the teachers see them: which tiles an image gives and how each is rendered.

LLaVA-OneVision's image processor (transformers' `LlavaOnevisionImageProcessor`) shows its tower several square
tiles of one image alone in its sample: the whole image squashed to the tile size S (the base view), then the image
resized, keeping its aspect, into the best of the `image_grid_pinpoints` (`select_best_resolution`), centred on a
black canvas of that size and cut into S x S tiles, row by row. An image of a multi-image sample is one tile only:
the image padded to a square with the normalisation mean.

The teachers see the same tiles in the same order, each cut from the raw image with the processor's geometry at a
side of the teachers' choosing (`tile_view_side`), so a teacher larger than S sees the image's own detail. Both the
training collator (training/anyres.py) and the teacher-feature cache (cache_writer.py) render them here, so a cached
tile is computed from the pixels an online teacher gets.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from PIL import Image
from transformers.image_processing_utils import select_best_resolution

from ..modeling.llava_conventions import expand_to_square
from .teacher_views import ViewSettings

# The processor pads the resized image onto its pinpoint canvas with zeros before normalising: black.
CANVAS_COLOUR = (0, 0, 0)


@dataclass(frozen=True)
class AnyResLayout:
    """Where the image processor puts one image (pixels, (height, width) pairs): `canvas` is the pinpoint chosen by
    `select_best_resolution`, `resized` the image inside it (aspect kept), `offset` its top-left corner on the
    black canvas, `tile` the tile side S."""

    canvas: tuple[int, int]
    resized: tuple[int, int]
    offset: tuple[int, int]
    tile: int

    def tile_boxes(self) -> list[tuple[int, int, int, int]]:
        """(left, top, right, bottom) of each grid tile on the canvas, row by row (`divide_to_patches`' order); a
        canvas side that is not a multiple of S ends in a narrower tile, which the processor stretches to S."""
        height, width = self.canvas
        return [
            (left, top, min(left + self.tile, width), min(top + self.tile, height))
            for top in range(0, height, self.tile)
            for left in range(0, width, self.tile)
        ]


def anyres_layout(size: tuple[int, int], grid_pinpoints: Sequence[Sequence[int]], tile: int) -> AnyResLayout:
    """The layout of an image of `size` (height, width): transformers' `select_best_resolution`, then the
    image processor's aspect-keeping resize (`get_patch_output_size`: the limiting side fills the canvas, the other
    is rounded up) and centred padding (`_get_padding_size`: the odd pixel goes to the bottom/right)."""
    height, width = size
    canvas = tuple(select_best_resolution((height, width), [list(p) for p in grid_pinpoints]))
    scale_h, scale_w = canvas[0] / height, canvas[1] / width
    if scale_w < scale_h:
        resized = (min(math.ceil(height * scale_w), canvas[0]), canvas[1])
    else:
        resized = (canvas[0], min(math.ceil(width * scale_h), canvas[1]))
    offset = ((canvas[0] - resized[0]) // 2, (canvas[1] - resized[1]) // 2)
    return AnyResLayout(canvas, resized, offset, tile)


def tile_views(image: Image.Image, layout: AnyResLayout, side: int) -> list[Image.Image]:
    """The tiles the tower sees of `image` as square RGB views of `side` px, in the tower's order: the base view
    (the image squashed to the square), then the grid tiles row by row, each rendered from the raw image at
    `side / S` times the processor's scale (so a teacher larger than S sees the image's own detail), on black."""
    scale = side / layout.tile
    views = [image.resize((side, side), Image.Resampling.BICUBIC)]
    resized = image.resize(
        (round(layout.resized[1] * scale), round(layout.resized[0] * scale)), Image.Resampling.BICUBIC
    )
    top, left = round(layout.offset[0] * scale), round(layout.offset[1] * scale)
    for box in layout.tile_boxes():
        x0, y0, x1, y1 = (round(edge * scale) for edge in box)
        view = Image.new("RGB", (x1 - x0, y1 - y0), CANVAS_COLOUR)
        view.paste(resized, (left - x0, top - y0))  # PIL clips what falls outside the tile
        views.append(view if view.size == (side, side) else view.resize((side, side), Image.Resampling.BICUBIC))
    return views


def tile_count(size: tuple[int, int], grid_pinpoints: Sequence[Sequence[int]], tile: int, alone: bool) -> int:
    """Tower rows one image of `size` (height, width) gives: the base view plus its grid tiles when it is alone in
    its sample, else one."""
    return 1 + len(anyres_layout(size, grid_pinpoints, tile).tile_boxes()) if alone else 1


def max_tile_count(grid_pinpoints: Sequence[Sequence[int]], tile: int) -> int:
    """The most tower rows one image can give: the base view plus the largest pinpoint's grid."""
    return 1 + max(math.ceil(height / tile) * math.ceil(width / tile) for height, width in grid_pinpoints)


def tile_view_side(views: Iterable[ViewSettings] = (), teacher_image_size: int | None = None) -> int | None:
    """The side the teachers' tiles are rendered at: the largest input any teacher reads (a view's resize before
    its crop counts), or `teacher_image_size` for the one float square; None when there is no teacher."""
    sides = [teacher_image_size or 0] + [max(view.resize_size or 0, view.image_size) for view in views]
    return max(sides) or None


def image_tiles(
    image: Image.Image,
    alone: bool,
    grid_pinpoints: Sequence[Sequence[int]],
    tile: int,
    side: int,
    background: Sequence[int],
) -> list[Image.Image]:
    """One image's tower rows as the teachers see them: its `tile_views` (rendered at `side`) when it is alone in its
    sample, else the image padded to a square with `background`."""
    if not alone:
        return [expand_to_square(image, background)]
    return tile_views(image, anyres_layout((image.height, image.width), grid_pinpoints, tile), side)


def teacher_tiles(
    samples: Sequence[Sequence[Image.Image]],
    grid_pinpoints: Sequence[Sequence[int]],
    tile: int,
    side: int,
    background: Sequence[int],
) -> list[Image.Image]:
    """Every tower row of these samples' images as the teachers see them (`image_tiles`), in the tower's order."""
    return [
        square
        for images in samples
        for image in images
        for square in image_tiles(image, len(images) == 1, grid_pinpoints, tile, side, background)
    ]
