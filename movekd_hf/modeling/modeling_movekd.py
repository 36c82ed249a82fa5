"""MoVE-KD models: LLaVA (and LLaVA-NeXT, LLaVA-OneVision) whose vision tower MLPs carry a Mixture of LoRA Experts.

The language model, projector and CLIP/SigLIP tower are transformers' own; only each encoder layer's `mlp`
is swapped for `MoLEMLP`, which keeps `fc1`/`fc2` weight names so stock checkpoints load with only the
LoRA/router keys missing. The forward adds what distillation needs: the router logits of every layer and the
student's patch tokens at `vision_feature_layer` (before the projector; CLS dropped whatever
`vision_feature_select_strategy` hands the projector, so they always lie on the patch grid the teachers' targets are
resampled to).

Shipped inside checkpoints as remote code: imports only torch/transformers (single-dot relative imports) and
runs on transformers 4.57 and 5.x.
"""

import dataclasses
import functools
import logging

import torch
import transformers
from torch import nn
from transformers import (
    CLIPVisionModel,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
)

from .configuration_movekd import MoVEKDConfig, MoVEKDNextConfig, MoVEKDOnevisionConfig, MoVEKDVisionConfig
from .llava_conventions import patch_tokens, student_grid
from .mole import MoLEMLP, init_mole_linear, mole_mlp_from

# `mole.py` imports it; named here as well because transformers 4.57, loading a local checkpoint's remote code,
# copies only the relative imports of the model's own file (the Hub path follows them further).
from .mole_sorted import SortedMoLELinearFunction  # noqa: F401

logger = transformers.logging.get_logger(__name__)


def _tower_wraps_vision_model() -> bool:
    """Whether this release's CLIP tower keeps its transformer under `.vision_model` (4.x and early 5.x do;
    5.24 does not). Asked of the class itself, built on the meta device, rather than of a version number."""
    config = transformers.CLIPVisionConfig(
        hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1, image_size=8, patch_size=8
    )
    with torch.device("meta"):
        return hasattr(CLIPVisionModel(config), "vision_model")


# Releases whose towers wrap `.vision_model` read legacy and current LLaVA keys through this class attribute
# (4.x: first matching pattern wins; early 5.x applies it to every "llava" class). Later releases use the
# registered conversion mappings instead (end of file), which also strip a saved `vision_model.` prefix.
_LEGACY_TOWER = _tower_wraps_vision_model()
_V4_KEY_MAPPING = {
    r"^language_model\.lm_head": "lm_head",
    r"^language_model\.model\.": "model.language_model.",
    r"^language_model\.": "model.language_model.",
    r"^vision_tower\.vision_model\.": "model.vision_tower.vision_model.",
    r"^vision_tower\.": "model.vision_tower.vision_model.",
    r"^multi_modal_projector": "model.multi_modal_projector",
    r"^image_newline": "model.image_newline",
}


def _auto_map(config_name: str, model_name: str, base_name: str) -> dict:
    head = f"modeling_movekd.{model_name}"
    return {
        "AutoConfig": f"configuration_movekd.{config_name}",
        "AutoModel": f"modeling_movekd.{base_name}",
        "AutoModelForImageTextToText": head,
        "AutoModelForMultimodalLM": head,
        "AutoModelForVision2Seq": head,  # transformers 4.x
    }


def vision_encoder_layers(vision_tower: nn.Module) -> nn.ModuleList:
    """The encoder layers of a CLIP/SigLIP vision model, on transformers 4.x (`.vision_model`) or 5.x."""
    inner = getattr(vision_tower, "vision_model", vision_tower)
    return inner.encoder.layers


def feature_layer_indices(vision_feature_layer, num_layers: int) -> list:
    """Encoder layer indices whose outputs are `hidden_states[vision_feature_layer]` (index 0 = embeddings)."""
    layers = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
    indices = []
    for layer in layers:
        hidden_index = layer if layer >= 0 else num_layers + 1 + layer
        if not 1 <= hidden_index <= num_layers:
            raise ValueError(
                f"`vision_feature_layer` {layer} must select an encoder layer output (1..{num_layers} or "
                f"-{num_layers}..-1), not the embeddings."
            )
        indices.append(hidden_index - 1)
    return indices


