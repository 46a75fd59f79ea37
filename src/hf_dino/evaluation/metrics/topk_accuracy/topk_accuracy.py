"""Top-k accuracy of ranked class predictions, as an `evaluate` metric that ships with hf_dino.

hf_dino loads it by path (`evaluate.load(str(path_to_this_folder))`), so evaluation works offline; the Hub's
own metrics would be downloaded at load time.
"""

from __future__ import annotations

import datasets
import evaluate

_DESCRIPTION = """
Top-k accuracy in percent: a prediction counts as correct at k when the reference class is among its first
k ranked classes. Predictions are lists of class indices, best first (as a k-NN or linear classifier ranks
them); a list shorter than k counts its whole length, so top-5 with 3 classes is top-3.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): ranked class indices per example, best first.
    references (`list` of `int`): the true class per example.
    k_values (`list` of `int`, *optional*, defaults to `[1, 5]`): which top-k accuracies to report.
Returns:
    A dict with `top{k}` for each k, in percent (0 to 100).
Examples:
    >>> metric = evaluate.load("path/to/topk_accuracy")
    >>> metric.compute(predictions=[[2, 0, 1], [1, 2, 0]], references=[2, 0], k_values=[1, 2])
    {'top1': 50.0, 'top2': 50.0}
"""

_CITATION = """
@inproceedings{caron2021emerging,
  title={Emerging Properties in Self-Supervised Vision Transformers},
  author={Caron, Mathilde and Touvron, Hugo and Misra, Ishan and J{\\'e}gou, Herv{\\'e} and Mairal, Julien and
          Bojanowski, Piotr and Joulin, Armand},
  booktitle={Proceedings of the International Conference on Computer Vision (ICCV)},
  year={2021}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopkAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int64")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, k_values=(1, 5)) -> dict[str, float]:
        if len(predictions) == 0:
            raise ValueError("top-k accuracy needs at least one prediction")
        results = {}
        for k in k_values:
            if k < 1:
                raise ValueError(f"k must be at least 1, got {k}")
            correct = sum(
                int(reference in list(ranked)[:k]) for ranked, reference in zip(predictions, references)
            )
            results[f"top{k}"] = 100.0 * correct / len(references)
        return results
