"""The demo's statistics, tables and verdict, all computed from per-unit results (never written by hand).

Units: a held-out scene for the probes (`probes.per_scene`), a question for the VLM answers. Intervals come from
`movekd_hf.evaluation.compare`: the paired bootstrap over held-out units within one training seed
(`bootstrap_mean_difference`, `paired_bootstrap`) and the Student-t interval of the per-seed differences over
training seeds (`t_interval`). A difference whose interval includes zero is "not resolved".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..evaluation.compare import Interval, UnitScores, bootstrap_mean_difference, paired_bootstrap, t_interval
from .probes import PROBE_ATTRIBUTES

GAP_MIN_POINTS = 20.0  # the gap teacher must beat the initial student by this much on the gap attribute
GAP_ATTRIBUTE, CONTROL_ATTRIBUTE = "stripes", "colour"
QA_HEADERS = {"colour": "Colour", "shape": "Shape", "stripes": "Stripes", "count": "Count", "position": "Position",
              "existence": "Existence", "overall": "All"}  # fmt: skip


def over_seeds(values: Sequence[float]) -> Interval | None:
    """`t_interval` of per-seed values; None with fewer than 2 seeds."""
    return t_interval(values) if len(values) >= 2 else None


def _cell(interval: Interval | None) -> str:
    return "n/a" if interval is None else interval.format()


# ----------------------------------------------------------------------------------------------- gap check


def gap_check(probes: Mapping[str, Mapping[str, np.ndarray]], student: str, teacher: str) -> dict:
    """The gap before training. probes: encoder -> attribute -> per-held-out-scene correctness ([S] in [0, 1]).

    Returns {"accuracy": encoder -> attribute -> %, "gap": Interval of teacher - student on the gap attribute
    (points, paired bootstrap over scenes), "present": the gap is at least GAP_MIN_POINTS and resolved}."""
    accuracy = {
        name: {attr: float(100.0 * values.mean()) for attr, values in by.items()} for name, by in probes.items()
    }
    gap = bootstrap_mean_difference(100.0 * probes[teacher][GAP_ATTRIBUTE], 100.0 * probes[student][GAP_ATTRIBUTE])
    return {"accuracy": accuracy, "gap": gap, "present": gap.resolved and gap.estimate >= GAP_MIN_POINTS}


def gap_lines(check: Mapping, student: str, teacher: str) -> list[str]:
    header = "| encoder | " + " | ".join(f"{a} probe (%)" for a in PROBE_ATTRIBUTES) + " |"
    lines = [header, "|---|" + "---|" * len(PROBE_ATTRIBUTES)]
    for name, by in check["accuracy"].items():
        lines.append(f"| {name} | " + " | ".join(f"{by[a]:.1f}" for a in PROBE_ATTRIBUTES) + " |")
    gap = check["gap"]
    chance = 100.0 / len(PROBE_ATTRIBUTES[GAP_ATTRIBUTE])
    if check["present"]:
        lines.append(f"Gap present: {teacher} - {student} on {GAP_ATTRIBUTE} = {gap.format()} points (chance "
                     f"{chance:.0f}%); the arms below test whether distillation closes it.")  # fmt: skip
    else:
        lines.append(f"NO GAP: {teacher} - {student} on {GAP_ATTRIBUTE} = {gap.format()} points (needs >= "
                     f"{GAP_MIN_POINTS:.0f} and resolved); this run makes no transfer claim.")  # fmt: skip
    return lines


# ------------------------------------------------------------------------------------------------- probes


def probe_statistics(
    per_scene: Mapping[str, Sequence[Mapping[str, np.ndarray]]], baseline: str
) -> dict[str, dict[str, dict]]:
    """per_scene: arm -> one {attribute: per-scene correctness [S]} per training seed (same seeds, same order for
    every arm). Returns arm -> attribute -> {"accuracy": [% per seed], "paired": [Interval per seed, arm minus
    baseline, bootstrap over scenes], "mean": t-Interval of the per-seed differences (None for the baseline or
    one seed)}."""
    out: dict[str, dict[str, dict]] = {}
    for arm, seeds in per_scene.items():
        if len(seeds) != len(per_scene[baseline]):
            raise ValueError(f"arm {arm!r} has {len(seeds)} seeds, the baseline {len(per_scene[baseline])}")
        out[arm] = {}
        for attr in PROBE_ATTRIBUTES:
            accuracy = [float(100.0 * s[attr].mean()) for s in seeds]
            if arm == baseline:
                out[arm][attr] = {"accuracy": accuracy, "paired": [], "mean": None}
                continue
            paired = [bootstrap_mean_difference(100.0 * s[attr], 100.0 * b[attr], seed=i)
                      for i, (s, b) in enumerate(zip(seeds, per_scene[baseline]))]  # fmt: skip
            out[arm][attr] = {"accuracy": accuracy, "paired": paired, "mean": over_seeds([p.estimate for p in paired])}
    return out


def probe_lines(stats: Mapping[str, Mapping[str, dict]], labels: Mapping[str, str]) -> list[str]:
    """One row per arm: per attribute, mean accuracy over seeds, then the difference from the baseline (mean over
    seeds with its t-interval) and how many seeds' bootstrap intervals are resolved above / below zero."""
    header = "| arm | " + " | ".join(f"{a} (%) | {a}: diff vs no KD, mean over seeds [95% t] | seeds +/-"
                                     for a in PROBE_ATTRIBUTES) + " |"  # fmt: skip
    lines = [header, "|---|" + "---|---|---|" * len(PROBE_ATTRIBUTES)]
    for arm, by in stats.items():
        cells = []
        for attr in PROBE_ATTRIBUTES:
            entry = by[attr]
            up = sum(p.resolved and p.estimate > 0 for p in entry["paired"])
            down = sum(p.resolved and p.estimate < 0 for p in entry["paired"])
            seeds = f"{up}/{down} of {len(entry['paired'])}" if entry["paired"] else "baseline"
            cells += [f"{np.mean(entry['accuracy']):.1f}", _cell(entry["mean"]) if entry["paired"] else "-", seeds]
        lines.append(f"| {labels[arm]} | " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------------------------------------ QA


def qa_statistics(scores: Mapping[str, Sequence[UnitScores]], baseline: str) -> dict[str, dict]:
    """scores: arm -> one UnitScores per seed. Returns arm -> {"accuracy": kind -> [% per seed] (kinds + overall),
    "paired": [per seed: kind -> Interval], "mean": kind -> t-Interval over seeds (None for the baseline)}."""
    out: dict[str, dict] = {}
    for arm, seeds in scores.items():
        accuracy: dict[str, list[float]] = {}
        for unit in seeds:
            for kind, values in unit.values.items():
                accuracy.setdefault(kind, []).append(float(100.0 * values.mean()))
            accuracy.setdefault("overall", []).append(float(100.0 * np.concatenate(list(unit.values.values())).mean()))
        if arm == baseline:
            out[arm] = {"accuracy": accuracy, "paired": [], "mean": None}
            continue
        paired = [paired_bootstrap(a, b, seed=i) for i, (a, b) in enumerate(zip(seeds, scores[baseline]))]
        mean = {kind: over_seeds([p[kind].estimate for p in paired]) for kind in paired[0]}
        out[arm] = {"accuracy": accuracy, "paired": paired, "mean": mean}
    return out


def qa_lines(stats: Mapping[str, dict], labels: Mapping[str, str], baseline: str) -> list[str]:
    """Accuracy per question kind (mean over seeds), then each arm's difference from the baseline per kind."""
    kinds = [k for k in QA_HEADERS if k in stats[baseline]["accuracy"]]
    lines = ["| arm | " + " | ".join(QA_HEADERS[k] for k in kinds) + " |", "|---|" + "---|" * len(kinds)]
    for arm, entry in stats.items():
        lines.append(f"| {labels[arm]} | " + " | ".join(f"{np.mean(entry['accuracy'][k]):.1f}" for k in kinds) + " |")
    lines += ["", "Difference from no KD, points, mean over seeds [95% t-interval]:", ""]
    lines += ["| arm | " + " | ".join(QA_HEADERS[k] for k in kinds) + " |", "|---|" + "---|" * len(kinds)]
    for arm, entry in stats.items():
        if arm != baseline:
            lines.append(f"| {labels[arm]} | " + " | ".join(_cell(entry["mean"].get(k)) for k in kinds) + " |")
    return lines


# ------------------------------------------------------------------------------------------ KD loss accounting


def loss_accounting(start: float, initial_student: float, final: float) -> dict[str, float | None]:
    """Split a KD loss decrease (start -> final) into the adapters' part (start -> the initial student under the
    final adapters) and the student's part (that -> final). Shares are None when the loss did not decrease."""
    total = start - final
    student = initial_student - final
    share = student / total if total > 0 else None
    return {"start": start, "initial_student_final_adapters": initial_student, "final": final,
            "decrease": total, "student_part": student, "student_share": share}  # fmt: skip


def loss_lines(accounts: Mapping[str, Mapping[str, Sequence[dict]]], labels: Mapping[str, str]) -> list[str]:
    """accounts: arm -> teacher -> one `loss_accounting` per seed; means over seeds."""
    lines = ["| arm | teacher | KD loss at start | initial student, final adapters | final student, final adapters | "
             "decrease from the student |", "|---|---|---|---|---|---|"]  # fmt: skip
    for arm, teachers in accounts.items():
        for teacher, seeds in teachers.items():
            mean = {k: float(np.mean([s[k] for s in seeds])) for k in ("start", "initial_student_final_adapters",
                                                                       "final", "decrease", "student_part")}  # fmt: skip
            share = f" ({100 * mean['student_part'] / mean['decrease']:.0f}%)" if mean["decrease"] > 0 else ""
            lines.append(f"| {labels[arm]} | {teacher} | {mean['start']:.4f} | "
                         f"{mean['initial_student_final_adapters']:.4f} | {mean['final']:.4f} | "
                         f"{mean['student_part']:+.4f}{share} |")  # fmt: skip
    return lines


# ------------------------------------------------------------------------------------------------ verdict


def verdict(gap: Mapping, probes: Mapping[str, Mapping[str, dict]], qa: Mapping[str, dict],
            labels: Mapping[str, str], baseline: str) -> list[str]:  # fmt: skip
    """Lines computed from the intervals: per KD arm what moved the gap-attribute probe, the control and the gap
    question; then the conclusion. Without a gap, no transfer is claimed whatever the numbers."""
    lines = []
    moved = []
    for arm in probes:
        if arm == baseline:
            continue
        gap_probe, control = probes[arm][GAP_ATTRIBUTE]["mean"], probes[arm][CONTROL_ATTRIBUTE]["mean"]
        question = (qa.get(arm, {}).get("mean") or {}).get(GAP_ATTRIBUTE)
        parts = [f"{GAP_ATTRIBUTE} probe {_describe(gap_probe)}", f"{CONTROL_ATTRIBUTE} probe (control) "
                 f"{_describe(control)}", f"{GAP_ATTRIBUTE} questions {_describe(question)}"]  # fmt: skip
        lines.append(f"{labels[arm]} vs no KD: " + "; ".join(parts) + ".")
        if gap_probe is not None and gap_probe.resolved and gap_probe.estimate > 0:
            moved.append(arm)
    if not gap["present"]:
        lines.append("Verdict: the gap check failed (the student already has the attribute, or the teacher lacks "
                     "it), so these differences say nothing about transfer.")  # fmt: skip
    elif moved:
        names = ", ".join(f"{labels[a]} ({probes[a][GAP_ATTRIBUTE]['mean'].format()} points)" for a in moved)
        lines.append(f"Verdict: distillation moved the {GAP_ATTRIBUTE} attribute into the student's tokens in: {names}"
                     f"; the other arms' intervals include zero.")  # fmt: skip
    else:
        lines.append(f"Verdict: no arm moved the {GAP_ATTRIBUTE} attribute into the student's tokens beyond the noise "
                     f"(every interval over seeds includes zero or is below it): at this budget, MoVE-KD as "
                     f"specified and the anchor options tried do not transfer the teacher's knowledge here.")  # fmt: skip
    return lines


def _describe(interval: Interval | None) -> str:
    if interval is None:
        return "n/a"
    if not interval.resolved:
        return f"{interval.format()}"
    return f"{interval.format()} ({'up' if interval.estimate > 0 else 'DOWN'})"