# ------------------------------------------------------------------------------------------------- outputs

MOLE_OUTPUT_FIELDS = ("router_logits", "vision_hidden_states")


class MoVEKDOutputMixin:
    r"""What a MoVE-KD forward adds to LLaVA's output, whatever LLaVA's own fields are called in the running
    transformers release.

    router_logits (`tuple[torch.FloatTensor]`): one `[batch_images, tokens, num_experts]` tensor per encoder
        layer (None without images).
    vision_hidden_states (`torch.FloatTensor` of shape `[num_images, patches, vision_hidden]`): the student's
        patch tokens at `vision_feature_layer`, before the projector: what LLaVA hands the projector, less CLS
        when the strategy kept it (`"full"` on a CLIP tower), so `patches` is the grid's h*w under every strategy.
        On AnyRes bases (LLaVA-NeXT, LLaVA-OneVision) a row is a tile: `[total tiles, patches, vision_hidden]`,
        every tile the tower saw, before the tiles are packed (see `MoVEKDOnevisionModel`).
    """


@functools.cache
def mole_output_class(parent: type) -> type:
    """`parent` (the output class LLaVA's forward returned) plus the `MOLE_OUTPUT_FIELDS`, as a dataclass of our
    own: `MoVEKD` + the parent's name. Built from the class the parent forward really returns, so a release that
    renames or adds LLaVA's fields changes nothing here (transformers 5.24 did: `cache`, `image_outputs`)."""
    namespace = {
        "__module__": __name__,
        "__doc__": MoVEKDOutputMixin.__doc__,
        "__annotations__": {name: "tuple | torch.Tensor | None" for name in MOLE_OUTPUT_FIELDS},
        **dict.fromkeys(MOLE_OUTPUT_FIELDS),
    }
    name = "MoVEKD" + parent.__name__.removeprefix("Llava")
    return dataclasses.dataclass(type(name, (parent, MoVEKDOutputMixin), namespace))


def with_mole_outputs(outputs, **extras):
    """A copy of LLaVA's `outputs` as `mole_output_class(type(outputs))`, with `extras` set."""
    return mole_output_class(type(outputs))(**outputs, **extras)


# --------------------------------------------------------------------------------- gradient checkpointing


class MoLELayerCheckpoint:
    """The checkpoint function of one MoLE encoder layer: the layer's router logits leave the checkpointed
    region as outputs of it, so the balance loss reaches the router under reentrant checkpointing too.

    transformers checkpoints each encoder layer by calling `layer._gradient_checkpointing_func(fn, *args)`
    (4.35 to 5.24 alike). With `use_reentrant=True` the first pass runs without autograd and only what the
    checkpointed function returns gets a gradient path, so logits recorded inside it would be dead ends; and
    a layer whose input needs no gradient (the frozen patch embeddings feed layer 0) would give its LoRA none.
    Both are fixed here; non-reentrant checkpointing computes the same thing.
    """

    def __init__(self, checkpoint, mlp: MoLEMLP):
        self.checkpoint = checkpoint
        self.mlp = mlp

    def __call__(self, function, hidden_states, *args, **kwargs):
        mlp = self.mlp

        def run(*inputs):
            output = function(*inputs)
            return output, mlp.router_logits

        if torch.is_grad_enabled() and not hidden_states.requires_grad:
            hidden_states = hidden_states.detach().requires_grad_()
        output, mlp.router_logits = self.checkpoint(run, hidden_states, *args, **kwargs)
        return output


