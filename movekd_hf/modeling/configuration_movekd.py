"""MoVE-KD configuration: a LLaVA config whose vision tower carries a Mixture of LoRA Experts (MoLE).

This file ships inside checkpoints as remote code, so it imports only torch/transformers and runs on
transformers 4.57 and 5.x alike. The vision config stays a stock CLIP/SigLIP config (transformers does not
resolve a custom nested model type through remote code); every MoLE setting lives at the top level.
"""

import transformers
from transformers import CLIPVisionConfig, LlavaConfig, LlavaNextConfig, LlavaOnevisionConfig

logger = transformers.logging.get_logger(__name__)

# The transformers releases this remote code was tested on (`make test`'s version matrix: the oldest 4.x and 5.x,
# the locked release). A checkpoint loaded outside them logs one line; newer releases are tested by CI at install
# time and by `make test-latest`.
TESTED_TRANSFORMERS = ("4.57.6", "5.24.0")

MOLE_ROUTING = ("sparse", "dense")
LORA_B_INIT = ("zeros", "kaiming")
EXPERT_OUTPUT_SCALE = ("straight_through", "probability", "none")

# Defaults improve on the authors' code; `faithful` reproduces it (METHOD.md section 6).
MOLE_DEFAULTS = {
    "num_experts": 3,
    "lora_rank": 32,
    "lora_alpha": 1.0,
    "lora_dropout": 0.05,
    "lora_bias": True,
    "mole_routing": "sparse",
    "lora_b_init": "zeros",
    "expert_output_scale": "straight_through",
}
FAITHFUL_MOLE = {"lora_b_init": "kaiming", "expert_output_scale": "none"}


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def _check_positive(name: str, value, kind: type, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or value < 0 or (value == 0 and not allow_zero):
        expected = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"`{name}` must be {expected} {kind.__name__}, got {value!r}.")


