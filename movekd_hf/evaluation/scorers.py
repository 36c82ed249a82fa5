"""Scorers for the paper's eight benchmarks, as plain functions written from each benchmark's official definition.

Each takes predictions as `{key: model text}` and ground truth as `{key: ...}` (keys as made by
`movekd_hf.evaluation.benchmarks`) and returns a dict of floats: percentages as the paper reports them (MME as
its score, out of 2000 for perception and 800 for cognition). A key without a prediction counts as wrong, so a
partial answers file cannot inflate a score; `num_missing` says how many there were.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence

from .normalize import normalize_vqa_answer

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def vqa_answer_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Official VQA accuracy of one prediction in [0, 1].

    Both sides are normalised; for each of the n leave-one-out subsets of the human answers the prediction
    scores min(#matches / 3, 1), and the n scores are averaged (n = 10 in VQAv2, TextVQA and VizWiz).
    """
    if len(human_answers) < 2:
        raise ValueError(
            f"VQA accuracy needs at least 2 human answers (the official data has 10), got {human_answers!r}"
        )
    pred = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(answer) == pred for answer in human_answers]
    total = sum(matches)
    # Leaving out answer i removes one match exactly when answer i matched.
    subset_scores = [min((total - int(m)) / 3.0, 1.0) for m in matches]
    return sum(subset_scores) / len(subset_scores)


def _mean_percent(values: Sequence[float]) -> float:
    return 100.0 * sum(values) / len(values) if values else 0.0