def _route_checkpointing_through_mole(layers: nn.ModuleList, mlps: list) -> None:
    """Wrap the checkpoint function transformers set on each layer (if any) in `MoLELayerCheckpoint`."""
    for layer, mlp in zip(layers, mlps):
        checkpoint = getattr(layer, "_gradient_checkpointing_func", None)
        if checkpoint is None or isinstance(checkpoint, MoLELayerCheckpoint):
            continue
        layer._gradient_checkpointing_func = MoLELayerCheckpoint(checkpoint, mlp)


# ------------------------------------------------------------------------------------------------- models


def _base_forward(llava_forward):
    """The base model's forward: LLaVA's `llava_forward` (whatever its arguments are in this release; `generate`
    reads them from the signature), returning its output plus the `MOLE_OUTPUT_FIELDS`."""

    @functools.wraps(llava_forward)
    def forward(self, *args, **kwargs):
        self._prepare_vision_records()
        return_dict = kwargs.pop("return_dict", None)
        outputs = llava_forward(self, *args, return_dict=True, **kwargs)
        self._last_vision_records = self._take_vision_records()
        result = with_mole_outputs(outputs, **self._last_vision_records)
        return result if return_dict is not False else result.to_tuple()

    return forward


def _head_forward(llava_forward):
    """The generation head's forward: LLaVA's `llava_forward`, plus the base model's `MOLE_OUTPUT_FIELDS`."""

    @functools.wraps(llava_forward)
    def forward(self, *args, **kwargs):
        return_dict = kwargs.pop("return_dict", None)
        outputs = llava_forward(self, *args, return_dict=True, **kwargs)
        result = with_mole_outputs(outputs, **self.model.pop_vision_records())
        return result if return_dict is not False else result.to_tuple()

    return forward


class _MoLEInitMixin:
    """Initialises fresh LoRA/router weights; weights loaded from a checkpoint are left alone."""

    def initialize_weights(self):
        # Before transformers' pass: it flags the modules it visited, which would hide fresh LoRA weights.
        lora_b_init = self.config.lora_b_init
        for module in self.modules():
            if isinstance(module, MoLEMLP):
                for linear in (module.fc1, module.fc2):
                    if not getattr(linear, "_is_hf_initialized", False):
                        init_mole_linear(linear, lora_b_init)
                router = module.router
                if not getattr(router, "_is_hf_initialized", False):
                    if not getattr(router.weight, "_is_hf_initialized", False):
                        router.reset_parameters()
        super().initialize_weights()


class _MoLEModelMixin(_MoLEInitMixin):
    """The base model: swaps the tower's MLPs for MoLE; its forward is LLaVA's, plus `MOLE_OUTPUT_FIELDS`."""

    def _add_mole(self) -> None:
        layers = vision_encoder_layers(self.vision_tower)
        for layer in layers:
            layer.mlp = mole_mlp_from(layer.mlp, self.config)
        feature_layer_indices(self.config.vision_feature_layer, len(layers))  # validate early
        self._projector_inputs = []
        self._last_vision_records = dict.fromkeys(MOLE_OUTPUT_FIELDS)
        # LLaVA hands the selected student tokens to the projector in every release: read them there, outside
        # any checkpointed layer, so they keep their gradient under every checkpointing mode.
        self.multi_modal_projector.register_forward_pre_hook(self._record_projector_input)

    def _record_projector_input(self, module, args):
        self._projector_inputs.append(args[0])

    def mole_mlps(self) -> list:
        return [layer.mlp for layer in vision_encoder_layers(self.vision_tower)]

    def _take_vision_records(self) -> dict:
        """Router logits and projector input of the forward that just ran (None without images).

        Router logits come from the layers that ran: a release that stops the tower after the last layer LLaVA
        reads would leave the later layers out, and their routers then have nothing to balance."""
        mlps = self.mole_mlps()
        router_logits = tuple(mlp.router_logits for mlp in mlps if mlp.router_logits is not None)
        for mlp in mlps:
            mlp.router_logits = None
        inputs, self._projector_inputs = self._projector_inputs, []
        if not router_logits or not inputs:
            return dict.fromkeys(MOLE_OUTPUT_FIELDS)
        tokens = inputs[0] if len(inputs) == 1 else torch.cat(inputs, dim=0)  # [I, P, D * len(feature layers)]
        return {"router_logits": router_logits, "vision_hidden_states": self._patch_tokens(tokens)}

    def _patch_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """[I, P, D] projector input -> [I, h*w, D] patch tokens (`llava_conventions.patch_tokens`). Read from the
        shape, so a strategy passed to `forward` counts too. A tower without CLS under `"default"` (a checkpoint
        from before the strategy followed the tower) has lost a patch: it still runs, its tokens are returned as
        given with a warning, and distilling them fails on the token count."""
        try:
            return patch_tokens(tokens, student_grid(self.config.vision_config))
        except ValueError as error:
            logger.warning_once(f"MoVE-KD: vision_hidden_states are the projector's tokens as given: {error}")
            return tokens

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "forward" not in cls.__dict__:
            cls.forward = _base_forward(super().forward)

    def _prepare_vision_records(self) -> None:
        self._take_vision_records()  # drop anything left by an interrupted forward
        _route_checkpointing_through_mole(vision_encoder_layers(self.vision_tower), self.mole_mlps())

    def pop_vision_records(self) -> dict:
        """The `MOLE_OUTPUT_FIELDS` of the latest forward, once (the generation head passes them on)."""
        records, self._last_vision_records = self._last_vision_records, dict.fromkeys(MOLE_OUTPUT_FIELDS)
        return records


