"""MoVE-KD models: LLaVA (and LLaVA-NeXT) whose vision tower MLPs carry a Mixture of LoRA Experts.

The language model, projector and CLIP/SigLIP tower are transformers' own; only each encoder layer's `mlp`
is swapped for `MoLEMLP`, which keeps `fc1`/`fc2` weight names so stock checkpoints load with only the
LoRA/router keys missing. The forward adds what distillation needs: the router logits of every layer and the
student's patch tokens at `vision_feature_layer` (before the projector).

Shipped inside checkpoints as remote code: imports only torch/transformers (single-dot relative imports) and
runs on transformers 4.57 and 5.x.
"""

from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import (
    CLIPVisionModel,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
)
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast, LlavaModelOutputWithPast
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextCausalLMOutputWithPast,
    LlavaNextModelOutputWithPast,
)

from .configuration_movekd import MoVEKDConfig, MoVEKDNextConfig, MoVEKDVisionConfig
from .mole import MoLEMLP, init_mole_linear, mole_mlp_from

_TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5

# transformers 4.x keeps CLIP/SigLIP under `.vision_model` and renames legacy LLaVA keys through this class
# attribute (first matching pattern wins). 5.x uses registered conversion mappings instead (end of file).
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


@dataclass
class MoVEKDModelOutputWithPast(LlavaModelOutputWithPast):
    r"""
    router_logits (`tuple[torch.FloatTensor]`): one `[batch, tokens, num_experts]` tensor per encoder layer.
    vision_hidden_states (`torch.FloatTensor` of shape `[num_images, patches, vision_hidden]`): the student's
        tokens at `vision_feature_layer` (CLS dropped for the `default` strategy), before the projector.
    """

    router_logits: tuple | None = None
    vision_hidden_states: torch.FloatTensor | None = None


@dataclass
class MoVEKDCausalLMOutputWithPast(LlavaCausalLMOutputWithPast):
    r"""LLaVA's output plus `router_logits` and `vision_hidden_states` (see `MoVEKDModelOutputWithPast`)."""

    router_logits: tuple | None = None
    vision_hidden_states: torch.FloatTensor | None = None


@dataclass
class MoVEKDNextModelOutputWithPast(LlavaNextModelOutputWithPast):
    router_logits: tuple | None = None
    vision_hidden_states: torch.FloatTensor | None = None


@dataclass
class MoVEKDNextCausalLMOutputWithPast(LlavaNextCausalLMOutputWithPast):
    router_logits: tuple | None = None
    vision_hidden_states: torch.FloatTensor | None = None


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
    """The base model: swaps the tower's MLPs for MoLE and records what distillation needs."""

    _output_class = None

    def _add_mole(self) -> None:
        layers = vision_encoder_layers(self.vision_tower)
        for layer in layers:
            layer.mlp = mole_mlp_from(layer.mlp, self.config)
        self._vision_records = {}
        self._feature_layers = feature_layer_indices(self.config.vision_feature_layer, len(layers))
        for index in set(self._feature_layers):
            layers[index].register_forward_hook(self._make_feature_hook(index))

    def _make_feature_hook(self, index: int):
        def hook(module, args, output):
            self._vision_records[index] = output[0] if isinstance(output, tuple) else output

        return hook

    def mole_mlps(self) -> list:
        return [layer.mlp for layer in vision_encoder_layers(self.vision_tower)]

    def _pop_vision_records(self) -> tuple:
        """Router logits and feature-layer tokens of the forward that just ran (None without images)."""
        mlps = self.mole_mlps()
        router_logits = tuple(mlp.router_logits for mlp in mlps)
        for mlp in mlps:
            mlp.router_logits = None
        records, self._vision_records = self._vision_records, {}
        if any(logits is None for logits in router_logits) or not records:
            return None, None
        tokens = torch.cat([records[index] for index in self._feature_layers], dim=-1)  # [I, 1+P, D*L]
        if self.config.vision_feature_select_strategy == "default":
            tokens = tokens[:, 1:]
        return router_logits, tokens

    def forward(self, input_ids=None, pixel_values=None, **kwargs):
        self._pop_vision_records()  # drop anything left by an interrupted forward
        kwargs["return_dict"] = True
        outputs = super().forward(input_ids=input_ids, pixel_values=pixel_values, **kwargs)
        router_logits, vision_hidden_states = self._pop_vision_records()
        return self._output_class(
            **dict(outputs.items()), router_logits=router_logits, vision_hidden_states=vision_hidden_states
        )


