"""Linear probes: does an encoder's token at an object carry one of the object's attributes?

For every object of a scene the probe reads the encoder's token in the grid cell that holds the object's centre
(`object_items`, `tokens_at`), standardises the features with the training items' statistics, and fits a
multinomial logistic regression (full-batch L-BFGS, L2 penalty, zero initialisation, so the fit is deterministic)
on training scenes; it is scored on held-out scenes. The unit of the statistics is the held-out scene: a probe's
accuracy is the mean over scenes of the share of the scene's objects it classifies right (`per_scene`), so the
paired bootstrap over scenes (`movekd_hf.evaluation.compare.bootstrap_mean_difference`) resamples exactly the
numbers the accuracy averages.

The probe measures what is linearly decodable from the tokens (the knowledge a linear projector can pass to the
LLM); it is the encoder-level test of whether distillation moved a teacher's attribute into the student.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import world

PROBE_ATTRIBUTES = {"stripes": world.STRIPES, "colour": tuple(world.COLOURS)}


@dataclass(frozen=True)
class ObjectItems:
    """Every object of a list of scenes: scene index [M], centre (x, y) as canvas fractions [M, 2], and the class
    index of each attribute of PROBE_ATTRIBUTES ({name: [M]})."""

    scene: np.ndarray
    centre: np.ndarray
    labels: dict[str, np.ndarray]

    @property
    def num_scenes(self) -> int:
        return int(self.scene.max()) + 1 if len(self.scene) else 0


def object_items(scenes: list[world.Scene]) -> ObjectItems:
    """The probe items of `scenes`, objects in drawing order."""
    scene_index, centres, labels = [], [], {name: [] for name in PROBE_ATTRIBUTES}
    for index, scene in enumerate(scenes):
        for obj, x, y in world.object_centres(scene):
            scene_index.append(index)
            centres.append((x, y))
            for name, classes in PROBE_ATTRIBUTES.items():
                labels[name].append(classes.index(getattr(obj, name)))
    return ObjectItems(
        np.asarray(scene_index, dtype=np.int64),
        np.asarray(centres, dtype=np.float64).reshape(-1, 2),
        {name: np.asarray(values, dtype=np.int64) for name, values in labels.items()},
    )


def tokens_at(token_map: torch.Tensor, items: ObjectItems) -> torch.Tensor:
    """token_map [N, D, h, w] (one map per scene) -> [M, D]: each object's token, the cell holding its centre."""
    height, width = token_map.shape[-2:]
    rows = np.minimum((items.centre[:, 1] * height).astype(np.int64), height - 1)
    columns = np.minimum((items.centre[:, 0] * width).astype(np.int64), width - 1)
    return token_map[torch.from_numpy(items.scene), :, torch.from_numpy(rows), torch.from_numpy(columns)]


def token_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[N, h*w, D] patch tokens on `grid` -> [N, D, h, w]."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    num_classes: int,
    weight_decay: float = 1e-3,
    max_iter: int = 200,
) -> torch.Tensor:
    """Fit a logistic regression on (train_x [M, D], train_y [M] class indices) and predict test_x [M', D]: [M'].

    Features are standardised with the training mean and standard deviation; loss = cross-entropy +
    weight_decay * ||W||^2, minimised by L-BFGS (strong Wolfe line search) from zero weights, in float64.
    """
    train_x, test_x = train_x.detach().double(), test_x.detach().double()
    mean, std = train_x.mean(dim=0), train_x.std(dim=0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(train_x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")
    target = torch.as_tensor(train_y, dtype=torch.long)

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, target) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        return (test_x @ weight + bias).argmax(dim=1)


def per_scene(correct: np.ndarray, scene: np.ndarray, num_scenes: int) -> np.ndarray:
    """Share of each scene's objects classified right: correct [M] (0/1), scene [M] -> [num_scenes] in [0, 1].
    Every scene must hold at least one item (raises ValueError otherwise)."""
    counts = np.bincount(scene, minlength=num_scenes)
    if (counts == 0).any():
        raise ValueError(f"scenes without objects: {np.flatnonzero(counts == 0)[:5].tolist()}")
    return np.bincount(scene, weights=np.asarray(correct, dtype=np.float64), minlength=num_scenes) / counts


def probe_scenes(
    train_map: torch.Tensor, train_items: ObjectItems, test_map: torch.Tensor, test_items: ObjectItems
) -> dict[str, np.ndarray]:
    """For each attribute of PROBE_ATTRIBUTES, per-held-out-scene correctness (`per_scene`, [num test scenes]) of
    a linear probe fitted on the tokens of `train_map` [N, D, h, w] and applied to those of `test_map`."""
    train_x, test_x = tokens_at(train_map, train_items), tokens_at(test_map, test_items)
    out = {}
    for name, classes in PROBE_ATTRIBUTES.items():
        predicted = linear_probe(train_x, torch.from_numpy(train_items.labels[name]), test_x, len(classes))
        correct = predicted.numpy() == test_items.labels[name]
        out[name] = per_scene(correct, test_items.scene, test_items.num_scenes)
    return out


@torch.no_grad()
def student_token_map(vlm, pixel_values: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The student's patch tokens at `vision_feature_layer` (what the projector reads, MoLE included) as maps
    [N, D, h, w], for pixel_values [N, 3, H, W] from the VLM's image processor."""
    tower = vlm.model.vision_tower
    layer = vlm.config.vision_feature_layer
    was_training = tower.training
    tower.eval()
    maps = []
    for start in range(0, len(pixel_values), batch_size):
        hidden = tower(pixel_values[start : start + batch_size], output_hidden_states=True).hidden_states[layer]
        patches = hidden[:, 1:]  # CLS dropped (LLaVA's `default` strategy)
        side = int(round(patches.shape[1] ** 0.5))
        maps.append(token_map(patches, (side, side)))
    for mlp in vlm.model.mole_mlps():  # the tower alone ran: drop its router records, as a full forward does
        mlp.router_logits = None
    tower.train(was_training)
    return torch.cat(maps)
