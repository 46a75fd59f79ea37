"""Build the Fashion-MNIST subset embedded in hf_dino (src/hf_dino/data_files/fashion_mnist/).

    apt-get install dataset-fashion-mnist        # Debian / Ubuntu: the IDX files under /usr/share/datasets
    python scripts/make_embedded_dataset.py      # writes train.parquet, test.parquet, LICENSE, README.md

The subset is class-balanced and deterministic: for each class, the first `per_class` examples (in the
original file order) of a fixed random permutation (seed 0) of the split. Images are stored as PNG bytes with
their `label` as a ClassLabel, in the `datasets` parquet layout (features kept in the schema metadata).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from hf_dino.data import (
    DEBIAN_FASHION_MNIST_DIR,
    EMBEDDED_DATA_DIR,
    FASHION_MNIST_LABELS,
    encode_png,
    fashion_mnist_arrays,
    fashion_mnist_features,
)

COPYRIGHT_FILE = Path("/usr/share/doc/dataset-fashion-mnist/copyright")


def balanced_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of `per_class` examples of every class, chosen by a seeded permutation, sorted.

    Args:
        labels: (N,) class ids.
        per_class: examples kept per class.
        seed: permutation seed.

    Returns:
        (num_classes * per_class,) sorted indices into the split.
    """
    permutation = np.random.default_rng(seed).permutation(len(labels))
    chosen = []
    for label in range(len(FASHION_MNIST_LABELS)):
        of_class = permutation[labels[permutation] == label][:per_class]
        if len(of_class) < per_class:
            raise ValueError(f"class {label} has only {len(of_class)} examples")
        chosen.append(of_class)
    return np.sort(np.concatenate(chosen))


def licence_text(copyright_file: Path) -> str:
    """The upstream (Zalando SE) MIT licence as Debian records it."""
    if not copyright_file.exists():
        raise FileNotFoundError(
            f"{copyright_file} not found: install the Debian package dataset-fashion-mnist"
        )
    text = copyright_file.read_text()
    start = text.index("License: Expat\n Permission")
    body = text[start + len("License: Expat\n") :]
    lines = [line[1:] if line.startswith(" ") else line for line in body.splitlines()]
    lines = ["" if line == "." else line.rstrip() for line in lines]
    return "\n".join(lines).strip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", default=str(DEBIAN_FASHION_MNIST_DIR), help="folder of the IDX files")
    parser.add_argument("--output", default=str(EMBEDDED_DATA_DIR), help="where to write the subset")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import datasets

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        images, labels = fashion_mnist_arrays(split, args.source)
        indices = balanced_subset(labels, per_class, args.seed)
        subset = datasets.Dataset.from_dict(
            {
                "image": [{"bytes": encode_png(images[i]), "path": None} for i in indices],
                "label": [int(labels[i]) for i in indices],
            },
            features=fashion_mnist_features(),
        )
        subset.to_parquet(str(output / f"{split}.parquet"))
        counts[split] = len(indices)

    notice = (
        "Fashion-MNIST subset embedded in hf_dino.\n"
        "Source: https://github.com/zalandoresearch/fashion-mnist,\n"
        "as packaged by Debian (dataset-fashion-mnist).\n"
        "Copyright: 2017, Zalando SE, https://tech.zalando.com\n\n" + licence_text(COPYRIGHT_FILE)
    )
    (output / "LICENSE").write_text(notice)
    (output / "README.md").write_text(
        f"""# Fashion-MNIST subset (embedded default dataset of hf_dino)

{counts["train"]} training and {counts["test"]} test images, class-balanced ({args.train_per_class} and
{args.test_per_class} per class), 28x28 grayscale, stored as PNG in parquet files with the columns `image` and
`label` (ClassLabel: {", ".join(FASHION_MNIST_LABELS)}).

Source: Fashion-MNIST by Zalando Research (https://github.com/zalandoresearch/fashion-mnist), MIT licence (see
LICENSE), read from the IDX files of the Debian package `dataset-fashion-mnist`. Examples were chosen per
class from a seeded permutation (seed {args.seed}) of each original split: the train subset comes from the
original training set, the test subset from the original test set, so they do not overlap.

Rebuild with `python scripts/make_embedded_dataset.py` after `apt-get install dataset-fashion-mnist`.
Load with `hf_dino.data.load_embedded_dataset(split)` or `load_image_dataset("hf_dino:fashion-mnist")`.
"""
    )
    total = sum(path.stat().st_size for path in output.iterdir())
    print(f"wrote {counts} to {output} ({total / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
