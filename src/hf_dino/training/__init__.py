"""DINO pretraining: the recipe (`DinoTrainingArguments`), the accelerate loop (`DinoTrainer`) and
`hf-dino train` (`main`).

    hf-dino train --preset demo
    accelerate launch -m hf_dino.cli train --preset vit_small_vanilla --dataset DATASET --output-dir OUT
"""

from __future__ import annotations

import logging
import sys

from hf_dino.training.arguments import DinoTrainingArguments, parse_arguments, preset_names
from hf_dino.training.monitoring import NonFiniteLossError
from hf_dino.training.trainer import DinoTrainer, train


def main(argv: list[str] | None = None) -> int:
    """`hf-dino train`: parse the recipe, train, and print where the results went.

    Returns:
        0 on success, 1 when training stopped on a non-finite loss, 2 for invalid options or inputs.
    """
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, stream=sys.stderr
    )
    try:
        arguments = parse_arguments(argv)
    except (ValueError, FileNotFoundError) as error:
        print(f"hf-dino train: {error}", file=sys.stderr)
        return 2
    try:
        summary = train(arguments)
    except NonFiniteLossError as error:
        print(f"hf-dino train: {error}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as error:
        print(f"hf-dino train: {error}", file=sys.stderr)
        return 2
    last = summary.get("last_metrics") or {}
    message = f"trained {summary['step']} steps; final loss {last.get('loss', float('nan')):.4f}"
    if summary.get("knn"):
        message += f"; teacher k-NN top-1 {summary['knn']['top1']:.2f}%"
    print(f"{message}; outputs in {summary['output_dir']}")
    return 0


__all__ = [
    "DinoTrainer",
    "DinoTrainingArguments",
    "NonFiniteLossError",
    "main",
    "parse_arguments",
    "preset_names",
    "train",
]
