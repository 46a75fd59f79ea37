"""Thin launcher for DINO pretraining; all the logic lives in `hf_dino.training`.

    python scripts/train.py --preset demo                                   # one process (CPU or one GPU)
    accelerate launch scripts/train.py --preset vit_small_vanilla --dataset DATASET --output-dir OUT
    accelerate launch --config_file scripts/accelerate_fsdp.yaml scripts/train.py --config my_recipe.yaml

Same options as `hf-dino train` (see `python scripts/train.py --help`).
"""

import sys

from hf_dino.training import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
