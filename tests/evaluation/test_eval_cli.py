"""`hf-dino eval {knn,linear,masks}` end to end on a toy dataset folder and a tiny model folder."""

from __future__ import annotations

import json

import pytest
import torch

from hf_dino.evaluation import cli, knn_classify
from hf_dino.evaluation.features import EvaluationTransform, extract_features, load_evaluation_model
from hf_dino.evaluation.records import read_evaluation_record


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def common_arguments(model_dir, dataset_dir, tmp_path) -> list[str]:
    return [
        "--model", str(model_dir), "--dataset", str(dataset_dir), "--resize-size", "0", "--crop-size", "28",
        "--cache-dir", str(tmp_path / "cache"), "--quiet",
    ]  # fmt: skip


def test_knn_writes_a_record_that_matches_the_library(
    tiny_dino_dir, toy_dataset_dir, toy_dataset_dict, tmp_path, capsys
) -> None:
    output = tmp_path / "knn.json"
    arguments = ["knn", *common_arguments(tiny_dino_dir, toy_dataset_dir, tmp_path), "--output", str(output)]
    assert cli.main([*arguments, "--k", "5", "10", "20", "100"]) == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and f"record: {output}" in printed

    record = read_evaluation_record(output)
    assert record["protocol"] == "knn"
    assert record["dataset"] == {
        "id": str(toy_dataset_dir), "split": "test", "revision": None, "label_column": "label", "train_split": "train",
    }  # fmt: skip
    assert record["model"]["path"] == str(tiny_dino_dir.resolve()) and record["model"]["revision"] is None
    assert record["parameters"]["k_values"] == [5, 10, 20]  # 100 exceeds the 24 training images
    assert record["results"]["k"] == 20 and set(record["results"]["per_k"]) == {"5", "10", "20"}
    assert {"created", "hf_dino_version"} <= set(record)

    # The same numbers straight from the library.
    model, _ = load_evaluation_model(tiny_dino_dir)
    transform = EvaluationTransform(resize_size=None, crop_size=28, num_channels=1)
    train = extract_features(
        model, toy_dataset_dict["train"], label_column="label", transform=transform, normalize=True
    )
    test = extract_features(
        model, toy_dataset_dict["test"], label_column="label", transform=transform, normalize=True
    )
    for k in (5, 10, 20):
        expected = knn_classify(train.features, train.labels, test.features, test.labels, k=k)
        assert record["results"]["per_k"][str(k)] == pytest.approx(expected)

    # A second run reads the cached features and gives the same record.
    assert cli.main([*arguments, "--k", "5", "10", "20"]) == 0
    assert "read from the cache" in capsys.readouterr().err
    assert read_evaluation_record(output)["results"] == record["results"]


def test_knn_on_raw_pixels_and_random_init(tiny_dino_dir, toy_dataset_dir, tmp_path) -> None:
    pixels = tmp_path / "pixels.json"
    arguments = [
        "knn",
        "--raw-pixels",
        "--dataset",
        str(toy_dataset_dir),
        "--no-cache",
        "--quiet",
        "--k",
        "5",
    ]
    assert cli.main([*arguments, "--output", str(pixels)]) == 0
    record = json.loads(pixels.read_text())
    assert record["model"]["path"] == "raw-pixels"
    assert record["parameters"]["transform"]["crop_size"] == 28  # the native size
    assert 0 <= record["results"]["top1"] <= 100

    random = tmp_path / "random.json"
    arguments = [
        "knn",
        *common_arguments(tiny_dino_dir, toy_dataset_dir, tmp_path),
        "--random-init",
        "--k",
        "5",
    ]
    assert cli.main([*arguments, "--output", str(random)]) == 0
    assert json.loads(random.read_text())["model"]["random_init"] is True


def test_default_output_goes_to_the_training_output_folder(
    tiny_dino_model, toy_dataset_dir, tmp_path
) -> None:
    output_dir = tmp_path / "run"
    tiny_dino_model.save_pretrained(output_dir / "teacher")
    (output_dir / "training_config.json").write_text("{}")
    arguments = ["knn", *common_arguments(output_dir, toy_dataset_dir, tmp_path), "--k", "5"]
    assert cli.main(arguments) == 0
    (record_path,) = (output_dir / "eval").glob("*.json")
    assert record_path.name.startswith("knn-") and read_evaluation_record(record_path)["protocol"] == "knn"


def test_linear_with_cached_features(tiny_dino_dir, toy_dataset_dir, tmp_path, capsys) -> None:
    output, classifier = tmp_path / "linear.json", tmp_path / "classifier.safetensors"
    arguments = [
        "linear",
        *common_arguments(tiny_dino_dir, toy_dataset_dir, tmp_path),
        "--output",
        str(output),
    ]
    arguments += ["--train-features", "cached", "--epochs", "3", "--learning-rates", "0.01", "1.0"]
    assert cli.main([*arguments, "--save-classifier", str(classifier)]) == 0
    assert "<- best" in capsys.readouterr().out
    record = read_evaluation_record(output)
    assert record["protocol"] == "linear"
    # The paper's ViT-S layout for a narrow model: CLS of the last blocks (2 here), no patch average.
    assert record["parameters"]["features"]["n_last_blocks"] == 2
    assert record["parameters"]["features"]["avgpool_patch_tokens"] is False
    results = record["results"]
    best = results["per_learning_rate"][f"{results['best_learning_rate']:g}"]
    assert results["top1"] == pytest.approx(best["top1"]) and results["top5"] == pytest.approx(best["top5"])
    from safetensors.torch import load_file

    assert load_file(str(classifier))["weight"].shape == (3, 64)


