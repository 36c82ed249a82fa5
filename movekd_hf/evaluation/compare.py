"""Is model A better than model B, beyond the noise? Paired differences with confidence intervals.

Two kinds of noise decide whether a difference between two runs means anything:

* **which questions were asked**: a paired bootstrap over the evaluation units (both models answered the same
  questions, so each resample draws the same units for both). `paired_bootstrap` resamples within each question
  type (a stratified bootstrap: the counts per type stay fixed) and recomputes each type's metric and the
  benchmark's headline number from them, so F1 (POPE) and MME's sum of subtask scores are bootstrapped as the
  official scorers compute them, not as a mean of per-question values.
* **which training seed was drawn**: `t_interval` gives the mean over seeds with a Student-t interval.

An interval that contains zero is "not resolved": the data cannot tell the sign of the difference.

Units per benchmark (`unit_scores`), each scored by the package's official scorer applied to that unit alone, so
the mean of the units reproduces the scorer's number exactly:

=========  ===========================  ==================  ===============================================
benchmark  unit                         question type       headline
=========  ===========================  ==================  ===============================================
VQA-like   question (VQA accuracy, 0-1)  answer type         mean over questions (x100)
GQA        question (exact match)       open / binary       mean over questions (x100)
ScienceQA  question (right choice)      all                 mean over questions (x100)
POPE       question (predicted yes,     split               mean over splits of F1 (x100), the paper's POPE
           label yes)
MME        image (acc + acc+ of its     subtask             sum of perception subtasks' scores (paper's MME)
           two questions, 0-200)
MMBench    question (all circular       category            mean over questions (x100)
           rounds right)
=========  ===========================  ==================  ===============================================
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from . import scorers
from .benchmarks import Benchmark

OVERALL = "overall"


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided confidence interval, in the estimate's units (percentage points here).

    `n` is the number of units behind it (questions, images or seeds). `resolved` is False when the interval
    includes zero: the sign of the difference is not established at this confidence."""

    estimate: float
    low: float
    high: float
    n: int
    confidence: float = 0.95

    @property
    def resolved(self) -> bool:
        return self.low > 0 or self.high < 0

    def format(self, digits: int = 1) -> str:
        """`+2.3 [+0.4, +4.1]`, with `(not resolved)` appended when the interval includes zero."""
        text = f"{self.estimate:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"
        return text if self.resolved else f"{text} (not resolved)"

    def to_dict(self) -> dict[str, float | int | bool]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "n": self.n,
                "confidence": self.confidence, "resolved": self.resolved}  # fmt: skip


# --------------------------------------------------------------------------------------------- statistics


def mean_percent(values: np.ndarray) -> np.ndarray:
    """Statistic over the unit axis: `values` (R, n, 1) -> (R,) mean x 100 (accuracies in [0, 1] -> percent)."""
    return 100.0 * values[..., 0].mean(axis=-1)


def mean_value(values: np.ndarray) -> np.ndarray:
    """Statistic over the unit axis: `values` (R, n, 1) -> (R,) plain mean (MME's per-image scores, 0-200)."""
    return values[..., 0].mean(axis=-1)


def f1_percent(values: np.ndarray) -> np.ndarray:
    """Statistic over the unit axis: `values` (R, n, 2) of (predicted yes, label yes) in {0, 1} -> (R,) F1 x 100,
    as `scorers.pope_scores` computes it (0 when there is no positive prediction or label)."""
    predicted, label = values[..., 0], values[..., 1]
    tp = (predicted * label).sum(axis=-1)
    denominator = predicted.sum(axis=-1) + label.sum(axis=-1)  # 2tp + fp + fn
    return np.where(denominator > 0, 200.0 * tp / np.maximum(denominator, 1e-12), 0.0)


@dataclass
class UnitScores:
    """One model's per-unit values on a benchmark: `values[type]` is an (n_type, k) array, rows in `units[type]`
    order; `statistic` turns (R, n, k) resamples into (R,) metric values per type; `headline` combines the per-type
    metric values ({type: (R,)}) and the per-type counts into the benchmark's number."""

    benchmark: str
    units: dict[str, list[str]]
    values: dict[str, np.ndarray]
    statistic: Callable[[np.ndarray], np.ndarray]
    headline: Callable[[Mapping[str, np.ndarray], Mapping[str, int]], np.ndarray]


