"""MME as an `evaluate` metric over `movekd_hf.evaluation.scorers.mme_scores`."""

import datasets
import evaluate

from movekd_hf.evaluation.scorers import mme_scores
from movekd_hf.metrics._rows import keyed_predictions, metric_info

_DESCRIPTION = """MME scores as its official calculation.py computes them: per subtask, acc (% of questions right)
plus acc+ (% of images whose two questions are both right); `perception` (the paper's MME, out of 2000) sums the
ten perception subtasks, `cognition` (out of 800) the four cognition ones. Answers are read as yes/no from their
start, as the official script reads them."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str` or `None`): the model's answer per question; `None` counts as missing (wrong).
    references (`list` of `dict`): per question, `category` (the subtask: "existence", "OCR", ...), `image` (the
        image's name: its two questions share it) and `answer` ("Yes"/"No").
Returns:
    `<subtask>/acc`, `<subtask>/acc_plus`, `<subtask>/score`; perception; cognition; total; num_missing.
Examples:
    >>> mme = evaluate.load(movekd_hf.metrics.path("mme"))
    >>> mme.compute(predictions=["Yes", "No"], references=[
    ...     {"category": "existence", "image": "1.jpg", "answer": "Yes"},
    ...     {"category": "existence", "image": "1.jpg", "answer": "No"}])["perception"]
    200.0
"""

_CITATION = """@article{fu2023mme,
  title={{MME}: A Comprehensive Evaluation Benchmark for Multimodal Large Language Models},
  author={Fu, Chaoyou and Chen, Peixian and Shen, Yunhang and Qin, Yulei and Zhang, Mengdan and Lin, Xu and
          Yang, Jinrui and Zheng, Xiawu and Li, Ke and Sun, Xing and Wu, Yunsheng and Ji, Rongrong},
  journal={arXiv:2306.13394}, year={2023}
}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MME(evaluate.Metric):
    def _info(self):
        return metric_info(
            _DESCRIPTION,
            _CITATION,
            _KWARGS_DESCRIPTION,
            {
                "category": datasets.Value("string"),
                "image": datasets.Value("string"),
                "answer": datasets.Value("string"),
            },
            ["https://github.com/BradyFU/Awesome-Multimodal-Large-Language-Models/tree/Evaluation"],
        )

    def _compute(self, predictions, references):
        questions = {str(i): dict(ref) for i, ref in enumerate(references)}
        return mme_scores(keyed_predictions(predictions), questions)
