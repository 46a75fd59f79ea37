"""`hf-dino eval {knn,linear,masks}`: the paper's evaluations of a frozen model on any labelled image dataset.

    hf-dino eval knn --model OUTPUT_DIR/teacher --dataset zalando-datasets/fashion_mnist --label-column label
    hf-dino eval linear --model facebook/dino-vits16 --dataset ./my_images --train-features cached
    hf-dino eval masks --model OUTPUT_DIR --dataset ./pets --mask-column trimap

`--dataset` is a Hub dataset id, a local folder (an image folder with class sub-folders, a folder of
parquet / arrow files, or a `save_to_disk` folder), a parquet / arrow file, or `hf_dino:fashion-mnist` — the
labelled Fashion-MNIST subset embedded in hf_dino, the default. The train split is the k-NN memory bank and the linear
probe's training set; the test split (else validation) holds the queries. Every run writes a JSON record
(see `hf_dino.evaluation.records`) and prints its numbers.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import torch

from hf_dino.evaluation.features import (
    EvaluationTransform,
    FeatureCache,
    FeatureExtractor,
    TrainingTransform,
    dataset_identity,
    default_cache_directory,
    detect_image_column,
    extract_features,
    load_evaluation_model,
    model_num_channels,
    to_model_image,
)
from hf_dino.evaluation.knn import DEFAULT_K_VALUES, DEFAULT_TEMPERATURE, knn_rankings
from hf_dino.evaluation.linear import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_LEARNING_RATES
from hf_dino.evaluation.masks import DEFAULT_MASS
from hf_dino.evaluation.metrics import load_metric
from hf_dino.evaluation.records import evaluation_record, write_evaluation_record

TEST_SPLIT_NAMES = ("test", "validation", "valid", "val", "eval")
LABEL_COLUMN_NAMES = ("label", "labels", "class", "target", "fine_label")
EMBEDDED_DATASET = "hf_dino:fashion-mnist"  # hf_dino.data.EMBEDDED_DATASET, the default --dataset


# -------------------------------------------------------------------------------------------------------
# Arguments
# -------------------------------------------------------------------------------------------------------


def _add_split_arguments(parser: argparse.ArgumentParser, *, train: str, test: str) -> None:
    """The labelled splits of k-NN and the linear probe, and how much of each to use."""
    parser.add_argument("--train-split", default="train", help=train)
    parser.add_argument("--test-split", default=None, help=f"{test} (default: test, else validation)")
    parser.add_argument(
        "--max-train-samples", type=int, default=None, help="use only the first N training images"
    )
    parser.add_argument("--max-test-samples", type=int, default=None, help="use only the first N test images")


def _add_common_arguments(parser: argparse.ArgumentParser, *, labels: bool = True) -> None:
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        help="DinoModel folder, training output folder (its teacher/ is used), transformers ViT folder or Hub "
        "repo id (e.g. facebook/dino-vits16)",
    )
    model.add_argument("--revision", help="Hub branch, tag or commit of --model")
    model.add_argument(
        "--subfolder", default="", help='folder inside --model, e.g. "backbone" for the stock export'
    )
    model.add_argument(
        "--random-init",
        action="store_true",
        help="evaluate the same architecture with fresh random weights (the baseline a trained model must beat)",
    )
    model.add_argument("--seed", type=int, default=0, help="seed of --random-init and of the linear probe")
    model.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow a Hub repo's own model code (needed without hf_dino)",
    )

    data = parser.add_argument_group("dataset")
    data.add_argument(
        "--dataset",
        default=None,
        help="Hub dataset id, local folder, or parquet/arrow file(s); hf_dino:fashion-mnist (the default) is the "
        "Fashion-MNIST subset embedded in hf_dino, hf_dino:fashion-mnist-full the full set from Debian's "
        "dataset-fashion-mnist",
    )
    data.add_argument("--dataset-config", default=None, help="dataset configuration name (Hub datasets)")
    data.add_argument("--dataset-revision", default=None, help="Hub branch, tag or commit of --dataset")
    data.add_argument(
        "--image-column", default=None, help="column holding the images (detected when omitted)"
    )
    if labels:
        data.add_argument(
            "--label-column",
            default=None,
            help="column holding the class labels (default: label / labels / class)",
        )

    transform = parser.add_argument_group("preprocessing")
    transform.add_argument(
        "--crop-size",
        type=int,
        default=None,
        help="centre-crop side in pixels (default: the model's image_size, 224 for the paper's models; e.g. 28 for "
        "Fashion-MNIST-sized models)",
    )
    transform.add_argument(
        "--resize-size",
        type=int,
        default=None,
        help="shorter side after resizing, before the crop (default: crop * 256 / 224, the paper's 256 for 224; "
        "0 keeps the native size, e.g. for 28-px Fashion-MNIST)",
    )
    transform.add_argument(
        "--mean", type=float, nargs="+", default=None, help="normalisation mean per channel"
    )
    transform.add_argument("--std", type=float, nargs="+", default=None, help="normalisation std per channel")

    run = parser.add_argument_group("run")
    run.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    run.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
    run.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, mps ... (default: cuda when available)"
    )
    run.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default="fp32",
        help="fp32 is the protocol; bf16/fp16 autocast is faster on GPUs and changes numbers slightly",
    )
    run.add_argument(
        "--cache-dir",
        default=None,
        help="where frozen features are cached (default: $HF_DINO_CACHE/features or ~/.cache/hf_dino/features)",
    )
    run.add_argument("--no-cache", action="store_true", help="neither read nor write cached features")
    run.add_argument(
        "--output", default=None, help="JSON record to write (default: eval/<protocol>-<dataset>.json)"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-dino eval",
        description="Evaluate frozen features with the paper's protocols: weighted k-NN, linear probe, attention masks.",
    )
    protocols = parser.add_subparsers(dest="protocol", required=True, metavar="{knn,linear,masks}")

    knn = protocols.add_parser(
        "knn",
        help="weighted k-NN on L2-normalised features (paper §4.1)",
        description="Weighted k-NN (paper §4.1): the train split is the memory bank, the test split the queries.",
    )
    _add_common_arguments(knn)
    _add_split_arguments(knn, train="memory-bank split", test="query split")
    knn.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=list(DEFAULT_K_VALUES),
        help="neighbour counts to sweep (paper: 10 20 100 200)",
    )
    knn.add_argument(
        "--temperature",
        type=float,
        default=DEFAULT_TEMPERATURE,
        help="vote weight exp(similarity / T) (paper: 0.07)",
    )
    knn.add_argument(
        "--raw-pixels",
        action="store_true",
        help="use the preprocessed pixels themselves as features (the baseline); --model is then not needed",
    )

    linear = protocols.add_parser(
        "linear",
        help="linear probe on frozen features (paper §4.1)",
        description="Linear probe (paper §4.1): SGD, momentum 0.9, no weight decay, cosine learning rate; the "
        "learning rates are swept side by side.",
    )
    _add_common_arguments(linear)
    _add_split_arguments(linear, train="training split", test="test split")
    linear.add_argument(
        "--n-last-blocks",
        type=int,
        default=None,
        help="concatenate the final-norm CLS tokens of the last N blocks (default: 4 for models narrower than "
        "ViT-B, as the paper's ViT-S; 1 for ViT-B and wider)",
    )
    linear.add_argument(
        "--avgpool-patch-tokens",
        choices=("auto", "yes", "no"),
        default="auto",
        help="add the average-pooled patch tokens (default: yes for ViT-B and wider, as the paper)",
    )
    linear.add_argument(
        "--learning-rates",
        type=float,
        nargs="+",
        default=list(DEFAULT_LEARNING_RATES),
        help="base learning rates for a batch of 256 (scaled by batch/256), all trained side by side",
    )
    linear.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="training epochs (paper: 100)")
    linear.add_argument(
        "--train-batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="linear-probe batch size (official: 128)",
    )
    linear.add_argument(
        "--train-features",
        choices=("augmented", "cached"),
        default="augmented",
        help="augmented: fresh random-resized crops + flips every epoch, the paper's protocol (the backbone runs "
        "every epoch); cached: centre-crop features computed once and cached, 100 epochs in seconds, usually a "
        "little lower accuracy; use it for fast sweeps",
    )
    linear.add_argument(
        "--crop-scale",
        type=float,
        nargs=2,
        default=(0.08, 1.0),
        help="random-resized-crop area range for training",
    )
    linear.add_argument(
        "--save-classifier", default=None, help="write the best linear layer here (safetensors)"
    )

    masks = protocols.add_parser(
        "masks",
        help="Jaccard of 60%%-attention-mass masks against ground-truth masks (paper §4.2.1)",
        description="Jaccard similarity between the masks that keep 60%% of the last layer's CLS attention "
        "(per head and head-averaged) and ground-truth masks.",
    )
    _add_common_arguments(masks, labels=False)
    masks.add_argument("--split", default=None, help="split to evaluate (default: test, else validation)")
    masks.add_argument(
        "--mask-column",
        default=None,
        help="ground-truth mask column; omitted: the mask is the image's pixels above --mask-threshold (the "
        "garment in Fashion-MNIST)",
    )
    masks.add_argument(
        "--mask-threshold", type=float, default=0.0, help="mask values above it are the object"
    )
    masks.add_argument(
        "--ignore-value", type=int, default=None, help="mask value to ignore (255 for PASCAL VOC)"
    )
    masks.add_argument("--mass", type=float, default=DEFAULT_MASS, help="attention mass kept (paper: 0.6)")
    masks.add_argument("--max-samples", type=int, default=None, help="use only the first N images")
    return parser


# -------------------------------------------------------------------------------------------------------
# Datasets
# -------------------------------------------------------------------------------------------------------


def _packaged_dataset(alias: str) -> Any:
    """A dataset that hf_dino provides itself (`hf_dino:fashion-mnist`, `hf_dino:fashion-mnist-full`)."""
    import datasets

    from hf_dino import data

    return datasets.DatasetDict(
        {
            split: data.load_image_dataset(alias, split=split, streaming=False, decode=True)
            for split in ("train", "test")
        }
    )


def load_dataset_dict(spec: str | None, *, config: str | None = None, revision: str | None = None) -> Any:
    """A `datasets.DatasetDict` from a Hub id, a local folder or file(s), or a dataset shipped with hf_dino.

    Args:
        spec: Hub dataset id, local folder (image folder, parquet/arrow folder, `save_to_disk` folder),
            a parquet/arrow file or glob, or `hf_dino:fashion-mnist` (the embedded subset, also used for
            None) / `hf_dino:fashion-mnist-full` (Debian's `dataset-fashion-mnist`).
        config: dataset configuration name.
        revision: Hub revision.
    """
    import datasets

    if spec in (None, "", "embedded") or spec.startswith(
        "hf_dino:"
    ):  # "embedded", as `hf-dino train` names it
        loaded = _packaged_dataset(EMBEDDED_DATASET if spec in (None, "", "embedded") else spec)
    else:
        path = Path(spec)
        suffix = path.suffix.lower()
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            loaded = datasets.load_from_disk(str(path))
        elif suffix in (".parquet", ".arrow") or any(char in spec for char in "*?"):
            loaded = datasets.load_dataset("parquet" if ".parquet" in spec else "arrow", data_files=spec)
        elif path.is_dir():
            loaded = datasets.load_dataset(str(path), config)
        else:
            loaded = datasets.load_dataset(spec, config, revision=revision)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    if not isinstance(loaded, datasets.DatasetDict):
        raise SystemExit(f"{spec} did not load as a dataset with splits (got {type(loaded).__name__})")
    return loaded


def choose_split(dataset_dict: Any, requested: str | None, *, purpose: str) -> str:
    """`requested` when given (it must exist), else the first of test / validation / ... that does."""
    available = list(dataset_dict)
    if requested is not None:
        if requested not in dataset_dict:
            raise SystemExit(f"the dataset has no split {requested!r} for the {purpose}; splits: {available}")
        return requested
    for name in TEST_SPLIT_NAMES:
        if name in dataset_dict:
            return name
    raise SystemExit(
        f"no test or validation split for the {purpose}: name one with --test-split ({available})"
    )


def choose_label_column(dataset: Any, requested: str | None) -> str:
    columns = list(dataset.column_names)
    if requested is not None:
        if requested not in columns:
            raise SystemExit(f"no label column {requested!r}; columns: {columns}")
        return requested
    for name in LABEL_COLUMN_NAMES:
        if name in columns:
            return name
    raise SystemExit(f"no label column found among {columns}: name it with --label-column")


def encode_labels(train: Any, test: Any, column: str) -> tuple[Any, Any, int, list[str] | None]:
    """Both splits with integer labels sharing one class list; string labels become class indices.

    Returns:
        `(train, test, num_classes, class_names or None)`.
    """
    import datasets

    feature = train.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return train, test, feature.num_classes, list(feature.names)
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        names = sorted(set(train[column]) | set(test[column]))
        class_label = datasets.ClassLabel(names=names)
        return (
            train.cast_column(column, class_label),
            test.cast_column(column, class_label),
            len(names),
            names,
        )
    if isinstance(feature, datasets.Value) and ("int" in feature.dtype):
        largest = max(max(train[column]), max(test[column]))
        return train, test, int(largest) + 1, None
    raise SystemExit(f"label column {column!r} holds {feature}; integer or string class labels are needed")


def _first(dataset: Any, count: int | None) -> Any:
    return dataset.select(range(min(count, len(dataset)))) if count is not None else dataset


# -------------------------------------------------------------------------------------------------------
# Shared setup
# -------------------------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def _model_image_size(model: torch.nn.Module | None) -> int:
    config = getattr(model, "config", None)
    backbone = getattr(config, "backbone_config", None) or config
    size = getattr(backbone, "image_size", 224)
    return int(size if isinstance(size, int) else size[0])


def _transform(
    args: argparse.Namespace, model: torch.nn.Module | None, num_channels: int
) -> EvaluationTransform:
    crop = args.crop_size or _model_image_size(model)
    resize = args.resize_size if args.resize_size is not None else round(crop * 256 / 224)
    return EvaluationTransform(
        resize_size=resize or None,
        crop_size=crop,
        num_channels=num_channels,
        mean=tuple(args.mean) if args.mean else None,
        std=tuple(args.std) if args.std else None,
    )


def _load_model(args: argparse.Namespace, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    if not args.model:
        raise SystemExit("--model is required")
    return load_evaluation_model(
        args.model,
        revision=args.revision,
        subfolder=args.subfolder,
        random_init=args.random_init,
        seed=args.seed,
        device=device,
        trust_remote_code=args.trust_remote_code,
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[-60:] or "dataset"


def _output_path(args: argparse.Namespace, protocol: str, model_identity: dict[str, Any], split: str) -> Path:
    if args.output:
        return Path(args.output)
    dataset_name = _slug(Path(args.dataset).name if args.dataset else EMBEDDED_DATASET)
    name = f"{protocol}-{dataset_name}-{split}{'-random-init' if args.random_init else ''}.json"
    model_path = Path(str(model_identity.get("path") or ""))
    # A trained model inside a training output folder: the record goes to OUTPUT_DIR/eval/ (agreed layout).
    for folder in (model_path, model_path.parent):
        if folder.is_dir() and (folder / "training_config.json").exists():
            return folder / "eval" / name
    return Path("eval") / name


def _dataset_record(
    args: argparse.Namespace, split: str, label_column: str | None, **extra: Any
) -> dict[str, Any]:
    return {
        "id": args.dataset or EMBEDDED_DATASET,
        "split": split,
        "revision": args.dataset_revision,
        "label_column": label_column,
        **({"config": args.dataset_config} if args.dataset_config else {}),
        **extra,
    }


def _cache(args: argparse.Namespace) -> FeatureCache | None:
    if args.no_cache:
        return None
    return FeatureCache(args.cache_dir or default_cache_directory())


def _features(
    args: argparse.Namespace,
    extractor: FeatureExtractor,
    dataset: Any,
    *,
    split: str,
    image_column: str,
    label_column: str,
    transform: EvaluationTransform,
    model_identity: dict[str, Any],
    normalize: bool,
    max_samples: int | None,
) -> Any:
    identity = {
        "model": model_identity,
        "dataset": dataset_identity(
            dataset,
            id=args.dataset or EMBEDDED_DATASET,
            config=args.dataset_config,
            revision=args.dataset_revision,
            split=split,
            max_samples=max_samples,
        ),
    }
    extracted = extract_features(
        extractor,
        dataset,
        image_column=image_column,
        label_column=label_column,
        transform=transform,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        normalize=normalize,
        cache=_cache(args),
        cache_identity=identity,
        progress=not args.quiet,
    )
    if extracted.from_cache:
        print(f"{split}: features read from the cache ({len(extracted.labels)} images)", file=sys.stderr)
    return extracted


def _splits(
    args: argparse.Namespace, *, max_train: int | None, max_test: int | None
) -> tuple[Any, Any, str, str, str, int]:
    dataset_dict = load_dataset_dict(args.dataset, config=args.dataset_config, revision=args.dataset_revision)
    if args.train_split not in dataset_dict:
        raise SystemExit(f"the dataset has no split {args.train_split!r}; splits: {list(dataset_dict)}")
    test_split = choose_split(dataset_dict, args.test_split, purpose="queries")
    train, test = (
        _first(dataset_dict[args.train_split], max_train),
        _first(dataset_dict[test_split], max_test),
    )
    label_column = choose_label_column(train, args.label_column)
    train, test, num_classes, _ = encode_labels(train, test, label_column)
    return train, test, test_split, label_column, args.image_column or detect_image_column(train), num_classes


def _ranked_to_metric(ranked: torch.Tensor, labels: torch.Tensor, k_for_top5: int = 5) -> dict[str, float]:
    """top-1 / top-5 through the shipped `evaluate` metric."""
    metric = load_metric("topk_accuracy")
    results = metric.compute(
        predictions=ranked[:, : min(5, k_for_top5)].tolist(), references=labels.tolist(), k_values=[1, 5]
    )
    return {"top1": results["top1"], "top5": results["top5"]}


# -------------------------------------------------------------------------------------------------------
# Protocols
# -------------------------------------------------------------------------------------------------------


def run_knn(args: argparse.Namespace) -> dict[str, Any]:
    device = _device(args.device)
    train, test, test_split, label_column, image_column, num_classes = _splits(
        args, max_train=args.max_train_samples, max_test=args.max_test_samples
    )
    if args.raw_pixels:
        model, model_identity = None, {"path": "raw-pixels", "revision": None}
        num_channels = len(args.mean) if args.mean else 1
        first_image = to_model_image(train[0][image_column], num_channels)
        transform = EvaluationTransform(
            resize_size=args.resize_size or None,
            crop_size=args.crop_size or min(first_image.size),  # default: the native size
            num_channels=num_channels,
            mean=tuple(args.mean) if args.mean else (0.0,) * num_channels,  # the pixels as they are
            std=tuple(args.std) if args.std else (1.0,) * num_channels,
        )
    else:
        model, model_identity = _load_model(args, device)
        transform = _transform(args, model, model_num_channels(model))
    extractor = FeatureExtractor(model, precision=args.precision)
    common = {"image_column": image_column, "label_column": label_column, "transform": transform}
    common |= {"model_identity": model_identity, "normalize": True}
    bank = _features(
        args, extractor, train, split=args.train_split, max_samples=args.max_train_samples, **common
    )
    queries = _features(args, extractor, test, split=test_split, max_samples=args.max_test_samples, **common)

    k_values = sorted({k for k in args.k if k <= len(bank.labels)})
    if not k_values:
        raise SystemExit(f"every --k exceeds the {len(bank.labels)} training images")
    rankings = knn_rankings(
        bank.features.to(device),
        bank.labels,
        queries.features,
        k_values=k_values,
        temperature=args.temperature,
        num_classes=num_classes,
        max_rank=5,
    )
    per_k = {k: _ranked_to_metric(ranked, queries.labels, k) for k, ranked in rankings.items()}
    print(
        f"weighted k-NN, T = {args.temperature}, {len(bank.labels)} train / {len(queries.labels)} {test_split} images"
    )
    print(f"{'k':>5} {'top-1':>8} {'top-5':>8}")
    for k, result in per_k.items():
        print(f"{k:>5} {result['top1']:>8.2f} {result['top5']:>8.2f}")
    reported_k = 20 if 20 in per_k else k_values[0]  # the paper reports k = 20
    results = {**per_k[reported_k], "k": reported_k, "per_k": {str(k): value for k, value in per_k.items()}}
    parameters = {
        "k_values": k_values,
        "temperature": args.temperature,
        "num_classes": num_classes,
        "train_split": args.train_split,
        "num_train": len(bank.labels),
        "num_test": len(queries.labels),
        "transform": transform.fingerprint(),
        "features": extractor.describe() | {"l2_normalized": True},
    }
    record = evaluation_record(
        protocol="knn",
        parameters=parameters,
        dataset=_dataset_record(args, test_split, label_column, train_split=args.train_split),
        model=model_identity,
        results=results,
    )
    path = write_evaluation_record(_output_path(args, "knn", model_identity, test_split), record)
    print(f"record: {path}")
    return record


def _linear_layout(args: argparse.Namespace, model: torch.nn.Module) -> tuple[int, bool]:
    """(n_last_blocks, avgpool): the paper's ViT-S layout below ViT-B's width, ViT-B's from it on."""
    config = model.config
    backbone = getattr(config, "backbone_config", None) or config
    if getattr(backbone, "model_type", "vit") != "vit":
        return 1, False  # a ResNet: its pooled vector
    wide = backbone.hidden_size >= 768
    n_last_blocks = args.n_last_blocks or (1 if wide else min(4, backbone.num_hidden_layers))
    avgpool = {"yes": True, "no": False, "auto": wide}[args.avgpool_patch_tokens]
    return n_last_blocks, avgpool


def run_linear(args: argparse.Namespace) -> dict[str, Any]:
    from safetensors.torch import save_file

    from hf_dino.evaluation.linear import train_linear_probe, train_linear_probe_on_images

    device = _device(args.device)
    train, test, test_split, label_column, image_column, num_classes = _splits(
        args, max_train=args.max_train_samples, max_test=args.max_test_samples
    )
    model, model_identity = _load_model(args, device)
    n_last_blocks, avgpool = _linear_layout(args, model)
    extractor = FeatureExtractor(
        model, n_last_blocks=n_last_blocks, avgpool_patch_tokens=avgpool, precision=args.precision
    )
    transform = _transform(args, model, model_num_channels(model))
    common = {"image_column": image_column, "label_column": label_column, "transform": transform}
    common |= {"model_identity": model_identity, "normalize": False}
    test_features = _features(
        args, extractor, test, split=test_split, max_samples=args.max_test_samples, **common
    )
    probe_options = {
        "num_classes": num_classes,
        "learning_rates": args.learning_rates,
        "epochs": args.epochs,
        "batch_size": args.train_batch_size,
        "seed": args.seed,
        "progress": not args.quiet,
    }
    if args.train_features == "cached":
        train_features = _features(
            args, extractor, train, split=args.train_split, max_samples=args.max_train_samples, **common
        )
        result = train_linear_probe(
            train_features.features,
            train_features.labels,
            test_features.features,
            test_features.labels,
            device=device,
            **probe_options,
        )
        train_transform: dict[str, Any] = transform.fingerprint()
    else:
        training_transform = TrainingTransform(
            crop_size=transform.crop_size,
            scale=tuple(args.crop_scale),
            num_channels=transform.num_channels,
            mean=transform.mean,
            std=transform.std,
        )
        result = train_linear_probe_on_images(
            extractor,
            train,
            test_features.features,
            test_features.labels,
            label_column=label_column,
            image_column=image_column,
            transform=training_transform,
            num_workers=args.num_workers,
            **probe_options,
        )
        train_transform = training_transform.fingerprint()

    with torch.no_grad():
        logits = result.classifier(test_features.features.float())
        ranked = logits.topk(min(5, num_classes), dim=1).indices
    results = {**result.as_results(), **_ranked_to_metric(ranked, test_features.labels)}
    print(
        f"linear probe, {args.epochs} epochs, {len(train)} train / {len(test_features.labels)} {test_split} images"
    )
    print(f"{'base lr':>10} {'top-1':>8} {'top-5':>8}")
    for learning_rate, values in result.per_learning_rate.items():
        marker = "  <- best" if learning_rate == result.best_learning_rate else ""
        print(f"{learning_rate:>10g} {values['top1']:>8.2f} {values['top5']:>8.2f}{marker}")
    if (
        result.best_learning_rate in (min(args.learning_rates), max(args.learning_rates))
        and len(args.learning_rates) > 1
    ):
        print(
            f"note: the best learning rate ({result.best_learning_rate:g}) is at the edge of the sweep; widen "
            "--learning-rates to be sure of the optimum",
            file=sys.stderr,
        )
    if args.save_classifier:
        Path(args.save_classifier).parent.mkdir(parents=True, exist_ok=True)
        save_file(
            {
                "weight": result.classifier.weight.detach().contiguous(),
                "bias": result.classifier.bias.detach(),
            },
            args.save_classifier,
            metadata={"base_learning_rate": str(result.best_learning_rate)},
        )
    parameters = {
        "learning_rates": list(args.learning_rates),
        "epochs": args.epochs,
        "batch_size": args.train_batch_size,
        "optimizer": "SGD",
        "momentum": 0.9,
        "weight_decay": 0.0,
        "lr_schedule": "cosine, per epoch, lr * batch / 256",
        "train_features": args.train_features,
        "train_transform": train_transform,
        "test_transform": transform.fingerprint(),
        "features": extractor.describe(),
        "num_classes": num_classes,
        "train_split": args.train_split,
        "num_train": len(train),
        "num_test": len(test_features.labels),
        "seed": args.seed,
    }
    record = evaluation_record(
        protocol="linear",
        parameters=parameters,
        dataset=_dataset_record(args, test_split, label_column, train_split=args.train_split),
        model=model_identity,
        results=results,
    )
    path = write_evaluation_record(_output_path(args, "linear", model_identity, test_split), record)
    print(f"record: {path}")
    return record


def run_masks(args: argparse.Namespace) -> dict[str, Any]:
    from hf_dino.evaluation.masks import evaluate_attention_masks

    device = _device(args.device)
    dataset_dict = load_dataset_dict(args.dataset, config=args.dataset_config, revision=args.dataset_revision)
    split = choose_split(dataset_dict, args.split, purpose="masks")
    dataset = _first(dataset_dict[split], args.max_samples)
    if args.mask_column and args.mask_column not in dataset.column_names:
        raise SystemExit(f"no mask column {args.mask_column!r}; columns: {dataset.column_names}")
    model, model_identity = _load_model(args, device)
    transform = _transform(args, model, model_num_channels(model))
    results = evaluate_attention_masks(
        model,
        dataset,
        image_column=args.image_column,
        mask_column=args.mask_column,
        threshold=args.mask_threshold,
        ignore_value=args.ignore_value,
        transform=transform,
        mass=args.mass,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        progress=not args.quiet,
    )
    print(f"attention masks ({args.mass:.0%} of the mass), {results['num_images']} {split} images, Jaccard:")
    print(f"  head-averaged map: {results['jaccard']:.4f}")
    print(f"  per head:          {' '.join(f'{value:.4f}' for value in results['jaccard_per_head'])}")
    print(f"  best head:         {results['jaccard_best_head']:.4f} (head {results['best_head']})")
    parameters = {
        "mass": args.mass,
        "mask_column": args.mask_column,
        "ground_truth": f"mask > {args.mask_threshold}"
        if args.mask_column
        else f"image pixels > {args.mask_threshold}",
        "ignore_value": args.ignore_value,
        "transform": transform.fingerprint(),
    }
    record = evaluation_record(
        protocol="attention_masks",
        parameters=parameters,
        dataset=_dataset_record(args, split, None),
        model=model_identity,
        results=results,
    )
    path = write_evaluation_record(_output_path(args, "masks", model_identity, split), record)
    print(f"record: {path}")
    return record


def main(argv: list[str] | None = None) -> int:
    """Entry point of `hf-dino eval`; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.quiet:
        import datasets
        import transformers

        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    runners = {"knn": run_knn, "linear": run_linear, "masks": run_masks}
    try:
        runners[args.protocol](args)
    except (ValueError, FileNotFoundError) as error:
        print(f"hf-dino eval {args.protocol}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