def weighted_mean(per_type: Mapping[str, np.ndarray], counts: Mapping[str, int]) -> np.ndarray:
    """Headline of accuracy benchmarks: the mean over all units = count-weighted mean of the per-type means."""
    total = sum(counts.values())
    return sum(per_type[name] * (counts[name] / total) for name in per_type)


def mean_over_types(per_type: Mapping[str, np.ndarray], counts: Mapping[str, int]) -> np.ndarray:
    """Headline of POPE: F1 averaged over the splits (the paper's POPE column)."""
    return sum(per_type.values()) / len(per_type)


def mme_perception(per_type: Mapping[str, np.ndarray], counts: Mapping[str, int]) -> np.ndarray:
    """Headline of MME: the sum of the perception subtasks' scores (the paper's MME column)."""
    return sum(value for name, value in per_type.items() if name in scorers.MME_PERCEPTION)


# ------------------------------------------------------------------------------------------- units per benchmark


def _grouped(rows: Sequence[tuple[str, str, Sequence[float]]]) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
    units: dict[str, list[str]] = defaultdict(list)
    values: dict[str, list[Sequence[float]]] = defaultdict(list)
    for unit, kind, value in sorted(rows, key=lambda row: (row[1], row[0])):
        units[kind].append(unit)
        values[kind].append(value)
    return dict(units), {kind: np.asarray(rows, dtype=np.float64) for kind, rows in values.items()}


def unit_scores(benchmark: Benchmark, predictions: Mapping[str, str]) -> UnitScores:
    """Per-unit values of `predictions` ({sample key: text}) on `benchmark` (see the module docstring's table).

    A missing prediction scores as the official scorer scores it (wrong; POPE: the answer opposite to the label).
    Raises ValueError for a benchmark without ground truth."""
    name, truth = benchmark.name, benchmark.truth
    rows: list[tuple[str, str, Sequence[float]]] = []
    statistic, headline = mean_percent, weighted_mean
    if name in ("vqav2", "textvqa", "vizwiz"):
        types = truth.get("answer_types") or {}
        for key, answers in truth["answers"].items():
            score = scorers.vqa_answer_accuracy(predictions[key], answers) if key in predictions else 0.0
            rows.append((key, types.get(key, "all"), (score,)))
    elif name == "gqa":
        structural = truth.get("structural_types") or {}
        for key, gold in truth["answers"].items():
            right = scorers.gqa_accuracy({key: predictions[key]} if key in predictions else {}, {key: gold})
            kind = "all" if not structural else ("open" if structural.get(key) == "query" else "binary")
            rows.append((key, kind, (right["accuracy"] / 100.0,)))
    elif name == "scienceqa":
        for key, problem in truth["problems"].items():
            right = scorers.scienceqa_accuracy({key: predictions[key]} if key in predictions else {}, {key: problem})
            rows.append((key, "all", (right["accuracy"] / 100.0,)))
    elif name == "pope":
        statistic, headline = f1_percent, mean_over_types
        for key, label in truth["labels"].items():
            gold = int(label == "yes")
            said = int(scorers.pope_yes_no(predictions[key]) == "yes") if key in predictions else 1 - gold
            rows.append((key, truth["splits"][key], (said, gold)))
    elif name == "mme":
        statistic, headline = mean_value, mme_perception
        images: dict[tuple[str, str], dict[str, Mapping[str, str]]] = defaultdict(dict)
        for key, item in truth["questions"].items():
            images[(item["category"], str(item["image"]))][key] = item
        for (category, image), questions in images.items():
            answered = {k: predictions[k] for k in questions if k in predictions}
            score = scorers.mme_scores(answered, questions)[f"{category}/score"]
            rows.append((f"{category}/{image}", category, (score,)))
    elif name == "mmbench":
        groups: dict[str, dict[str, Mapping]] = defaultdict(dict)
        for key, item in truth["rounds"].items():
            groups[str(item["group"])][key] = item
        for group, rounds in groups.items():
            answered = {k: predictions[k] for k in rounds if k in predictions}
            right = scorers.mmbench_circular_accuracy(answered, rounds)["accuracy"] / 100.0
            category = next(iter(rounds.values())).get("category") or "all"
            rows.append((group, category, (right,)))
    else:
        raise ValueError(f"no per-unit scores for benchmark {name!r}")
    if not rows:
        raise ValueError(f"{name}: no ground truth to compare against")
    units, values = _grouped(rows)
    return UnitScores(name, units, values, statistic, headline)


