"""MMBench circular accuracy as an `evaluate` metric over `movekd_hf.evaluation.scorers.mmbench_circular_accuracy`."""

import datasets
import evaluate

from movekd_hf.evaluation.scorers import mmbench_circular_accuracy
from movekd_hf.metrics._rows import keyed_predictions, metric_info

_DESCRIPTION = """MMBench with circular evaluation: each question is asked once per rotation of its options, and
counts as right only if every round is answered right. A reply picks an option by its letter ("B", "B. ...",
"The answer is B.") or by repeating an option's text. Percentages. (The paper's MMBench column is the MMBench
server's score; this is the same rule computed locally.)"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str` or `None`): the model's reply per round; `None` counts as missing (wrong).
    references (`list` of `dict`): per round, `group` (the question's MMBench index, shared by its rounds),
        `answer` (the right letter in this round), `options` (the option texts in this round's order, A first) and
        `category` ("" when unknown).
Returns:
    accuracy (circular, percent); accuracy_first_round; `category/<name>`; num_questions; num_missing.
Examples:
    >>> mmb = evaluate.load(movekd_hf.metrics.path("mmbench"))
    >>> mmb.compute(predictions=["A", "B"], references=[
    ...     {"group": 7, "answer": "A", "options": ["cat", "dog"], "category": "animals"},
    ...     {"group": 7, "answer": "B", "options": ["dog", "cat"], "category": "animals"}])["accuracy"]
    100.0
"""

_CITATION = """@inproceedings{liu2024mmbench,
  title={{MMBench}: Is Your Multi-modal Model an All-around Player?},
  author={Liu, Yuan and Duan, Haodong and Zhang, Yuanhan and Li, Bo and Zhang, Songyang and Zhao, Wangbo and
          Yuan, Yike and Wang, Jiaqi and He, Conghui and Liu, Ziwei and Chen, Kai and Lin, Dahua},
  booktitle={ECCV}, year={2024}
}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MMBenchCircular(evaluate.Metric):
    def _info(self):
        return metric_info(
            _DESCRIPTION,
            _CITATION,
            _KWARGS_DESCRIPTION,
            {
                "group": datasets.Value("int64"),
                "answer": datasets.Value("string"),
                "options": datasets.Sequence(datasets.Value("string")),
                "category": datasets.Value("string"),
            },
            ["https://github.com/open-compass/MMBench"],
        )

    def _compute(self, predictions, references):
        rounds = {
            str(i): {
                "group": ref["group"],
                "answer": ref["answer"],
                "options": {chr(ord("A") + k): text for k, text in enumerate(ref["options"])},
                "category": ref["category"],
            }
            for i, ref in enumerate(references)
        }
        return mmbench_circular_accuracy(keyed_predictions(predictions), rounds)
