"""A local `evaluate` module for the paper's benchmarks, for users who prefer `evaluate`'s interface:

    metric = evaluate.load("path/to/movekd_benchmarks.py", config_name="pope")
    metric.compute(predictions=["Yes", "No"], references=[json.dumps({"label": "yes", "category": "random"}), ...])

`config_name` is the benchmark; each reference is a JSON object with the fields `score_pairs` documents. The
package itself never imports this file (it needs `evaluate`, which movekd_hf does not depend on); the maths is
`movekd_hf.evaluation.benchmarks.score_pairs`, and nothing is fetched from the Hub.
"""

import json

import datasets
import evaluate

from movekd_hf.evaluation.benchmarks import BENCHMARKS, score_pairs

_DESCRIPTION = "VQAv2 / GQA / TextVQA / VizWiz / POPE / ScienceQA-IMG / MME / MMBench scores as in LLaVA-1.5."
_INPUTS = "predictions: list of model answers; references: list of JSON ground-truth objects (see score_pairs)."


class MovekdBenchmarks(evaluate.Metric):
    def _info(self):
        if self.config_name not in BENCHMARKS:
            raise ValueError(f"config_name must be one of {BENCHMARKS}, got {self.config_name!r}")
        features = datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")})
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_INPUTS, features=features
        )

    def _compute(self, predictions, references):
        return score_pairs(self.config_name, predictions, [json.loads(r) for r in references])
