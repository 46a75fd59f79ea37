"""Weighted k-NN against an independent numpy brute force and small cases worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hf_dino.evaluation.knn import knn_classify, knn_predict, knn_rankings, knn_sweep, topk_accuracy
from hf_dino.evaluation.metrics import load_metric


def brute_force_knn(train, train_labels, test, k, temperature, num_classes):
    """One query at a time in float64: normalise, rank every training image, vote exp(sim / T)."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    rankings = []
    for query in test:
        similarities = train @ query
        nearest = np.argsort(-similarities, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for index in nearest:
            votes[train_labels[index]] += math.exp(similarities[index] / temperature)
        rankings.append(np.argsort(-votes, kind="stable"))
    return np.stack(rankings)


def accuracy_from_rankings(rankings, labels, k):
    return 100.0 * np.mean([label in ranking[:k] for ranking, label in zip(rankings, labels)])


@pytest.fixture
def clustered_data():
    """7 classes of noisy clusters in 16 dimensions: a realistic mix of right and wrong answers."""
    generator = np.random.default_rng(0)
    centers = generator.normal(size=(7, 16))
    train_labels = generator.integers(0, 7, size=300)
    test_labels = generator.integers(0, 7, size=120)
    train = centers[train_labels] + 1.2 * generator.normal(size=(300, 16))
    test = centers[test_labels] + 1.2 * generator.normal(size=(120, 16))
    return train.astype(np.float32), train_labels, test.astype(np.float32), test_labels


@pytest.mark.parametrize("k", [1, 5, 20, 100])
def test_matches_numpy_brute_force(clustered_data, k: int) -> None:
    train, train_labels, test, test_labels = clustered_data
    expected = brute_force_knn(train.astype(np.float64), train_labels, test.astype(np.float64), k, 0.07, 7)

    ranked = knn_predict(torch.from_numpy(train), torch.from_numpy(train_labels), torch.from_numpy(test), k=k)
    assert ranked.shape == (120, 7)
    np.testing.assert_array_equal(ranked[:, :5].numpy(), expected[:, :5])

    result = knn_classify(
        torch.from_numpy(train),
        torch.from_numpy(train_labels),
        torch.from_numpy(test),
        torch.from_numpy(test_labels),
        k=k,
    )
    assert result["top1"] == pytest.approx(accuracy_from_rankings(expected, test_labels, 1))
    assert result["top5"] == pytest.approx(accuracy_from_rankings(expected, test_labels, min(5, k)))
    assert 0 < result["top1"] < 100  # neither trivial nor hopeless: the comparison means something


def test_official_one_hot_formulation_gives_the_same_answers(clustered_data) -> None:
    # The official code builds (batch * k, classes) one-hot rows and sums them weighted by exp(sim / T).
    train, train_labels, test, test_labels = clustered_data
    train_t = torch.nn.functional.normalize(torch.from_numpy(train), dim=1)
    test_t = torch.nn.functional.normalize(torch.from_numpy(test), dim=1)
    similarity, indices = (test_t @ train_t.T).topk(20, largest=True, sorted=True)
    neighbour_labels = torch.from_numpy(train_labels)[indices]
    one_hot = torch.zeros(len(test) * 20, 7).scatter_(1, neighbour_labels.view(-1, 1), 1)
    probs = (one_hot.view(len(test), 20, 7) * similarity.div(0.07).exp().view(len(test), 20, 1)).sum(1)
    predictions = probs.sort(1, True).indices
    correct = predictions.eq(torch.from_numpy(test_labels).view(-1, 1))
    official = {
        "top1": 100.0 * correct[:, :1].sum().item() / len(test),
        "top5": 100.0 * correct[:, :5].sum().item() / len(test),
    }

    assert knn_classify(train, train_labels, test, test_labels, k=20) == pytest.approx(official)


def test_closer_neighbours_outvote_more_numerous_ones() -> None:
    # One training image at similarity 1.0 (class 0) against two at 0.95 (class 1): with T = 0.07,
    # exp(1/0.07) > 2 exp(0.95/0.07), so class 0 wins; at 0.96 the two together win.
    for other_similarity, winner in ((0.95, 0), (0.96, 1)):
        angle = math.acos(other_similarity)
        train = torch.tensor(
            [[1.0, 0.0], [math.cos(angle), math.sin(angle)], [math.cos(angle), -math.sin(angle)]]
        )
        labels = torch.tensor([0, 1, 1])
        ranked = knn_predict(train, labels, torch.tensor([[2.0, 0.0]]), k=3, temperature=0.07)
        assert ranked[0, 0].item() == winner
    # With a high temperature the weights flatten and the majority wins even at 0.95.
    ranked = knn_predict(train, labels, torch.tensor([[2.0, 0.0]]), k=3, temperature=100.0)
    assert ranked[0, 0].item() == 1


def test_top5_is_capped_by_k_and_by_the_number_of_classes() -> None:
    train = torch.eye(3)
    labels = torch.tensor([0, 1, 2])
    queries = torch.tensor([[1.0, 0.5, 0.2], [0.2, 0.1, 1.0]])
    # k = 1: top-5 looks at a single ranked class, exactly like top-1 (official `min(5, k)`).
    assert knn_classify(train, labels, queries, torch.tensor([1, 1]), k=1) == {"top1": 0.0, "top5": 0.0}
    # k = 3 with 3 classes: top-5 is top-3, every label is found.
    assert knn_classify(train, labels, queries, torch.tensor([1, 1]), k=3)["top5"] == 100.0


def test_chunking_does_not_change_results(clustered_data) -> None:
    train, train_labels, test, _ = clustered_data
    one_at_a_time = knn_predict(train, train_labels, test, k=20, batch_size=1)
    all_at_once = knn_predict(train, train_labels, test, k=20, batch_size=10_000)
    torch.testing.assert_close(one_at_a_time, all_at_once)


def test_sweep_equals_separate_runs_and_skips_k_beyond_the_memory_bank(clustered_data) -> None:
    train, train_labels, test, test_labels = clustered_data
    sweep = knn_sweep(train, train_labels, test, test_labels, k_values=(10, 20, 100, 200, 500))
    assert sorted(sweep) == [10, 20, 100, 200]
    for k, result in sweep.items():
        assert result == knn_classify(train, train_labels, test, test_labels, k=k)


def test_unnormalised_features_are_normalised(clustered_data) -> None:
    train, train_labels, test, test_labels = clustered_data
    scaled = train * np.random.default_rng(1).uniform(0.1, 10, size=(len(train), 1)).astype(np.float32)
    assert knn_classify(scaled, train_labels, test, test_labels) == knn_classify(
        train, train_labels, test, test_labels
    )


def test_bad_inputs_raise() -> None:
    train, labels = torch.randn(10, 4), torch.arange(10) % 3
    with pytest.raises(ValueError, match="exceeds the 10 training images"):
        knn_classify(train, labels, torch.randn(2, 4), torch.tensor([0, 1]), k=20)
    with pytest.raises(ValueError, match="dimension 4 but queries 5"):
        knn_classify(train, labels, torch.randn(2, 5), torch.tensor([0, 1]), k=3)
    with pytest.raises(ValueError, match="train_labels must have shape"):
        knn_predict(train, labels[:5], torch.randn(2, 4), k=3)
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(train, labels, torch.randn(2, 4), k=3, temperature=0)


def test_shipped_metric_agrees_with_topk_accuracy(clustered_data, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train, train_labels, test, test_labels = clustered_data
    ranked = knn_rankings(train, train_labels, test, k_values=[20], max_rank=5)[20]
    metric = load_metric("topk_accuracy")
    result = metric.compute(predictions=ranked.tolist(), references=test_labels.tolist(), k_values=[1, 5])
    labels = torch.from_numpy(test_labels)
    assert result == pytest.approx(
        {"top1": topk_accuracy(ranked, labels, 1), "top5": topk_accuracy(ranked, labels, 5)}
    )
    assert result["top1"] == pytest.approx(knn_classify(train, train_labels, test, test_labels)["top1"])


@pytest.mark.gpu
def test_cuda_gives_the_cpu_predictions(clustered_data) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    train, train_labels, test, test_labels = clustered_data
    on_cpu = knn_rankings(train, train_labels, test, k_values=[10, 20, 100])
    on_gpu = knn_rankings(
        torch.from_numpy(train).cuda(), train_labels, torch.from_numpy(test).cuda(), k_values=[10, 20, 100]
    )
    for k in on_cpu:
        assert on_gpu[k].device.type == "cpu"
        torch.testing.assert_close(on_gpu[k][:, :5], on_cpu[k][:, :5])