def vqa_accuracy(
    predictions: Mapping[str, str],
    answers: Mapping[str, Sequence[str]],
    answer_types: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """VQAv2 / TextVQA / VizWiz accuracy (percent), overall and per answer type when `answer_types` is given."""
    if not answers:
        raise ValueError("vqa_accuracy: no ground-truth answers to score against")
    per_key = {key: vqa_answer_accuracy(predictions.get(key, ""), gts) if key in predictions else 0.0
               for key, gts in answers.items()}  # fmt: skip
    result = {"accuracy": _mean_percent(list(per_key.values()))}
    if answer_types:
        by_type: dict[str, list[float]] = defaultdict(list)
        for key, score in per_key.items():
            by_type[answer_types.get(key, "unknown")].append(score)
        result.update({f"accuracy_{name}": _mean_percent(scores) for name, scores in sorted(by_type.items())})
    result["num_questions"] = float(len(per_key))
    result["num_missing"] = float(sum(key not in predictions for key in answers))
    return result


def gqa_answer(text: str) -> str:
    """LLaVA's GQA answer extraction: drop a trailing period, lower-case."""
    return text.strip().rstrip(".").strip().lower()


def gqa_accuracy(
    predictions: Mapping[str, str], answers: Mapping[str, str], structural_types: Mapping[str, str] | None = None
) -> dict[str, float]:
    """GQA exact-match accuracy (percent); with structural types, also `binary` and `open` (structural "query")."""
    if not answers:
        raise ValueError("gqa_accuracy: no ground-truth answers to score against")
    correct = {key: float(key in predictions and gqa_answer(predictions[key]) == gold.strip().lower())
               for key, gold in answers.items()}  # fmt: skip
    result = {"accuracy": _mean_percent(list(correct.values()))}
    if structural_types:
        open_keys = [k for k in correct if structural_types.get(k) == "query"]
        binary_keys = [k for k in correct if structural_types.get(k) not in (None, "query")]
        result["accuracy_open"] = _mean_percent([correct[k] for k in open_keys])
        result["accuracy_binary"] = _mean_percent([correct[k] for k in binary_keys])
    result["num_questions"] = float(len(correct))
    result["num_missing"] = float(sum(key not in predictions for key in answers))
    return result


def _pope_first_sentence_words(text: str) -> list[str]:
    # LLaVA's llava/eval/eval_pope.py: keep the first sentence, drop commas, split on single spaces.
    return text.split(".")[0].replace(",", "").split(" ")


def pope_yes_no(text: str) -> str:
    """LLaVA's POPE parsing (llava/eval/eval_pope.py): first sentence, commas dropped; "no" if it holds the word
    No/no/not, else "yes" (so an answer that is neither counts as "yes"; `pope_answer_kind` tells them apart)."""
    words = _pope_first_sentence_words(text)
    return "no" if any(word in ("No", "no", "not") for word in words) else "yes"


def pope_answer_kind(text: str) -> str:
    """ "no" or "yes" as `pope_yes_no` reads `text`, or "other" when LLaVA's rule says "yes" only by default: the
    first sentence holds no yes/no word ("I cannot tell", "A dog"). Scored as "yes", as LLaVA does, and counted."""
    if pope_yes_no(text) == "no":
        return "no"
    words = {word.strip("!?;:\"'()").lower() for word in _pope_first_sentence_words(text)}
    return "yes" if "yes" in words else "other"


def _binary_metrics(preds: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    tp = sum(p == 1 and y == 1 for p, y in zip(preds, labels))
    fp = sum(p == 1 and y == 0 for p, y in zip(preds, labels))
    tn = sum(p == 0 and y == 0 for p, y in zip(preds, labels))
    fn = sum(p == 0 and y == 1 for p, y in zip(preds, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": 100.0 * (tp + tn) / len(labels), "precision": 100.0 * precision, "recall": 100.0 * recall,
            "f1": 100.0 * f1, "yes_ratio": 100.0 * sum(preds) / len(preds)}  # fmt: skip


def pope_scores(
    predictions: Mapping[str, str], labels: Mapping[str, str], splits: Mapping[str, str]
) -> dict[str, float]:
    """POPE metrics per split (random / popular / adversarial) and their means; `f1` (the paper's POPE, METHOD.md
    section 7) = F1 averaged over the splits given, all three for the paper's number (`num_splits`).

    Answers are read as LLaVA's eval_pope.py reads them (`pope_yes_no`); `num_other` (and `{split}/num_other`)
    counts the answers that were neither yes nor no, which that rule scores as "yes". A missing prediction
    counts as the answer opposite to the label.
    """
    by_split: dict[str, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    other: dict[str, int] = defaultdict(int)
    for key, label in labels.items():
        if label not in ("yes", "no"):
            raise ValueError(f"POPE label of {key!r} must be 'yes' or 'no', got {label!r}")
        truth = int(label == "yes")
        pred = int(pope_yes_no(predictions[key]) == "yes") if key in predictions else 1 - truth
        other[splits[key]] += key in predictions and pope_answer_kind(predictions[key]) == "other"
        by_split[splits[key]][0].append(pred)
        by_split[splits[key]][1].append(truth)
    if not by_split:
        raise ValueError("pope_scores: no labels to score against")
    result: dict[str, float] = {}
    per_split = {name: _binary_metrics(*by_split[name]) for name in sorted(by_split)}
    for name, metrics in per_split.items():
        result.update({f"{name}/{metric}": value for metric, value in metrics.items()})
        result[f"{name}/num_questions"] = float(len(by_split[name][1]))
        result[f"{name}/num_other"] = float(other[name])
    for metric in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        result[metric] = sum(m[metric] for m in per_split.values()) / len(per_split)
    result["num_splits"] = float(len(per_split))
    result["num_questions"] = float(len(labels))
    result["num_other"] = float(sum(other.values()))
    result["num_missing"] = float(sum(key not in predictions for key in labels))
    return result


_LETTER_ANSWER = re.compile(r"The answer is ([A-Z])\.")


def choice_letter(text: str, letters: Sequence[str], option_texts: Sequence[str] = ()) -> str | None:
    """The option letter a free-text answer picks, or None.

    LLaVA's ScienceQA rules: the bare letter; a letter followed by ". "; "The answer is X.". MMBench's official
    matching also accepts a reply equal to one option's text (case-insensitive), used when `option_texts` is given.
    """
    reply = text.strip()
    if reply in letters:
        return reply
    if len(reply) >= 3 and reply[0] in letters and reply[1:3] == ". ":
        return reply[0]
    found = _LETTER_ANSWER.search(reply)
    if found and found.group(1) in letters:
        return found.group(1)
    lowered = reply.rstrip(".").strip().lower()
    for letter, option in zip(letters, option_texts):
        if lowered == str(option).strip().lower():
            return letter
    if option_texts and len(reply) >= 2 and reply[0] in letters and reply[1] in ".)":
        return reply[0]  # "B." / "B)": MMBench's matcher reads a lone leading letter
    return None


def scienceqa_accuracy(predictions: Mapping[str, str], problems: Mapping[str, Mapping]) -> dict[str, float]:
    """ScienceQA multiple-choice accuracy (percent). `problems[key]` has `choices` (list) and `answer` (index).

    Give only the questions with an image to get ScienceQA-IMG, the paper's number.
    """
    if not problems:
        raise ValueError("scienceqa_accuracy: no problems to score against")
    correct = []
    for key, problem in problems.items():
        letters = [chr(ord("A") + i) for i in range(len(problem["choices"]))]
        picked = choice_letter(predictions.get(key, ""), letters)
        correct.append(float(picked is not None and letters.index(picked) == int(problem["answer"])))
    missing = sum(key not in predictions for key in problems)
    return {"accuracy": _mean_percent(correct), "num_questions": float(len(correct)), "num_missing": float(missing)}


def mme_yes_no(text: str) -> str:
    """MME's official parsing: lower-case, periods dropped; exact yes/no, else yes/no within the first 4 chars."""
    reply = text.lower().strip().replace(".", "")
    if reply in ("yes", "no"):
        return reply
    prefix = reply[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def mme_scores(predictions: Mapping[str, str], questions: Mapping[str, Mapping[str, str]]) -> dict[str, float]:
    """MME scores. `questions[key]` has `category`, `image` and `answer` ("Yes"/"No").

    Per subtask: acc = % of questions right, acc+ = % of images with both questions right, score = acc + acc+.
    `perception` (the paper's MME) and `cognition` sum the subtask scores of their groups, over the subtasks
    `questions` holds (`num_perception_subtasks` of the 10, `num_cognition_subtasks` of the 4, as the official
    eval_tool/calculation.py sums them when every subtask is there); a group with no subtask has no score.
    """
    if not questions:
        raise ValueError("mme_scores: no questions to score against")
    per_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for key, item in questions.items():
        right = key in predictions and mme_yes_no(predictions[key]) == item["answer"].strip().lower()
        per_image[item["category"]][item["image"]].append(right)
    result: dict[str, float] = {}
    for category, images in sorted(per_image.items()):
        flat = [r for answers in images.values() for r in answers]
        acc = 100.0 * sum(flat) / len(flat)
        acc_plus = 100.0 * sum(all(answers) for answers in images.values()) / len(images)
        result.update({f"{category}/acc": acc, f"{category}/acc_plus": acc_plus, f"{category}/score": acc + acc_plus})
    for group, subtasks in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
        present = [c for c in subtasks if c in per_image]
        result[f"num_{group}_subtasks"] = float(len(present))
        if present:
            result[group] = sum(result[f"{c}/score"] for c in present)
    result["total"] = result.get("perception", 0.0) + result.get("cognition", 0.0)
    result["num_missing"] = float(sum(key not in predictions for key in questions))
    return result


def mmbench_circular_accuracy(predictions: Mapping[str, str], rounds: Mapping[str, Mapping]) -> dict[str, float]:
    """MMBench circular evaluation (percent). `rounds[key]` has `group` (the question's index), `answer` (the
    right letter in that round), `options` ({letter: text}) and optionally `category`.

    A question counts as right only if every one of its rounds (its options circularly shifted) is answered right.
    `accuracy_first_round` is the plain single-pass accuracy, for reference.
    """
    if not rounds:
        raise ValueError("mmbench_circular_accuracy: no rounds to score against")
    groups: dict[str, list[bool]] = defaultdict(list)
    first_round: dict[str, bool] = {}
    categories: dict[str, str] = {}
    for key, item in rounds.items():
        letters = sorted(item["options"])
        texts = [item["options"][letter] for letter in letters]
        right = key in predictions and choice_letter(predictions[key], letters, texts) == item["answer"]
        group = str(item["group"])
        groups[group].append(right)
        first_round.setdefault(group, right)
        categories[group] = item.get("category") or "unknown"
    result = {"accuracy": _mean_percent([float(all(v)) for v in groups.values()]),
              "accuracy_first_round": _mean_percent([float(v) for v in first_round.values()])}  # fmt: skip
    by_category: dict[str, list[float]] = defaultdict(list)
    for group, answers in groups.items():
        by_category[categories[group]].append(float(all(answers)))
    result.update({f"category/{name}": _mean_percent(v) for name, v in sorted(by_category.items())})
    result["num_questions"] = float(len(groups))
    result["num_missing"] = float(sum(key not in predictions for key in rounds))
    return result