# ---------------------------------------------------------------------------------------------- LLM LoRA

# Where `lora_llm` training writes the peft adapter of the LLM, inside the checkpoint (movekd_hf/training/checkpoint.py
# keeps the same name). A sub-folder, because a top-level adapter_config.json makes transformers load the base model
# named inside it instead of this checkpoint.
LLM_LORA_DIR = "llm_lora"
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision")


def find_llm_lora(pretrained_model_name_or_path, subfolder: str = "", **hub_kwargs):
    """The checkpoint's `llm_lora/` adapter as `(peft_model_id, adapter_kwargs)` for `load_adapter`, or None.

    A local folder is looked at directly; a Hub repo through huggingface_hub's file cache (one small download), so
    a repo without the adapter costs one missing-file answer."""
    import os

    local = os.path.join(str(pretrained_model_name_or_path), subfolder, LLM_LORA_DIR)
    if os.path.isdir(str(pretrained_model_name_or_path)):
        return (local, {}) if os.path.isfile(os.path.join(local, "adapter_config.json")) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    folder = f"{subfolder}/{LLM_LORA_DIR}" if subfolder else LLM_LORA_DIR
    kwargs = {name: hub_kwargs[name] for name in _HUB_KWARGS if hub_kwargs.get(name) is not None}
    try:
        hf_hub_download(str(pretrained_model_name_or_path), "adapter_config.json", subfolder=folder, **kwargs)
    except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError in huggingface_hub 1.x and later)
        logging.getLogger(__name__).warning(
            "%s: offline and `%s/adapter_config.json` is not in the cache, so whether this checkpoint has an LLM "
            "LoRA cannot be checked; loading without one",
            pretrained_model_name_or_path,
            folder,
        )
        return None
    except EntryNotFoundError:
        return None  # the repo has no LLM LoRA
    return str(pretrained_model_name_or_path), {"subfolder": folder, **kwargs}


