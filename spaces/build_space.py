"""Assemble the files of the Hugging Face Space into one folder, ready to upload.

    python spaces/build_space.py build/space
    hf upload YOUR_NAME/dino-attention build/space . --repo-type space

The Space must run where hf_dino is not installed (it is not on PyPI), so the folder gets a copy of the one
module the app needs, `src/hf_dino/attention.py` (it imports only torch, numpy, Pillow and transformers), and
the example images beside it. hf_dino's own checkpoints load through their bundled remote code.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

SPACE_DIR = Path(__file__).resolve().parent
PACKAGE_DIR = SPACE_DIR.parent / "src" / "hf_dino"
SPACE_FILES = ("app.py", "README.md", "requirements.txt")


def build_space(output_dir: str | Path) -> list[Path]:
    """Copy the Space files, `attention.py` and the examples into `output_dir`.

    Args:
        output_dir: the folder to fill (created; existing files with the same names are replaced).

    Returns:
        the paths written.
    """
    output = Path(output_dir)
    (output / "examples").mkdir(parents=True, exist_ok=True)
    written = []
    for name in SPACE_FILES:
        written.append(Path(shutil.copy2(SPACE_DIR / name, output / name)))
    written.append(Path(shutil.copy2(PACKAGE_DIR / "attention.py", output / "attention.py")))
    for example in sorted((PACKAGE_DIR / "examples").iterdir()):
        if example.is_file():
            written.append(Path(shutil.copy2(example, output / "examples" / example.name)))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path, help="folder to write the Space into")
    args = parser.parse_args(argv)
    for path in build_space(args.output_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
