"""What every metric module shares: its `evaluate.MetricInfo`, and rows -> the keyed mappings the plain scorers
take (`movekd_hf.evaluation.scorers`): row i is key "i"."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import SettingsError


def keyed_predictions(predictions: Sequence[str | None]) -> dict[str, str]:
    """`{"i": text}` for every row with a prediction; a `None` row is left out, so the scorer counts it missing."""
    return {str(i): text for i, text in enumerate(predictions) if text is not None}


def keyed(values: Sequence[Any], count: int, field: str) -> dict[str, Any]:
    """`{"i": value}` for a per-row list given to `compute`. Raises `SettingsError` when it has not one value per
    row."""
    if len(values) != count:
        raise SettingsError(f"has {len(values)} values for {count} predictions", field=field,
                            expected="one value per prediction, in the same order")  # fmt: skip
    return {str(i): value for i, value in enumerate(values)}


def metric_info(description: str, citation: str, inputs: str, references: Any, urls: Sequence[str]):
    """The `evaluate.MetricInfo` of a metric module: a text prediction per row and `references` (a `datasets`
    feature, one per row) in the form the module documents."""
    import datasets
    import evaluate

    features = datasets.Features({"predictions": datasets.Value("string"), "references": references})
    return evaluate.MetricInfo(
        description=description,
        citation=citation,
        inputs_description=inputs,
        features=features,
        reference_urls=list(urls),
    )