def attach_llm_lora(model, pretrained_model_name_or_path, subfolder: str = "", **hub_kwargs) -> bool:
    """Attach the checkpoint's `llm_lora/` adapter (the LLM LoRA of a `lora_llm` run) through transformers' peft
    integration (`load_adapter`), so the model computes what was trained. Returns whether there was one.

    Raises ImportError when the checkpoint has the adapter and peft is not installed: loading the base LLM alone
    would silently answer differently from the trained model."""
    import importlib.util

    found = find_llm_lora(pretrained_model_name_or_path, subfolder, **hub_kwargs)
    if found is None:
        return False
    if importlib.util.find_spec("peft") is None:
        raise ImportError(
            f"{pretrained_model_name_or_path} holds an LLM LoRA in `{LLM_LORA_DIR}/` that this model was trained "
            "with, and peft is not installed to attach it. Install peft (`pip install peft`), or fold the LoRA in "
            "with `movekd-hf merge CHECKPOINT OUT` and load OUT; `load_llm_lora=False` loads the base VLM without it."
        )
    peft_model_id, adapter_kwargs = found
    # transformers' load report counts MoLE's own `lora_A`/`lora_B` (already loaded) as missing adapter weights, a
    # false alarm on every load; it is silenced and the adapter's own keys are checked here instead.
    report_logger = logging.getLogger("transformers.integrations.peft")
    level = report_logger.level
    report_logger.setLevel(logging.ERROR)
    try:
        info = model.load_adapter(peft_model_id, adapter_kwargs=adapter_kwargs)
    finally:
        report_logger.setLevel(level)
    adapter_keys = {name for name, _ in model.named_parameters() if ".default." in name}
    missing = sorted(set(getattr(info, "missing_keys", None) or ()) & adapter_keys)
    unexpected = sorted(getattr(info, "unexpected_keys", None) or ())
    if not adapter_keys or missing or unexpected:
        raise ValueError(
            f"{pretrained_model_name_or_path}: `{LLM_LORA_DIR}/` does not fit this model (attached adapter weights: "
            f"{len(adapter_keys)}, missing: {missing[:3]}, unexpected: {unexpected[:3]})."
        )
    return True


