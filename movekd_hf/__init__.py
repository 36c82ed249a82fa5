"""movekd_hf: MoVE-KD (CVPR 2025) in Hugging Face form.

`import movekd_hf` is light: it imports neither torch nor transformers. The public classes load on first use
(`movekd_hf.MoVEKDForConditionalGeneration`, or `import movekd_hf.modeling`), and loading them registers the
MoVE-KD classes with transformers' Auto classes, so saved checkpoints then load with or without
`trust_remote_code`. The layers, bottom up: `modeling` (remote code) <- `distill` <- `training` <- `evaluation`,
`hub_cards` <- `demo`, `cli`.
"""

from __future__ import annotations

from ._lazy import lazy_exports

__version__ = "0.2.0"

# Public name -> the module that defines it, imported when the name is first read (PEP 562).
_LAZY = {
    name: "movekd_hf.modeling"
    for name in (
        "MoLELinear",
        "MoLEMLP",
        "MoVEKDConfig",
        "MoVEKDForConditionalGeneration",
        "MoVEKDModel",
        "MoVEKDNextConfig",
        "MoVEKDNextForConditionalGeneration",
        "MoVEKDNextModel",
        "MoVEKDOnevisionConfig",
        "MoVEKDOnevisionForConditionalGeneration",
        "MoVEKDOnevisionModel",
        "MoVEKDOnevisionProcessor",
        "MoVEKDOutputMixin",
        "MoVEKDProcessor",
        "MoVEKDVisionConfig",
        "MoVEKDVisionModel",
    )
}
_LAZY.update(
    {
        "MoVEKDTrainer": "movekd_hf.training",
        "MoVEKDTrainingArguments": "movekd_hf.training",
        "MoVEKDDataArguments": "movekd_hf.training",
        "KDLossConfig": "movekd_hf.distill",
        "TeacherSpec": "movekd_hf.distill",
    }
)

__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
