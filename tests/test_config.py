"""MoVEKDConfig: round-trips, presets, and errors that name the field."""

import pytest
from _model_fixtures import TINY_TEXT, TINY_VISION

from movekd_hf import MoVEKDConfig, MoVEKDNextConfig
from movekd_hf.modeling.configuration_movekd import FAITHFUL_MOLE, MOLE_DEFAULTS


def tiny_config(**overrides) -> MoVEKDConfig:
    return MoVEKDConfig(vision_config=TINY_VISION, text_config=TINY_TEXT, image_token_index=260, **overrides)


def test_defaults_are_the_improved_settings_and_faithful_switches_them():
    config = tiny_config()
    assert {name: getattr(config, name) for name in MOLE_DEFAULTS} == MOLE_DEFAULTS
    assert not config.is_faithful
    faithful = tiny_config(faithful=True)
    assert faithful.is_faithful
    assert faithful.lora_b_init == "kaiming" and faithful.expert_output_scale == "none"
    assert {name: getattr(faithful, name) for name in FAITHFUL_MOLE} == FAITHFUL_MOLE


def test_round_trip_through_dict_and_folder(tmp_path):
    config = tiny_config(num_experts=4, lora_rank=8, lora_alpha=2.0, mole_routing="dense", faithful=True)
    config.save_pretrained(tmp_path)
    loaded = MoVEKDConfig.from_pretrained(tmp_path)
    again = MoVEKDConfig.from_dict(config.to_dict())
    for other in (loaded, again):
        assert other.to_dict() == config.to_dict()
        assert other.vision_config.hidden_size == 32 and other.text_config.hidden_size == 40
        assert other.lora_scaling == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_experts", 0),
        ("num_experts", 2.5),
        ("lora_rank", -1),
        ("lora_alpha", 0),
        ("lora_dropout", 1.0),
        ("lora_bias", "yes"),
        ("mole_routing", "top2"),
        ("lora_b_init", "normal"),
        ("expert_output_scale", "softmax"),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`") as error:
        tiny_config(**{field: value})
    assert repr(value) in str(error.value)


def test_next_variant_shares_the_mole_settings():
    config = MoVEKDNextConfig(vision_config=TINY_VISION, text_config=TINY_TEXT, lora_rank=6, faithful=True)
    assert config.model_type == "movekd_llava_next"
    assert config.lora_rank == 6 and config.is_faithful
    with pytest.raises(ValueError, match="`mole_routing`"):
        MoVEKDNextConfig(mole_routing="nope")


def test_a_release_outside_the_tested_range_logs_one_line():
    import logging

    from transformers.utils import logging as hf_logging

    from movekd_hf.modeling.configuration_movekd import TESTED_TRANSFORMERS, check_tested_transformers

    oldest, newest = TESTED_TRANSFORMERS
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = hf_logging.get_logger("movekd_hf.modeling.configuration_movekd")
    logger.addHandler(handler)
    try:
        assert check_tested_transformers("5.24.0", running=oldest) and check_tested_transformers(None, running=newest)
        assert not records
        assert not check_tested_transformers("5.24.0", running="99.1.0.dev0")
        assert not check_tested_transformers("5.24.0", running="99.1.0.dev0")  # once, not per config
    finally:
        logger.removeHandler(handler)
    assert len(records) == 1
    message = records[0].getMessage()
    assert "99.1.0.dev0" in message and f"{oldest}..{newest}" in message and "5.24.0" in message


def test_the_locked_transformers_is_inside_the_tested_range():
    import transformers

    from movekd_hf.modeling.configuration_movekd import check_tested_transformers

    assert check_tested_transformers("test", running=transformers.__version__)