def test_linear_with_augmented_training(tiny_dino_dir, toy_dataset_dir, tmp_path) -> None:
    output = tmp_path / "linear.json"
    arguments = [
        "linear",
        *common_arguments(tiny_dino_dir, toy_dataset_dir, tmp_path),
        "--output",
        str(output),
    ]
    arguments += [
        "--epochs",
        "1",
        "--learning-rates",
        "0.1",
        "--n-last-blocks",
        "1",
        "--avgpool-patch-tokens",
        "yes",
    ]
    assert cli.main(arguments) == 0
    record = read_evaluation_record(output)
    assert record["parameters"]["train_features"] == "augmented"
    assert record["parameters"]["train_transform"]["kind"] == "TrainingTransform"
    assert record["parameters"]["features"] == {
        "kind": "dino", "n_last_blocks": 1, "avgpool_patch_tokens": True, "precision": "fp32",
    }  # fmt: skip


def test_masks(tiny_dino_dir, toy_dataset_dir, tmp_path, capsys) -> None:
    output = tmp_path / "masks.json"
    arguments = [
        "masks",
        *common_arguments(tiny_dino_dir, toy_dataset_dir, tmp_path),
        "--output",
        str(output),
    ]
    assert cli.main([*arguments, "--max-samples", "4"]) == 0
    assert "Jaccard" in capsys.readouterr().out
    record = read_evaluation_record(output)
    assert record["protocol"] == "attention_masks" and record["dataset"]["split"] == "test"
    assert record["results"]["num_images"] == 4 and 0.0 <= record["results"]["jaccard"] <= 1.0
    assert record["parameters"]["ground_truth"] == "image pixels > 0.0"


def test_through_the_hf_dino_command(tiny_dino_dir, toy_dataset_dir, tmp_path) -> None:
    from hf_dino.cli import main

    output = tmp_path / "knn.json"
    arguments = ["eval", "knn", *common_arguments(tiny_dino_dir, toy_dataset_dir, tmp_path), "--k", "5"]
    assert main([*arguments, "--output", str(output)]) == 0
    assert output.exists()


def test_clear_errors(tiny_dino_dir, toy_dataset_dir, tmp_path) -> None:
    arguments = ["knn", *common_arguments(tiny_dino_dir, toy_dataset_dir, tmp_path)]
    with pytest.raises(SystemExit, match="no label column 'species'"):
        cli.main([*arguments, "--label-column", "species"])
    with pytest.raises(SystemExit, match="no split 'validation'"):
        cli.main([*arguments, "--test-split", "validation"])
    with pytest.raises(SystemExit, match="every --k exceeds"):
        cli.main([*arguments, "--k", "500"])


def test_parquet_files_and_string_labels(tiny_dino_dir, toy_dataset_dict, tmp_path) -> None:
    folder = tmp_path / "parquet_data"
    for split, dataset in toy_dataset_dict.items():
        names = dataset.features["label"].names
        as_strings = dataset.cast_column("label", dataset.features["label"]).map(
            lambda row, names=names: {"species": names[row["label"]]}, remove_columns=["label"]
        )
        as_strings.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    output = tmp_path / "knn.json"
    arguments = [
        "knn",
        *common_arguments(tiny_dino_dir, folder, tmp_path),
        "--label-column",
        "species",
        "--k",
        "5",
    ]
    assert cli.main([*arguments, "--output", str(output)]) == 0
    record = read_evaluation_record(output)
    assert record["parameters"]["num_classes"] == 3 and record["parameters"]["num_train"] == 24
    assert torch.tensor(record["results"]["top1"]).isfinite()


def test_embedded_fashion_mnist_is_the_default_dataset(tiny_dino_dir, tmp_path) -> None:
    output = tmp_path / "knn.json"
    arguments = ["knn", "--model", str(tiny_dino_dir), "--no-cache", "--quiet", "--k", "10", "20"]
    arguments += ["--max-train-samples", "200", "--max-test-samples", "50", "--output", str(output)]
    assert cli.main(arguments) == 0
    record = read_evaluation_record(output)
    assert record["dataset"]["id"] == "hf_dino:fashion-mnist" and record["dataset"]["split"] == "test"
    assert record["parameters"]["num_classes"] == 10 and record["parameters"]["num_train"] == 200
    # The model's own 28-px size, resized by the paper's 256/224 ratio first.
    assert record["parameters"]["transform"]["crop_size"] == 28
    assert record["parameters"]["transform"]["resize_size"] == 32
