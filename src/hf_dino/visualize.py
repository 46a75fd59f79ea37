"""`hf-dino visualize`: the paper's attention pictures for your own images and checkpoints, as PNG files.

    hf-dino visualize --model facebook/dino-vits8 --resolution 480 --output-dir attention/ cat.jpg dog.png

For every image it writes, into the output directory:
    NAME_heads.png   the input and the last block's CLS attention of every head (paper Fig. 1)
    NAME_mean.png    the mean attention over heads, over the image and alone
    NAME_masks.png   the patches holding 60% of each head's attention mass (paper Fig. 3)
    NAME_pca.png     the first three principal components of the patch features as RGB (unless --no-pca)

`--model` takes a hf_dino DinoModel folder or Hub repo (or its `backbone/` export), or any stock
transformers ViT DINO checkpoint such as facebook/dino-vits16.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from hf_dino.attention import (
    DEFAULT_MASS,
    ImageLoadError,
    analyze_image,
    load_attention_model,
    render_figures,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-dino visualize",
        description="Write last-layer CLS attention maps, 60%-mass masks and patch PCA of images as PNGs.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format Pillow reads)")
    parser.add_argument(
        "--model",
        required=True,
        help="hf_dino DinoModel folder or Hub repo, or a transformers ViT checkpoint (facebook/dino-vits8)",
    )
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a Hub model")
    parser.add_argument(
        "--resolution",
        type=int,
        default=480,
        help="short side of the model input in pixels, rounded to the patch size (the paper's figures: 480)",
    )
    parser.add_argument(
        "--mass",
        type=float,
        default=DEFAULT_MASS,
        help="fraction of each head's attention the masks keep (paper: 0.6)",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("attention_maps"), help="where the PNGs go")
    parser.add_argument("--no-pca", action="store_true", help="skip the patch-feature PCA picture")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, ..."
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `hf-dino visualize`.

    Args:
        argv: command-line arguments after `visualize`.

    Returns:
        0 when every image was written, 1 when some could not be read (the others are still written).
    """
    args = build_parser().parse_args(argv)
    if args.resolution < 16:
        print(f"hf-dino visualize: --resolution must be at least 16, got {args.resolution}", file=sys.stderr)
        return 2
    if not 0.0 < args.mass <= 1.0:
        print(f"hf-dino visualize: --mass must be in (0, 1], got {args.mass}", file=sys.stderr)
        return 2
    try:
        model = load_attention_model(args.model, revision=args.revision, device=args.device)
    except (OSError, ValueError) as error:
        print(f"hf-dino visualize: cannot load {args.model}: {error}", file=sys.stderr)
        return 2
    args.output_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    used_stems: set[str] = set()
    for image_path in args.images:
        try:
            analysis = analyze_image(
                model, Path(image_path), resolution=args.resolution, mass=args.mass, with_pca=not args.no_pca
            )
        except ImageLoadError as error:
            print(f"skipped: {error}", file=sys.stderr)
            failures += 1
            continue
        stem = _unique_stem(Path(image_path).stem, used_stems)
        written = []
        for kind, figure in render_figures(analysis).items():
            target = args.output_dir / f"{stem}_{kind}.png"
            figure.save(target)
            written.append(target.name)
        height, width = analysis.grid_hw
        notes = f" ({'; '.join(analysis.notes)})" if analysis.notes else ""
        print(
            f"{image_path}: {width}x{height} patches, {analysis.seconds:.2f} s -> "
            f"{args.output_dir}/{{{','.join(written)}}}{notes}"
        )
    return 1 if failures else 0


def _unique_stem(stem: str, used: set[str]) -> str:
    """`stem`, or `stem-2`, `stem-3`, ... when two inputs share a file name."""
    candidate, number = stem, 1
    while candidate in used:
        number += 1
        candidate = f"{stem}-{number}"
    used.add(candidate)
    return candidate


if __name__ == "__main__":
    sys.exit(main())
