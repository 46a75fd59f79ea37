"""The `hf-dino` command line: one subcommand per job, each parsed by the module that does the work.

Every subcommand is `hf_dino.<module>.<function>(argv) -> int`, imported only when it is called so that
`hf-dino --help` stays instant and needs no network.
"""

from __future__ import annotations

import importlib
import sys

# name -> (module, function, one-line description)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("hf_dino.training", "main", "pretrain a DINO model (accelerate; one CPU to many GPUs)"),
    "eval": ("hf_dino.evaluation.cli", "main", "evaluate frozen features: knn, linear, masks"),
    "convert": (
        "hf_dino.convert",
        "convert_main",
        "official DINO / transformers ViT checkpoint -> DinoModel folder",
    ),
    "export": (
        "hf_dino.convert",
        "export_main",
        "DinoModel folder -> stock transformers backbone checkpoint",
    ),
    "push": ("hf_dino.hub", "main", "publish a trained model and its training state to the Hub"),
    "visualize": ("hf_dino.visualize", "main", "write last-layer attention maps of images to PNG files"),
}


def _usage() -> str:
    lines = [
        "usage: hf-dino COMMAND [options]   (hf-dino COMMAND --help for a command's options)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<10} {description}" for name, (_, _, description) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from hf_dino import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"hf-dino: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[name]
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
