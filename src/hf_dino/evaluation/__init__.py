"""Evaluating frozen DINO features with the paper's protocols.

- `knn`: weighted k-nearest neighbours (paper §4.1; `knn_classify`, `knn_sweep`, `knn_predict`),
- `linear`: linear probe on frozen features (paper §4.1, appendix),
- `masks`: Jaccard of the 60%-attention-mass masks against ground-truth masks (paper §4.2.1),
- `features`: frozen features of a `datasets` dataset, cached on disk,
- `records`: the JSON record every evaluation writes; `metrics/`: the shipped `evaluate` metric modules,
- `cli`: `hf-dino eval {knn,linear,masks}`.
"""

from hf_dino.evaluation.features import (
    EvaluationTransform,
    FeatureCache,
    FeatureExtractor,
    TrainingTransform,
    extract_features,
    load_evaluation_model,
)
from hf_dino.evaluation.knn import knn_classify, knn_predict, knn_rankings, knn_sweep, topk_accuracy
from hf_dino.evaluation.records import evaluation_record, read_evaluation_record, write_evaluation_record

__all__ = [
    "EvaluationTransform",
    "FeatureCache",
    "FeatureExtractor",
    "TrainingTransform",
    "extract_features",
    "load_evaluation_model",
    "evaluation_record",
    "knn_classify",
    "knn_predict",
    "knn_rankings",
    "knn_sweep",
    "read_evaluation_record",
    "topk_accuracy",
    "write_evaluation_record",
]