class _MoVEKDHeadMixin(_MoLEInitMixin):
    """The generation head: LLaVA's own forward, plus the base model's `MOLE_OUTPUT_FIELDS`."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, load_llm_lora: bool = True, **kwargs):
        """transformers' `from_pretrained`, plus the checkpoint's LLM LoRA (`llm_lora/`, see `attach_llm_lora`)
        attached when present. `load_llm_lora=False` gives the base VLM alone (what `movekd-hf merge` and
        resuming start from)."""
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        if load_llm_lora:
            attach_llm_lora(model, pretrained_model_name_or_path, kwargs.get("subfolder") or "", **kwargs)
        return model

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "forward" not in cls.__dict__:
            cls.forward = _head_forward(super().forward)

    def mole_mlps(self) -> list:
        return self.model.mole_mlps()

    def _build_head(self, config, base_model_class: type) -> None:
        """Our base model and LM head, built in place of LLaVA's (whose `__init__` would build a plain base
        model first), and the `auto_map` every Auto class loads the checkpoint through."""
        self.model = base_model_class(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        own = _auto_map(type(config).__name__, self._head_name, base_model_class.__name__)
        self.config.auto_map = {**own, **(getattr(config, "auto_map", None) or {})}
        self.post_init()


class MoVEKDModel(_MoLEModelMixin, LlavaModel):
    config_class = MoVEKDConfig

    def __init__(self, config: MoVEKDConfig):
        super().__init__(config)
        self._add_mole()
        self.post_init()


class MoVEKDForConditionalGeneration(_MoVEKDHeadMixin, LlavaForConditionalGeneration):
    """LLaVA-1.5 with a MoLE student encoder; at inference it runs like LLaVA (the teachers are not here)."""

    config_class = MoVEKDConfig
    _head_name = "MoVEKDForConditionalGeneration"
    if _LEGACY_TOWER:
        _checkpoint_conversion_mapping = _V4_KEY_MAPPING

    def __init__(self, config: MoVEKDConfig):
        super(LlavaForConditionalGeneration, self).__init__(config)
        self._build_head(config, MoVEKDModel)


class MoVEKDNextModel(_MoLEModelMixin, LlavaNextModel):
    config_class = MoVEKDNextConfig

    def __init__(self, config: MoVEKDNextConfig):
        super().__init__(config)
        self._add_mole()
        self.post_init()


class MoVEKDNextForConditionalGeneration(_MoVEKDHeadMixin, LlavaNextForConditionalGeneration):
    """LLaVA-NeXT (any-resolution tiles) with a MoLE student encoder."""

    config_class = MoVEKDNextConfig
    _head_name = "MoVEKDNextForConditionalGeneration"
    if _LEGACY_TOWER:
        _checkpoint_conversion_mapping = _V4_KEY_MAPPING

    def __init__(self, config: MoVEKDNextConfig):
        super(LlavaNextForConditionalGeneration, self).__init__(config)
        self._build_head(config, MoVEKDNextModel)


class MoVEKDOnevisionModel(_MoLEModelMixin, LlavaOnevisionModel):
    """LLaVA-OneVision's base model with MoLE in its SigLIP tower's MLPs.

    `vision_hidden_states` hold one row per tile the tower saw, `[total tiles, h*w, D]`: LLaVA-OneVision's
    `get_image_features` runs the tower on every AnyRes tile of every image (the base view first, then the grid
    tiles row-major, images in batch order; a padded 5-d `pixel_values` is cut to each image's real tiles first) and
    projects them all in one projector call, before `pack_image_features` unpads, downsamples (`anyres_max_9`) and
    adds the newline tokens. The projector input read here is thus each tile's full patch grid, untouched by the
    packing. Images of multi-image samples (`batch_num_images` > 1) are one tile each. Video frames, when given, go
    through the same projector and follow the image tiles as further rows.
    """

    config_class = MoVEKDOnevisionConfig

    def __init__(self, config: MoVEKDOnevisionConfig):
        super().__init__(config)
        self._add_mole()
        self.post_init()


class MoVEKDOnevisionForConditionalGeneration(_MoVEKDHeadMixin, LlavaOnevisionForConditionalGeneration):
    """LLaVA-OneVision (SigLIP tower on AnyRes tiles, Qwen2 LLM) with a MoLE student encoder."""

    config_class = MoVEKDOnevisionConfig
    _head_name = "MoVEKDOnevisionForConditionalGeneration"
    if _LEGACY_TOWER:
        _checkpoint_conversion_mapping = _V4_KEY_MAPPING

    def __init__(self, config: MoVEKDOnevisionConfig):
        super(LlavaOnevisionForConditionalGeneration, self).__init__(config)
        self._build_head(config, MoVEKDOnevisionModel)


class MoVEKDVisionModel(_MoLEInitMixin, CLIPVisionModel):
    """The distilled student encoder alone: CLIP's vision model with MoLE MLPs, for use as another VLM's
    vision tower. Outputs are CLIP's; `hidden_states[-2]` (CLS dropped) is what MoVE-KD distilled into."""

    config_class = MoVEKDVisionConfig

    def __init__(self, config: MoVEKDVisionConfig):
        super().__init__(config)
        for layer in vision_encoder_layers(self):
            layer.mlp = mole_mlp_from(layer.mlp, config)
        self.config.auto_map = {
            "AutoConfig": "configuration_movekd.MoVEKDVisionConfig",
            "AutoModel": "modeling_movekd.MoVEKDVisionModel",
        }
        self.post_init()

    def mole_mlps(self) -> list:
        return [layer.mlp for layer in vision_encoder_layers(self)]


def _register_v5_key_mappings() -> None:
    """Let transformers 5 read (and write back) the llava-hf key layout for our model types."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # transformers 4.x: `_checkpoint_conversion_mapping` above does the job
        return
    pairs = (
        ("movekd_llava", "llava"),
        ("movekd_llava_next", "llava_next"),
        ("movekd_llava_onevision", "llava_onevision"),
    )
    for ours, theirs in pairs:
        mapping = get_checkpoint_conversion_mapping(theirs)
        if mapping is not None:
            register_checkpoint_conversion_mapping(ours, mapping, overwrite=True)


_register_v5_key_mappings()
