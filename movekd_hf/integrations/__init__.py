"""Bridges to the field's evaluation tools. Light at import time: nothing here imports torch, transformers or the
tools themselves until they call in.

- lmms-eval: `lmms_eval.py` holds the model class behind `--model movekd`. lmms-eval finds it through the
  `lmms_eval.models` entry point (pyproject.toml), which names `lmms_eval_models` below; lmms-eval calls it while
  building its model registry, so it must not import the heavy module itself.
- `evaluate`: the metric modules live in `movekd_hf/metrics/` (see that package).
"""

from __future__ import annotations

from typing import Any

LMMS_EVAL_MODEL_ID = "movekd"
LMMS_EVAL_CLASS = "movekd_hf.integrations.lmms_eval.MoVEKDLmmsEval"


def lmms_eval_models() -> list[Any]:
    """The `lmms_eval.models` entry point: one `ModelManifest` for `--model movekd` (alias `movekd_hf`), a simple
    (non-chat) model whose class lmms-eval imports only when a run asks for it. Needs an lmms-eval with the
    manifest registry (`lmms_eval.models.registry_v2`); `make test` runs the release pinned in the Makefile."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=LMMS_EVAL_MODEL_ID, simple_class_path=LMMS_EVAL_CLASS, aliases=("movekd_hf",))]