class _MoVEKDHeadMixin(_MoLEInitMixin):
    """The generation head: LLaVA's forward, keeping the base model's MoLE outputs."""

    _output_class = None

    def forward(
        self,
        input_ids=None,
        pixel_values=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        logits_to_keep=0,
        image_sizes=None,
        **kwargs,
    ):
        return_dict = kwargs.pop("return_dict", None)
        if image_sizes is not None:  # LLaVA-NeXT tiles; spelled out so `generate` sees it is consumed
            kwargs["image_sizes"] = image_sizes
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(outputs.last_hidden_state[:, keep, :])
        loss = None
        if labels is not None:
            vocab_size = self.config.text_config.vocab_size
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **kwargs)
        result = self._output_class(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            router_logits=outputs.router_logits,
            vision_hidden_states=outputs.vision_hidden_states,
        )
        return result if return_dict is not False else result.to_tuple()

    def mole_mlps(self) -> list:
        return self.model.mole_mlps()


class MoVEKDModel(_MoLEModelMixin, LlavaModel):
    config_class = MoVEKDConfig
    _output_class = MoVEKDModelOutputWithPast

    def __init__(self, config: MoVEKDConfig):
        super().__init__(config)
        self._add_mole()
        self.post_init()


class MoVEKDForConditionalGeneration(_MoVEKDHeadMixin, LlavaForConditionalGeneration):
    """LLaVA-1.5 with a MoLE student encoder; at inference it runs like LLaVA (the teachers are not here)."""

    config_class = MoVEKDConfig
    _output_class = MoVEKDCausalLMOutputWithPast
    if _TRANSFORMERS_4:
        _checkpoint_conversion_mapping = _V4_KEY_MAPPING

    def __init__(self, config: MoVEKDConfig):
        # LLaVA's own __init__ would build a plain LlavaModel first; build ours directly instead.
        super(LlavaForConditionalGeneration, self).__init__(config)
        self.model = MoVEKDModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.config.auto_map = {
            **_auto_map("MoVEKDConfig", "MoVEKDForConditionalGeneration", "MoVEKDModel"),
            **(getattr(config, "auto_map", None) or {}),
        }
        self.post_init()


class MoVEKDNextModel(_MoLEModelMixin, LlavaNextModel):
    config_class = MoVEKDNextConfig
    _output_class = MoVEKDNextModelOutputWithPast

    def __init__(self, config: MoVEKDNextConfig):
        super().__init__(config)
        self._add_mole()
        self.post_init()


class MoVEKDNextForConditionalGeneration(_MoVEKDHeadMixin, LlavaNextForConditionalGeneration):
    """LLaVA-NeXT (any-resolution tiles) with a MoLE student encoder."""

    config_class = MoVEKDNextConfig
    _output_class = MoVEKDNextCausalLMOutputWithPast
    if _TRANSFORMERS_4:
        _checkpoint_conversion_mapping = _V4_KEY_MAPPING

    def __init__(self, config: MoVEKDNextConfig):
        super(LlavaNextForConditionalGeneration, self).__init__(config)
        self.model = MoVEKDNextModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.config.auto_map = {
            **_auto_map("MoVEKDNextConfig", "MoVEKDNextForConditionalGeneration", "MoVEKDNextModel"),
            **(getattr(config, "auto_map", None) or {}),
        }
        self.post_init()


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
    for ours, theirs in (("movekd_llava", "llava"), ("movekd_llava_next", "llava_next")):
        mapping = get_checkpoint_conversion_mapping(theirs)
        if mapping is not None:
            register_checkpoint_conversion_mapping(ours, mapping, overwrite=True)


_register_v5_key_mappings()