def validate_mole_settings(settings: dict) -> None:
    """Raise a `ValueError` naming the field for any MoLE setting outside its domain."""
    _check_positive("num_experts", settings["num_experts"], int)
    _check_positive("lora_rank", settings["lora_rank"], int)
    alpha = settings["lora_alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(f"`lora_alpha` must be a positive number, got {alpha!r}.")
    dropout = settings["lora_dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"`lora_dropout` must be a number in [0, 1), got {dropout!r}.")
    if not isinstance(settings["lora_bias"], bool):
        raise ValueError(f"`lora_bias` must be a bool, got {settings['lora_bias']!r}.")
    _check_choice("mole_routing", settings["mole_routing"], MOLE_ROUTING)
    _check_choice("lora_b_init", settings["lora_b_init"], LORA_B_INIT)
    _check_choice("expert_output_scale", settings["expert_output_scale"], EXPERT_OUTPUT_SCALE)


def validate_experts_per_token(value, num_experts: int, routing: str) -> None:
    """`num_experts_per_tok` (the Mixtral-style name) is not a MoLE setting: routing fixes it (top-1 when sparse,
    every expert when dense; METHOD.md section 2). A config may carry it only with that value, so a config written
    for top-k routing fails here instead of silently running top-1."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= num_experts:
        raise ValueError(f"`num_experts_per_tok` must be an int in 1..num_experts ({num_experts}), got {value!r}.")
    implied = 1 if routing == "sparse" else num_experts
    if value != implied:
        raise ValueError(
            f"`num_experts_per_tok` is {value}, but mole_routing={routing!r} routes each token to {implied} of "
            f"{num_experts} experts (MoLE has no top-k routing); expected {implied}, or leave the field out."
        )


def validate_feature_layer(value, num_hidden_layers: int) -> None:
    """`vision_feature_layer` (an int or a list of ints, LLaVA's field) must index the tower's hidden states: the
    embeddings plus one per layer, so -(L + 1)..L for L layers."""
    count = num_hidden_layers + 1
    for layer in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -count <= layer < count:
            raise ValueError(
                f"`vision_feature_layer` {value!r} is not a hidden state of the {num_hidden_layers}-layer vision "
                f"tower; expected an int (or list of ints) in {-count}..{count - 1} (-1 = the last layer)."
            )


def _release(version: str) -> tuple:
    """(major, minor, patch) of a version string such as "5.24.0" or "5.25.0.dev0"."""
    parts = []
    for part in version.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit()) if part[:1].isdigit() else ""
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (3 - len(parts)))


def check_tested_transformers(written_with: str | None, running: str = transformers.__version__) -> bool:
    """Log one line when `running` lies outside `TESTED_TRANSFORMERS`; True when it is inside."""
    oldest, newest = TESTED_TRANSFORMERS
    if _release(oldest) <= _release(running) <= _release(newest):
        return True
    logger.warning_once(
        f"MoVE-KD remote code: transformers {running} is outside the tested range {oldest}..{newest} "
        f"(checkpoint written with {written_with or 'an unknown version'}); outputs are not guaranteed."
    )
    return False


class _MoLESettingsMixin:
    """Shared MoLE fields for the LLaVA, LLaVA-NeXT and LLaVA-OneVision variants."""

    def _check_release(self) -> None:
        # `transformers_version` is what the checkpoint's config.json recorded (set by `save_pretrained`).
        check_tested_transformers(getattr(self, "transformers_version", None))

    def _set_mole_settings(self, kwargs: dict) -> dict:
        faithful = kwargs.pop("faithful", False)
        settings = {name: kwargs.pop(name, default) for name, default in MOLE_DEFAULTS.items()}
        if faithful:
            settings.update(FAITHFUL_MOLE)
        validate_mole_settings(settings)
        if "num_experts_per_tok" in kwargs:  # kept as given once consistent (transformers keeps unknown fields)
            validate_experts_per_token(
                kwargs["num_experts_per_tok"], settings["num_experts"], settings["mole_routing"]
            )
        for name, value in settings.items():
            setattr(self, name, value)
        return kwargs

    def _check_feature_layer(self) -> None:
        layers = getattr(self.vision_config, "num_hidden_layers", None)
        if layers is not None:
            validate_feature_layer(self.vision_feature_layer, layers)

    @property
    def lora_scaling(self) -> float:
        return self.lora_alpha / self.lora_rank

    @property
    def is_faithful(self) -> bool:
        return all(getattr(self, name) == value for name, value in FAITHFUL_MOLE.items())


class MoVEKDConfig(_MoLESettingsMixin, LlavaConfig):
    r"""
    Configuration of [`MoVEKDForConditionalGeneration`]: LLaVA-1.5 whose vision encoder MLPs carry MoLE.

    Args:
        vision_config (`dict` or `CLIPVisionConfig`/`SiglipVisionConfig`): the student encoder, a stock config.
        text_config (`dict` or any causal LM config): the language model.
        num_experts (`int`, defaults to 3): LoRA experts per MLP (paper: 3).
        lora_rank (`int`, defaults to 32), lora_alpha (`float`, defaults to 1.0): LoRA rank and scaling
            numerator; experts are scaled by `lora_alpha / lora_rank`.
        lora_dropout (`float`, defaults to 0.05): dropout on the LoRA input.
        lora_bias (`bool`, defaults to `True`): LoRA A and B carry biases, as in the authors' code.
        mole_routing (`"sparse"` or `"dense"`): top-1 expert per token, or the probability-weighted sum.
        lora_b_init (`"zeros"` or `"kaiming"`): `"zeros"` keeps the student equal to CLIP at step 0;
            `"kaiming"` (faithful) initialises B like A, as the authors' code does.
        expert_output_scale (`"straight_through"`, `"probability"` or `"none"`): how the sparse path weights
            the chosen expert. `"none"` (faithful) leaves the router trained by the balance loss alone;
            `"probability"` multiplies by p_k; `"straight_through"` multiplies by p_k / stop_grad(p_k), which
            keeps the faithful forward values while the task gradient reaches the router.
        faithful (`bool`): shorthand setting every switch above to the authors' behaviour.
    """

    model_type = "movekd_llava"

    def __init__(self, vision_config=None, text_config=None, **kwargs):
        kwargs = self._set_mole_settings(kwargs)
        super().__init__(vision_config=vision_config, text_config=text_config, **kwargs)
        self._check_feature_layer()
        self._check_release()


class MoVEKDNextConfig(_MoLESettingsMixin, LlavaNextConfig):
    r"""Configuration of [`MoVEKDNextForConditionalGeneration`]: LLaVA-NeXT (any-resolution tiles) with a MoLE
    vision tower. Takes the MoLE arguments documented in [`MoVEKDConfig`]."""

    model_type = "movekd_llava_next"

    def __init__(self, vision_config=None, text_config=None, **kwargs):
        kwargs = self._set_mole_settings(kwargs)
        super().__init__(vision_config=vision_config, text_config=text_config, **kwargs)
        self._check_feature_layer()
        self._check_release()


class MoVEKDOnevisionConfig(_MoLESettingsMixin, LlavaOnevisionConfig):
    r"""Configuration of [`MoVEKDOnevisionForConditionalGeneration`]: LLaVA-OneVision (a SigLIP tower seeing AnyRes
    tiles, a Qwen2 LLM) with a MoLE vision tower. Takes the MoLE arguments documented in [`MoVEKDConfig`]; every
    LLaVA-OneVision field (`image_grid_pinpoints`, `vision_aspect_ratio`, ...) keeps its meaning."""

    model_type = "movekd_llava_onevision"

    def __init__(self, vision_config=None, text_config=None, **kwargs):
        kwargs = self._set_mole_settings(kwargs)
        super().__init__(vision_config=vision_config, text_config=text_config, **kwargs)
        self._check_feature_layer()
        self._check_release()


class MoVEKDVisionConfig(_MoLESettingsMixin, CLIPVisionConfig):
    r"""Configuration of [`MoVEKDVisionModel`]: the distilled student encoder on its own, a CLIP vision config
    plus the MoLE arguments documented in [`MoVEKDConfig`]."""

    model_type = "movekd_clip_vision"

    def __init__(self, **kwargs):
        kwargs = self._set_mole_settings(kwargs)
        super().__init__(**kwargs)
        self._check_release()