# ------------------------------------------------------------------------------------------------ intervals


def paired_bootstrap(
    a: UnitScores, b: UnitScores, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> dict[str, Interval]:
    """A - B per question type and for the benchmark's headline (key `"overall"`), with percentile intervals
    from a stratified paired bootstrap over units (units resampled within each type; the same draw for A and B).

    Units: the metric's (percentage points; MME: score points). Raises ValueError when A and B were not scored
    on the same units."""
    if a.units != b.units:
        raise ValueError(f"{a.benchmark}: the two answer sets cover different questions; compare the same set")
    rng = np.random.default_rng(seed)
    alpha = (1.0 - confidence) / 2.0
    counts = {kind: len(units) for kind, units in a.units.items()}
    observed_a = {kind: a.statistic(values[None]) for kind, values in a.values.items()}
    observed_b = {kind: b.statistic(values[None]) for kind, values in b.values.items()}
    drawn_a, drawn_b = {}, {}
    for kind in sorted(a.units):
        index = rng.integers(0, counts[kind], size=(n_resamples, counts[kind]))
        drawn_a[kind], drawn_b[kind] = a.statistic(a.values[kind][index]), b.statistic(b.values[kind][index])

    def interval(observed: float, draws: np.ndarray, n: int) -> Interval:
        low, high = np.quantile(draws, [alpha, 1.0 - alpha])
        return Interval(float(observed), float(low), float(high), n, confidence)

    result = {kind: interval((observed_a[kind] - observed_b[kind])[0], drawn_a[kind] - drawn_b[kind], counts[kind])
              for kind in sorted(a.units)}  # fmt: skip
    headline = a.headline(observed_a, counts) - b.headline(observed_b, counts)
    draws = a.headline(drawn_a, counts) - b.headline(drawn_b, counts)
    result[OVERALL] = interval(float(np.asarray(headline).reshape(-1)[0]), draws, sum(counts.values()))
    return result


def bootstrap_mean_difference(
    a: Sequence[float], b: Sequence[float], n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """mean(a) - mean(b) for paired per-unit values (a[i], b[i] measured on the same unit, e.g. a probe's
    correctness on one held-out scene), with a percentile paired-bootstrap interval. Units: those of the values."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired values must be two non-empty 1-D sequences of one length, got {a.shape}, {b.shape}")
    index = np.random.default_rng(seed).integers(0, len(a), size=(n_resamples, len(a)))
    draws = (a[index] - b[index]).mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(draws, [alpha, 1.0 - alpha])
    return Interval(float((a - b).mean()), float(low), float(high), len(a), confidence)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean of `values` (e.g. one arm's paired difference per training seed) with a Student-t interval:
    mean +- t_{(1+c)/2, n-1} * s / sqrt(n). Needs at least 2 values (raises ValueError)."""
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) < 2:
        raise ValueError(f"a t-interval needs at least 2 values, got {values.tolist()}")
    mean = float(values.mean())
    half = float(stats.t.ppf((1.0 + confidence) / 2.0, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    return Interval(mean, mean - half, mean + half, len(values), confidence)


def compare_predictions(
    benchmark: Benchmark,
    predictions_a: Mapping[str, str],
    predictions_b: Mapping[str, str],
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """A - B on `benchmark` per question type and overall (the paper's number), see `paired_bootstrap`."""
    return paired_bootstrap(
        unit_scores(benchmark, predictions_a), unit_scores(benchmark, predictions_b), n_resamples, confidence, seed
    )


def format_comparison(name: str, intervals: Mapping[str, Interval], label_a: str = "A", label_b: str = "B") -> str:
    """A small plain-text table: one row per question type, the headline last."""
    header = f"{name}: {label_a} - {label_b}, {int(round(100 * next(iter(intervals.values())).confidence))}% interval"
    width = max(len(kind) for kind in intervals)
    lines = [header]
    for kind, value in intervals.items():
        lines.append(f"  {kind:<{width}}  n={value.n:<6d} {value.format()}")
    return "\n".join(lines)
