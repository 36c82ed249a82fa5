"""The results table (laid out like the paper's Table 2: one row per method, one column per benchmark) and a
verdict computed from its numbers, never written by hand."""

from __future__ import annotations

from collections.abc import Mapping

from .evaluate import COLUMNS

HEADERS = {
    "colour": "Colour",
    "shape": "Shape",
    "count": "Count",
    "position": "Position",
    "pope": "POPE (F1)",
    "overall": "Mean",
}
BASELINE = "llava"
QUESTION_COLUMNS = tuple(column for column in COLUMNS if column != "overall")


def markdown_table(rows: Mapping[str, Mapping[str, float]], labels: Mapping[str, str], llm: str) -> str:
    """rows: arm -> {column: value}; labels: arm -> method name. Percentages with one decimal, best in bold."""
    header = "| Method | LLM | " + " | ".join(HEADERS[c] for c in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    best = {column: max(row[column] for row in rows.values()) for column in COLUMNS}
    for arm, row in rows.items():
        cells = [f"**{row[c]:.1f}**" if row[c] == best[c] and len(rows) > 1 else f"{row[c]:.1f}" for c in COLUMNS]
        lines.append(f"| {labels[arm]} | {llm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(row: Mapping[str, float], baseline: Mapping[str, float]) -> dict:
    """Per-question-type wins/ties/losses of `row` over `baseline`, and the difference of their means."""
    wins = [c for c in QUESTION_COLUMNS if row[c] > baseline[c]]
    ties = [c for c in QUESTION_COLUMNS if row[c] == baseline[c]]
    return {
        "wins": wins,
        "ties": ties,
        "losses": [c for c in QUESTION_COLUMNS if c not in wins and c not in ties],
        "overall_delta": row["overall"] - baseline["overall"],
    }


def verdict(rows: Mapping[str, Mapping[str, float]], labels: Mapping[str, str], tried: str) -> list[str]:
    """One line per arm against the LLaVA baseline, then a conclusion naming the best arm; honest either way."""
    if BASELINE not in rows:
        raise ValueError(f"the verdict compares against the {BASELINE!r} arm, which is missing from {list(rows)}")
    baseline = rows[BASELINE]
    lines = []
    for arm, row in rows.items():
        if arm == BASELINE:
            continue
        result = compare(row, baseline)
        lines.append(
            f"{labels[arm]} vs the LLaVA baseline: better on {len(result['wins'])}/{len(QUESTION_COLUMNS)} "
            f"question types ({', '.join(result['wins']) or 'none'}), mean {result['overall_delta']:+.1f} points."
        )
    best = max(rows, key=lambda arm: rows[arm]["overall"])
    movekd_arms = [arm for arm in rows if arm.startswith("movekd")]
    best_movekd = max(movekd_arms, key=lambda arm: rows[arm]["overall"]) if movekd_arms else None
    others = [arm for arm in rows if arm not in movekd_arms]
    if best_movekd is not None and all(rows[best_movekd]["overall"] > rows[arm]["overall"] for arm in others):
        lines.append(f"Verdict: {labels[best_movekd]} has the best mean ({rows[best_movekd]['overall']:.1f}).")
    else:
        lines.append(
            f"Verdict: MoVE-KD does NOT beat the baselines on the mean in this run; the best mean is "
            f"{labels[best]} ({rows[best]['overall']:.1f}). What was tried: {tried}."
        )
    return lines
