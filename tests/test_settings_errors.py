"""Settings out of their domain fail where they are set, naming the field: a teacher `feature_layer` its tower does
not have (when the teacher is built, not as an IndexError in its first forward), and MoLE fields of a saved
`MoVEKDConfig` (when config.json is loaded). Real tiny teachers, real saved configs edited on disk."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _distill_fixtures import images, tiny_spec
from transformers import AutoConfig, AutoModelForImageTextToText

from movekd_hf.distill.teachers import build_teacher
from movekd_hf.errors import SettingsError
from movekd_hf.modeling import MoVEKDConfig, MoVEKDForConditionalGeneration, MoVEKDVisionConfig
from movekd_hf.models import build_config

# ------------------------------------------------------------------------------------------ teacher feature_layer

# (kind, depth): the tiny CLIP and SigLIP (transformers: embeddings + one hidden state per layer) and EVA-CLIP
# (timm: forward_intermediates indexes its blocks).
DEPTHS = {"clip": 4, "siglip": 3, "evaclip": 3}


@pytest.mark.parametrize("slug", sorted(DEPTHS))
@pytest.mark.parametrize("outside", ["above", "below"])
def test_a_feature_layer_outside_the_tower_fails_at_build_naming_teacher_layer_and_range(slug, outside):
    depth = DEPTHS[slug]
    layer = depth if outside == "above" else -depth - 1
    with pytest.raises(SettingsError) as caught:
        build_teacher(tiny_spec(slug, feature_layer=layer))
    message = str(caught.value)
    assert f"teacher {slug!r}" in message and f"feature_layer {layer}" in message, message
    low = -(depth - 1) if slug == "clip" else -depth  # clip's CLS attention row needs a layer, not the embeddings
    assert f"{-depth}..{depth - 1}" in message or f"{low}..-1" in message, message
    assert caught.value.field == "feature_layer"


@pytest.mark.parametrize("slug", sorted(DEPTHS))
def test_every_feature_layer_in_the_range_builds_and_runs(slug):
    # The range the error states is exactly what works: both ends give tokens of the tower's width.
    depth = DEPTHS[slug]
    first = 1 if slug == "clip" else 0
    for layer in (-(depth - first), depth - 1):
        teacher = build_teacher(tiny_spec(slug, feature_layer=layer))
        out = teacher(images(batch=1))
        assert out.tokens.shape[0] == 1 and torch.isfinite(out.tokens).all()


def test_cls_attention_at_the_embeddings_fails_at_build():
    for layer in (0, -4):  # both index hidden_states[0] of the 3-layer tiny CLIP
        with pytest.raises(SettingsError, match=r"feature_layer -?\d+ is the embeddings.*1\.\.3 or -3\.\.-1"):
            build_teacher(tiny_spec("clip", feature_layer=layer))


def test_a_bad_feature_layer_fails_on_the_meta_device_too():
    # `movekd-hf plan` builds teachers on the meta device: the check reads the config, not weights.
    with torch.device("meta"), pytest.raises(SettingsError, match="'siglip'.*feature_layer 5"):
        build_teacher(tiny_spec("siglip", feature_layer=5))


def test_feature_maps_have_no_layer_to_check():
    # SAM and ConvNeXt are read at their final map: feature_layer plays no part and is not refused.
    for slug in ("sam", "convnext"):
        assert build_teacher(tiny_spec(slug, feature_layer=99)).spec.feature_layer == 99


def test_feature_layer_must_be_an_int():
    with pytest.raises(ValueError, match="feature_layer for 'clip' must be an int, got '-2'"):
        tiny_spec("clip", feature_layer="-2")


# ----------------------------------------------------------------------------------------- saved MoVEKDConfig


@pytest.fixture(scope="module")
def saved_config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("config")
    build_config("tiny").save_pretrained(folder)
    return json.loads((folder / "config.json").read_text())


def _write(tmp_path, config: dict, **edits):
    folder = tmp_path / "edited"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**config, **edits}))
    return folder


BAD_FIELDS = [
    ({"num_experts": 0}, r"`num_experts` must be a positive int, got 0"),
    ({"num_experts": -2}, r"`num_experts` must be a positive int, got -2"),
    ({"lora_rank": 0}, r"`lora_rank` must be a positive int, got 0"),
    ({"lora_rank": 2.5}, r"`lora_rank` must be a positive int, got 2.5"),
    ({"num_experts_per_tok": 4}, r"`num_experts_per_tok` must be an int in 1..num_experts \(3\), got 4"),
    ({"num_experts_per_tok": 0}, r"`num_experts_per_tok` must be an int in 1..num_experts \(3\), got 0"),
    ({"num_experts_per_tok": 2}, r"`num_experts_per_tok` is 2, but mole_routing='sparse' routes each token to 1"),
    ({"num_experts_per_tok": 1, "mole_routing": "dense"}, r"mole_routing='dense' routes each token to 3 of 3"),
    ({"vision_feature_layer": 4}, r"`vision_feature_layer` 4 is not a hidden state of the 3-layer .* -4..3"),
    ({"vision_feature_layer": [-2, -5]}, r"`vision_feature_layer` \[-2, -5\] is not a hidden state"),
]


@pytest.mark.parametrize(
    "edits, message", BAD_FIELDS, ids=[next(iter(e)) + str(list(e.values())) for e, _ in BAD_FIELDS]
)
def test_a_saved_config_out_of_domain_fails_at_load_naming_the_field(saved_config, tmp_path, edits, message):
    folder = _write(tmp_path, saved_config, **edits)
    for load in (MoVEKDConfig.from_pretrained, AutoConfig.from_pretrained):
        with pytest.raises(ValueError, match=message):
            load(folder)


def test_consistent_values_load(saved_config, tmp_path):
    assert MoVEKDConfig.from_pretrained(_write(tmp_path, saved_config, num_experts_per_tok=1)).num_experts_per_tok == 1
    dense = _write(tmp_path, saved_config, num_experts_per_tok=3, mole_routing="dense", vision_feature_layer=[-1, 0])
    assert AutoConfig.from_pretrained(dense).mole_routing == "dense"


def test_a_saved_checkpoint_with_a_bad_setting_fails_before_any_weight_loads(tiny_checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 5}))
    for load in (MoVEKDForConditionalGeneration.from_pretrained, AutoModelForImageTextToText.from_pretrained):
        with pytest.raises(ValueError, match="num_experts_per_tok"):
            load(folder)


def test_the_vision_config_checks_its_experts_too():
    with pytest.raises(ValueError, match="`num_experts_per_tok` must be an int in 1..num_experts \\(2\\), got 3"):
        MoVEKDVisionConfig(num_experts=2, num_experts_per_tok=3)
