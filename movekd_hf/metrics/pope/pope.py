"""POPE as an `evaluate` metric over `movekd_hf.evaluation.scorers.pope_scores`."""

import datasets
import evaluate

from movekd_hf.evaluation.scorers import pope_scores
from movekd_hf.metrics._rows import keyed_predictions, metric_info

_DESCRIPTION = """POPE object-hallucination metrics as LLaVA-1.5 scores them (llava/eval/eval_pope.py): an answer is
"no" when its first sentence holds the word No/no/not, else "yes"; accuracy, precision, recall, F1 and the yes
ratio per split (random, popular, adversarial), and their means. The paper's POPE number is `f1`, the mean F1 over
the three splits. Percentages."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str` or `None`): the model's answer per question; `None` counts as missing, scored as
        the answer opposite to the label.
    references (`list` of `dict`): per question, `label` ("yes"/"no") and `split` ("random", "popular",
        "adversarial").
Returns:
    `<split>/<metric>` per split; accuracy, precision, recall, f1, yes_ratio averaged over the splits given; counts.
Examples:
    >>> pope = evaluate.load(movekd_hf.metrics.path("pope"))
    >>> pope.compute(predictions=["Yes.", "No, there is not."],
    ...              references=[{"label": "yes", "split": "random"}, {"label": "no", "split": "random"}])["f1"]
    100.0
"""

_CITATION = """@inproceedings{li2023pope,
  title={Evaluating Object Hallucination in Large Vision-Language Models},
  author={Li, Yifan and Du, Yifan and Zhou, Kun and Wang, Jinpeng and Zhao, Wayne Xin and Wen, Ji-Rong},
  booktitle={EMNLP}, year={2023}
}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class POPE(evaluate.Metric):
    def _info(self):
        return metric_info(
            _DESCRIPTION,
            _CITATION,
            _KWARGS_DESCRIPTION,
            {"label": datasets.Value("string"), "split": datasets.Value("string")},
            ["https://github.com/RUCAIBox/POPE"],
        )

    def _compute(self, predictions, references):
        labels = {str(i): ref["label"].strip().lower() for i, ref in enumerate(references)}
        splits = {str(i): ref["split"] for i, ref in enumerate(references)}
        return pope_scores(keyed_predictions(predictions), labels, splits)
