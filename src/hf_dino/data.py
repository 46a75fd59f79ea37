"""Image datasets for DINO: loading from anywhere, robust decoding, multi-crop streaming and collation.

`load_image_dataset` accepts what users keep asking the official code for (dino#1, #68, #184): a Hub dataset
id (streamed), a folder of images with any nesting and no class folders, parquet / arrow / webdataset files,
local or remote, or nothing at all (the embedded Fashion-MNIST subset). Images are kept undecoded
(`datasets.Image(decode=False)`) and decoded here with PIL, so that corrupt, truncated or non-image entries
are skipped and counted instead of raising inside `datasets`.

`MultiCropDataset` turns such a dataset into a torch `IterableDataset` of multi-crop views:

- every example is seen exactly once per pass, split across processes (`rank`, `world_size`) and DataLoader
  workers (each worker takes blocks of `batch_size` consecutive positions in turn, which is the order in which
  the DataLoader collects batches from its workers);
- `set_epoch(epoch)` reshuffles; the position within an epoch is resumable: `state_dict()` /
  `load_state_dict()` carry the number of examples this process has consumed, and a resumed iteration skips
  exactly those. Augmentation randomness is a function of (seed, epoch, rank, position), so a resumed run sees
  the same views as an uninterrupted one, whatever the number of workers;
- a skipped entry yields `None` in its place, so batches stay aligned with stream positions;
  `collate_multicrop` drops them.

Typical use::

    dataset = load_image_dataset("path/to/images")
    augmentation = MultiCropAugmentation()
    views = MultiCropDataset(dataset, augmentation, batch_size=64, rank=rank, world_size=world_size)
    loader = DataLoader(views, batch_size=64, num_workers=8, collate_fn=collate_multicrop)
    for epoch in range(epochs):
        views.set_epoch(epoch)
        for crops in loader:  # list of 2 + N tensors (B, C, H, W)
            ...
"""

from __future__ import annotations

import argparse
import glob
import gzip
import io
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image as PILImage
from PIL import UnidentifiedImageError

from hf_dino.augmentation import MultiCropAugmentation, MultiCropConfig, image_to_tensor, looks_channel_first

logger = logging.getLogger(__name__)

EMBEDDED_DATASET = "hf_dino:fashion-mnist"
"""Alias of the Fashion-MNIST subset shipped inside the package (5000 train / 1000 test images, labelled)."""
FULL_FASHION_MNIST = "hf_dino:fashion-mnist-full"
"""Alias of the full Fashion-MNIST (60000 / 10000) read from the Debian package `dataset-fashion-mnist`."""
FASHION_MNIST_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
EMBEDDED_DATA_DIR = Path(__file__).parent / "data_files" / "fashion_mnist"

SKIP_REASONS = ("missing", "not_an_image", "truncated", "corrupt", "too_large", "unsupported")
"""Why an entry was skipped: no image value; not an image format; cut short; undecodable; over PIL's
decompression-bomb limit; an image that cannot be turned into the requested channels."""

ImageMode = Literal["RGB", "L", "native"]
# File suffixes treated as images when walking a folder (PIL's formats plus numpy arrays for N-channel data).
IMAGE_SUFFIXES = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".bmp",
        ".gif",
        ".webp",
        ".tif",
        ".tiff",
        ".ppm",
        ".pgm",
        ".pbm",
    }
    | {".pnm", ".tga", ".ico", ".dib", ".jp2", ".j2k", ".pcx", ".sgi", ".ras", ".im", ".dds", ".avif", ".npy"}
)
DATA_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".tar": "webdataset"}
PACKAGED_BUILDERS = ("parquet", "arrow", "webdataset", "imagefolder", "csv", "json")
SPLIT_FOLDER_ALIASES = {
    "train": ("train", "training"),
    "validation": ("validation", "val", "valid"),
    "test": ("test", "testing"),
}
# Column names that usually hold the image, in order of preference.
IMAGE_COLUMN_NAMES = (
    "image",
    "img",
    "images",
    "jpg",
    "jpeg",
    "png",
    "webp",
    "tif",
    "tiff",
    "bmp",
    "pixel_values",
)


# ------------------------------------------------------------------------------------------------------------
# Fashion-MNIST: the embedded subset and the full set from the Debian package
# ------------------------------------------------------------------------------------------------------------


def read_idx_file(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format; gzip-compressed when the name ends in .gz).

    Args:
        path: the file.

    Returns:
        uint8 array of the shape stored in the header ((N, 28, 28) images or (N,) labels).
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    dimensions = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dimensions))
    payload = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dimensions)
    if payload.size != math.prod(shape):
        raise ValueError(f"{path}: header says {shape} but holds {payload.size} bytes")
    return payload.reshape(shape)


def fashion_mnist_arrays(
    split: str = "train", directory: str | os.PathLike = DEBIAN_FASHION_MNIST_DIR
) -> tuple[np.ndarray, np.ndarray]:
    """The Fashion-MNIST images and labels of one split, as installed by Debian's `dataset-fashion-mnist`.

    Args:
        split: "train" (60000 images) or "test" (10000).
        directory: where the IDX files are.

    Returns:
        (images uint8 (N, 28, 28), labels uint8 (N,)).
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}")
    directory = Path(directory)
    images_path = directory / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = directory / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.exists() or not labels_path.exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {directory}. Install it with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
            "or pass the folder of the *-idx*-ubyte.gz files."
        )
    images, labels = read_idx_file(images_path), read_idx_file(labels_path)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images_path} and {labels_path} disagree on the number of examples")
    return images, labels


def encode_png(array: np.ndarray, *, smallest: bool = True) -> bytes:
    """PNG bytes of a uint8 (H, W) or (H, W, C) array: the smallest file, or (`smallest=False`) the
    fastest."""
    buffer = io.BytesIO()
    options = {"optimize": True} if smallest else {"compress_level": 1}
    PILImage.fromarray(array).save(buffer, format="PNG", **options)
    return buffer.getvalue()


def fashion_mnist_features():
    """`datasets.Features` of the Fashion-MNIST datasets: `image` (PNG) and `label` (ClassLabel)."""
    import datasets

    return datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(FASHION_MNIST_LABELS))}
    )


def load_fashion_mnist(split: str = "train", directory: str | os.PathLike = DEBIAN_FASHION_MNIST_DIR):
    """The full Fashion-MNIST split (60000 train / 10000 test) from the Debian package, as a
    `datasets.Dataset`.

    Images are encoded as PNG in memory (about 10 s for the train split on a busy core), so they go through
    the same decoding path as any other dataset.

    Args:
        split: "train" or "test".
        directory: where the IDX files are (Debian installs them in /usr/share/datasets/fashion-mnist).

    Returns:
        `datasets.Dataset` with columns `image` and `label`.
    """
    import datasets

    images, labels = fashion_mnist_arrays(split, directory)
    return datasets.Dataset.from_dict(
        {
            "image": [{"bytes": encode_png(image, smallest=False), "path": None} for image in images],
            "label": labels.tolist(),
        },
        features=fashion_mnist_features(),
        split=datasets.NamedSplit(split),
    )


def load_embedded_dataset(split: str = "train"):
    """The Fashion-MNIST subset shipped with hf_dino (no network, no extra install).

    Args:
        split: "train" (5000 images, 500 per class) or "test" (1000 images, 100 per class).

    Returns:
        `datasets.Dataset` with columns `image` (PNG) and `label` (ClassLabel with the 10 class names).
    """
    import datasets
    import pyarrow.parquet as parquet

    path = EMBEDDED_DATA_DIR / f"{split}.parquet"
    if not path.exists():
        available = sorted(p.stem for p in EMBEDDED_DATA_DIR.glob("*.parquet"))
        raise ValueError(f"the embedded dataset has splits {available}, not {split!r}")
    # Read into memory directly: the files are small, and this writes nothing to the datasets cache.
    return datasets.Dataset(parquet.read_table(path), split=datasets.NamedSplit(split))


# ------------------------------------------------------------------------------------------------------------
# Loading any image dataset
# ------------------------------------------------------------------------------------------------------------


def detect_image_column(features: Any) -> str:
    """Name of the column that holds the images.

    Preference: a column with the `datasets.Image` feature (by the usual names first: image, img, jpg, png,
    ...), then bytes / path columns with one of those names, then array columns (N-channel data).

    Args:
        features: `datasets.Features` (or a dict of name -> feature).

    Returns:
        The column name.
    """
    import datasets

    if not features:
        raise ValueError("the dataset does not declare its columns; pass image_column= explicitly")
    names = list(features)

    def ranked(candidates: list[str]) -> str:
        for preferred in IMAGE_COLUMN_NAMES:
            for name in candidates:
                if name.lower() == preferred:
                    return name
        return candidates[0]

    image_columns = [name for name in names if isinstance(features[name], datasets.Image)]
    if image_columns:
        return ranked(image_columns)
    named = [
        name
        for name in names
        if name.lower() in IMAGE_COLUMN_NAMES
        and isinstance(features[name], datasets.Value)
        and features[name].dtype in ("binary", "large_binary", "string", "large_string")
    ]
    if named:
        return ranked(named)
    arrays = [
        name
        for name in names
        if isinstance(features[name], (datasets.Array2D, datasets.Array3D)) and name.lower() != "label"
    ]
    if arrays:
        return ranked(arrays)
    raise ValueError(
        f"could not find an image column among {names}: "
        "pass image_column= (an Image, bytes, path or array column)"
    )


def list_image_files(root: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """Every image file under `root`, at any depth, in a deterministic order.

    Hidden files and folders are ignored. Files are chosen by suffix (see `IMAGE_SUFFIXES`); whether they
    really are images is found out when decoding.

    Returns:
        (image files, other files that were ignored), both sorted.
    """
    root = Path(root)
    images, others = [], []
    for directory, subdirectories, filenames in os.walk(root):
        subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
        for filename in sorted(filenames):
            if filename.startswith("."):
                continue
            path = Path(directory) / filename
            (images if path.suffix.lower() in IMAGE_SUFFIXES else others).append(path)
    return sorted(images), sorted(others)


def _image_folder_dataset(root: Path, split: str):
    """A map-style dataset of the image files under `root` (or its `split` subfolder), with folder labels when
    every image sits in a class folder directly under the split root."""
    import datasets

    for alias in SPLIT_FOLDER_ALIASES.get(split, (split,)):
        if (root / alias).is_dir():
            root = root / alias
            break
    else:
        if split != "train":
            raise ValueError(
                f"{root} has no {split!r} subfolder; "
                "the whole folder is the 'train' split (pass split='train')"
            )
    files, ignored = list_image_files(root)
    if ignored:
        logger.info(
            "%s: ignoring %d files without an image suffix (e.g. %s)", root, len(ignored), ignored[0].name
        )
    if not files:
        raise ValueError(f"no image files found under {root}")
    columns: dict[str, list] = {"image": [{"bytes": None, "path": str(path)} for path in files]}
    features = {"image": datasets.Image(decode=False)}
    relative_parents = [path.relative_to(root).parent for path in files]
    class_names = sorted({str(parent) for parent in relative_parents})
    if all(len(parent.parts) == 1 for parent in relative_parents) and len(class_names) >= 2:
        # The classic ImageFolder layout root/<class>/<image>: keep the classes as labels (useful for k-NN).
        columns["label"] = [class_names.index(str(parent)) for parent in relative_parents]
        features["label"] = datasets.ClassLabel(names=class_names)
    return datasets.Dataset.from_dict(
        columns, features=datasets.Features(features), split=datasets.NamedSplit(split)
    )


def _builder_for(path: str) -> str | None:
    suffix = Path(path.split("?")[0]).suffix.lower()
    return DATA_FILE_BUILDERS.get(suffix)


def _is_remote(path: str) -> bool:
    return "://" in path


def load_image_dataset(
    dataset: str | None = None,
    *,
    split: str = "train",
    streaming: bool = True,
    image_column: str | None = None,
    data_files: Any = None,
    revision: str | None = None,
    name: str | None = None,
    cache_dir: str | None = None,
    decode: bool = False,
):
    """Load an image dataset from wherever it lives, with its image column left undecoded.

    Args:
        dataset: one of
            - None or `EMBEDDED_DATASET` ("hf_dino:fashion-mnist"): the Fashion-MNIST subset inside the
              package; `FULL_FASHION_MNIST` ("hf_dino:fashion-mnist-full"): the full set (Debian package);
            - a local folder of images, any nesting, no class folders needed (a subfolder named after `split`,
              e.g. train/ or val/, is used when present; images directly in class folders get a `label`);
            - a folder written by `datasets.save_to_disk`, or a folder of data files (parquet / arrow / tar);
            - a parquet / arrow / webdataset (.tar) file, a glob of them, or a URL of one (http, s3,
              hf://...);
            - a builder name ("parquet", "arrow", "webdataset", "imagefolder") with `data_files`;
            - anything else: a Hub dataset id (streamed when `streaming`).
        split: the split to load.
        streaming: return a `datasets.IterableDataset` (read lazily) instead of a map-style
            `datasets.Dataset`.
        image_column: the image column; detected with `detect_image_column` when omitted. Pass the same name
            to `MultiCropDataset`.
        data_files: passed to `datasets.load_dataset` (file selection for Hub ids and builder names).
        revision: Hub revision (branch, tag or commit).
        name: dataset configuration name (Hub datasets with several configurations).
        cache_dir: datasets cache folder for non-streaming loads.
        decode: keep `datasets` decoding the images to PIL (for inspection); the training pipeline wants
            False.

    Returns:
        `datasets.Dataset` or `datasets.IterableDataset` whose image column is a
        `datasets.Image(decode=decode)` feature (other columns, e.g. labels, are kept).
    """
    import datasets

    if isinstance(dataset, os.PathLike):
        dataset = os.fspath(dataset)
    loaded = _load_any(
        dataset,
        split=split,
        streaming=streaming,
        data_files=data_files,
        revision=revision,
        name=name,
        cache_dir=cache_dir,
    )
    if isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in loaded:
            raise ValueError(f"{dataset!r} has splits {list(loaded)}, not {split!r}")
        loaded = loaded[split]
    if streaming and isinstance(loaded, datasets.Dataset):
        # Several shards let ranks and shuffling work on whole shards; the count divides 1, 2, 4 and 8 ranks.
        loaded = loaded.to_iterable_dataset(num_shards=min(8, max(1, len(loaded))))
    features = loaded.features
    column = image_column or detect_image_column(features)
    if features is not None:
        if column not in features:
            raise ValueError(f"image column {column!r} not found; the columns are {list(features)}")
        feature = features[column]
        castable = isinstance(feature, datasets.Image) or (
            isinstance(feature, datasets.Value)
            and feature.dtype in ("binary", "large_binary", "string", "large_string")
        )
        if castable and not (isinstance(feature, datasets.Image) and feature.decode == decode):
            loaded = loaded.cast_column(column, datasets.Image(decode=decode))
    return loaded


def _load_any(dataset, *, split, streaming, data_files, revision, name, cache_dir):
    import datasets

    if dataset is None or dataset == EMBEDDED_DATASET:
        return load_embedded_dataset(split)
    if dataset == FULL_FASHION_MNIST:
        return load_fashion_mnist(split)
    if dataset.startswith("hf_dino:"):
        raise ValueError(
            f"unknown built-in dataset {dataset!r}; known: {EMBEDDED_DATASET}, {FULL_FASHION_MNIST}"
        )
    common = {"split": split, "streaming": streaming, "cache_dir": cache_dir}
    if dataset in PACKAGED_BUILDERS:
        if data_files is None:
            raise ValueError(f"the {dataset!r} builder needs data_files=")
        return datasets.load_dataset(dataset, data_files=_files_for_split(data_files, split), **common)

    if _is_remote(dataset) and not dataset.startswith("hf://datasets/") or _builder_for(dataset) is not None:
        # One data file or a glob of them, local or remote: one builder, the files form the requested split.
        builder = _builder_for(dataset)
        if builder is None:
            raise ValueError(f"cannot tell the format of {dataset!r}: use a .parquet, .arrow or .tar file")
        if not _is_remote(dataset):
            matches = sorted(glob.glob(os.path.expanduser(dataset), recursive=True))
            if not matches:
                raise FileNotFoundError(f"no file matches {dataset!r}")
            return datasets.load_dataset(builder, data_files={split: matches}, **common)
        return datasets.load_dataset(builder, data_files={split: dataset}, **common)

    path = Path(os.path.expanduser(dataset))
    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return datasets.Dataset.from_dict(
                {"image": [{"bytes": None, "path": str(path)}]},
                features=datasets.Features({"image": datasets.Image(decode=False)}),
            )
        raise ValueError(
            f"cannot tell the format of {path}: use a folder, an image, a .parquet, .arrow or .tar file"
        )
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return datasets.load_from_disk(str(path))
        files, others = list_image_files(path)
        data_file_suffixes = {p.suffix.lower() for p in others} & set(DATA_FILE_BUILDERS)
        if not files and data_file_suffixes:
            # A folder of data files (e.g. a downloaded Hub snapshot): datasets infers builder and splits.
            return datasets.load_dataset(str(path), data_files=data_files, **common)
        return _image_folder_dataset(path, split)
    if dataset.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{dataset!r} does not exist")
    # Anything else is a Hub dataset id (or an hf:// URL of one).
    return datasets.load_dataset(dataset, name=name, revision=revision, data_files=data_files, **common)


def _files_for_split(data_files: Any, split: str) -> Any:
    if isinstance(data_files, (str, os.PathLike)):
        return {split: str(data_files)}
    if isinstance(data_files, (list, tuple)):
        return {split: [str(item) for item in data_files]}
    return data_files


# ------------------------------------------------------------------------------------------------------------
# Decoding
# ------------------------------------------------------------------------------------------------------------


class SkippedImage(Exception):
    """An entry that cannot be used, with one of `SKIP_REASONS`."""

    def __init__(self, reason: str, message: str = "") -> None:
        super().__init__(message or reason)
        self.reason = reason


def decode_image(
    value: Any,
    *,
    image_mode: ImageMode = "RGB",
    minimum_size: Callable[[int, int], tuple[int, int]] | None = None,
) -> tuple[Any | None, str | None]:
    """Decode one image value without ever raising.

    Conversions: palette, CMYK, LA, RGBA (alpha dropped, as the original's loader) and other modes go to RGB
    (or L); 16-bit (`I;16*`, `I`) and float (`F`) images become uint16 / float32 arrays to keep their depth.

    Args:
        value: what a dataset holds: `{"bytes", "path"}` dict (`datasets.Image(decode=False)`), raw bytes, a
            path or URL, a PIL image, or an array (H, W[, C]).
        image_mode: "RGB" (3 channels, the default and the original's choice), "L" (1 channel) or "native"
            (1 channel for grayscale sources, 3 for colour ones, arrays keep their channels).
        minimum_size: `(width, height) -> (width, height)` smallest useful size; large JPEGs are then
            decoded at a reduced scale (PIL draft mode), which is much faster.

    Returns:
        (image, None) with a PIL image (L or RGB) or a numpy array (H, W, C) of uint8 / uint16 / float32;
        or (None, reason) with one of `SKIP_REASONS`.
    """
    try:
        return _convert(_open(value, minimum_size), image_mode), None
    except SkippedImage as skipped:
        return None, skipped.reason
    except PILImage.DecompressionBombError:
        return None, "too_large"
    except UnidentifiedImageError:
        return None, "not_an_image"
    except Exception as error:  # never let one bad file stop a run
        return None, "truncated" if "truncated" in str(error).lower() else "corrupt"


def _open(value: Any, minimum_size: Callable[[int, int], tuple[int, int]] | None) -> Any:
    if value is None:
        raise SkippedImage("missing")
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is None and not path:
            raise SkippedImage("missing")
        value = data if data is not None else path
    if isinstance(value, PILImage.Image):
        value.load()
        return value
    if isinstance(value, (np.ndarray, torch.Tensor, list)):
        return np.asarray(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) == 0:
            raise SkippedImage("missing")
        return _open_bytes(bytes(value), minimum_size)
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if _is_remote(path):
            import fsspec

            with fsspec.open(path, "rb") as handle:
                return _open_bytes(handle.read(), minimum_size)
        with open(path, "rb") as handle:
            return _open_bytes(handle.read(), minimum_size)
    raise SkippedImage("not_an_image", f"unsupported value of type {type(value).__name__}")


def _open_bytes(data: bytes, minimum_size: Callable[[int, int], tuple[int, int]] | None) -> Any:
    if data[:6] == b"\x93NUMPY":
        # N-channel data stored as .npy: never unpickle (object arrays are refused).
        return np.load(io.BytesIO(data), allow_pickle=False)
    with warnings.catch_warnings():
        # PIL warns about odd EXIF or palette transparency; the image is still fine.
        warnings.simplefilter("ignore")
        image = PILImage.open(io.BytesIO(data))
        if minimum_size is not None and image.format == "JPEG":
            width, height = minimum_size(*image.size)
            if 2 * width <= image.size[0] and 2 * height <= image.size[1]:
                # JPEG DCT scaling decodes at 1/2, 1/4 or 1/8 size, never below the requested size.
                image.draft(image.mode if image.mode in ("RGB", "L") else None, (width, height))
        image.load()
    return image


def _convert(image: Any, image_mode: ImageMode) -> Any:
    if image_mode not in ("RGB", "L", "native"):
        raise ValueError(f"image_mode must be 'RGB', 'L' or 'native', got {image_mode!r}")
    if isinstance(image, np.ndarray):
        return _convert_array(image, image_mode)
    mode = image.mode
    if image.width == 0 or image.height == 0:
        raise SkippedImage("unsupported", "empty image")
    if mode == "F":
        return _convert_array(np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0), image_mode)
    if mode.startswith("I;16") or mode == "I":
        # Keep the 16-bit depth: PIL's own conversion to L or RGB would clip values above 255.
        return _convert_array(
            np.clip(np.asarray(image).astype(np.int64), 0, 65535).astype(np.uint16), image_mode
        )
    if image_mode == "native":
        target = "L" if mode in ("1", "L", "LA", "La") else "RGB"
    else:
        target = image_mode
    if mode in ("P", "PA"):
        # Palette transparency must go through RGBA (PIL warns otherwise); alpha is then dropped.
        image = (
            image.convert("RGBA") if mode == "PA" or "transparency" in image.info else image.convert("RGB")
        )
    return image if image.mode == target else image.convert(target)


def _convert_array(array: np.ndarray, image_mode: ImageMode) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    elif looks_channel_first(array.shape):
        array = np.moveaxis(array, 0, -1)  # channel-first
    if array.ndim != 3 or array.shape[0] == 0 or array.shape[1] == 0 or array.shape[2] == 0:
        raise SkippedImage("unsupported", f"array of shape {array.shape} is not an image")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        array = np.clip(array, 0.0, 1.0).astype(np.float32)
    elif np.issubdtype(array.dtype, np.integer) and array.dtype not in (np.uint8, np.uint16):
        array = np.clip(array, 0, 65535).astype(np.uint16)
    elif array.dtype not in (np.uint8, np.uint16):
        raise SkippedImage("unsupported", f"array dtype {array.dtype}")
    channels = array.shape[2]
    if image_mode == "native":
        return array
    if image_mode == "RGB":
        if channels == 1:
            return np.repeat(array, 3, axis=2)
        if channels in (3, 4):
            return array[:, :, :3]
        if channels == 2:
            return np.repeat(array[:, :, :1], 3, axis=2)
    else:  # "L"
        if channels in (1, 2):
            return array[:, :, :1]
        if channels in (3, 4):
            luma = array[:, :, :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            if array.dtype != np.float32:
                luma = np.round(luma).astype(array.dtype)
            return luma[:, :, None]
    raise SkippedImage("unsupported", f"cannot turn {channels} channels into {image_mode}")


# ------------------------------------------------------------------------------------------------------------
# The multi-crop stream
# ------------------------------------------------------------------------------------------------------------

# Layout of the shared-memory state tensor: epoch, start position, then skip counters per worker slot (each
# DataLoader worker writes only its own row, so no lock is needed; more workers than slots share rows).
_EPOCH, _START, _FIRST_COUNTER = 0, 1, 2
_WORKER_SLOTS = 64


def example_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """The augmentation seed of one example: a hash of its place, so resumed runs repeat the same views."""
    return int(np.random.SeedSequence([seed, epoch, rank, position]).generate_state(1, dtype=np.uint64)[0])


class MultiCropDataset(torch.utils.data.IterableDataset):
    """A stream of DINO multi-crop views, sharded across processes and DataLoader workers, resumable.

    Args:
        dataset: a `datasets.Dataset` (shuffled by a full permutation per epoch), a `datasets.IterableDataset`
            (shuffled through a buffer; ranks take whole shards when the shard count divides the world size,
            every world_size-th example otherwise), or any sequence of images / dicts.
        augmentation: called as `augmentation(image, seed=...)` on the decoded image; `MultiCropAugmentation`
            by default. None yields the decoded image as a tensor (C, H, W).
        image_column: the image column (detected when omitted).
        image_mode: "RGB" (default, as the original), "L" or "native"; see `decode_image`.
        batch_size: the DataLoader's batch size: workers take blocks of this many consecutive positions in
            turn, so batches are the stream cut in order and a resumed run is exact for any number of
            workers.
        rank, world_size: this process among all training processes.
        shuffle: reshuffle every epoch (`set_epoch`).
        seed: base seed of shuffling and augmentation.
        shuffle_buffer_size: buffer of the streaming shuffle (`datasets.IterableDataset.shuffle`).
        keep_placeholders: yield None for skipped entries (keeps batches aligned; `collate_multicrop`
            drops them).
        max_logged_skips: how many skipped entries each process describes in the log.
    """

    def __init__(
        self,
        dataset: Any,
        augmentation: Callable[..., Any] | None | Literal["default"] = "default",
        *,
        image_column: str | None = None,
        image_mode: ImageMode = "RGB",
        batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_buffer_size: int = 1000,
        keep_placeholders: bool = True,
        max_logged_skips: int = 10,
    ) -> None:
        super().__init__()
        import datasets

        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if image_mode not in ("RGB", "L", "native"):
            raise ValueError(f"image_mode must be 'RGB', 'L' or 'native', got {image_mode!r}")
        self.dataset = dataset
        self.augmentation = MultiCropAugmentation() if augmentation == "default" else augmentation
        self.is_streaming = isinstance(dataset, datasets.IterableDataset)
        self.is_hf_dataset = isinstance(dataset, (datasets.Dataset, datasets.IterableDataset))
        if self.is_hf_dataset:
            self.image_column = image_column or detect_image_column(dataset.features)
        else:
            if not isinstance(dataset, Sequence) and not hasattr(dataset, "__getitem__"):
                raise TypeError(
                    "dataset must be a datasets.Dataset, a datasets.IterableDataset or a sequence"
                )
            self.image_column = image_column
        self.image_mode = image_mode
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer_size = shuffle_buffer_size
        self.keep_placeholders = keep_placeholders
        self.max_logged_skips = max_logged_skips
        # Epoch, start position and skip counters live in shared memory so that DataLoader workers (persistent
        # ones too) see `set_epoch` / `load_state_dict`, and the main process sees the workers' skip counts.
        # A shared tensor travels to workers under any start method (fork, spawn, forkserver).
        self._shared = torch.zeros(_FIRST_COUNTER + _WORKER_SLOTS * len(SKIP_REASONS), dtype=torch.int64)
        self._shared.share_memory_()
        self._worker_slot = 0
        self._position: int | None = None  # live position when iterated in this process without workers
        self._logged_skips = 0
        self._image_column_view = None  # the image column alone, for cheap row lookups

    # -- state ---------------------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return int(self._shared[_EPOCH])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (reshuffles); moving to another epoch starts it from its first example."""
        if int(self._shared[_EPOCH]) != epoch:
            self._shared[_EPOCH] = epoch
            self._shared[_START] = 0
        self._position = None

    def set_position(self, examples_consumed: int) -> None:
        """Start the current epoch after `examples_consumed` examples of this process's stream."""
        if examples_consumed < 0:
            raise ValueError("examples_consumed must be >= 0")
        self._shared[_START] = examples_consumed
        self._position = None

    def state_dict(self) -> dict[str, int]:
        """{"epoch", "examples_consumed", "seed"}: where this process is in its stream.

        Without DataLoader workers the position advances as examples are iterated. With workers the main
        process cannot see their progress: the training loop sets it, e.g.
        `load_state_dict({"epoch": epoch, "examples_consumed": batches_done_in_epoch * batch_size})`.
        """
        position = self._position if self._position is not None else int(self._shared[_START])
        return {"epoch": self.epoch, "examples_consumed": position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at `state["epoch"]` after `state["examples_consumed"]` examples of this process's stream."""
        if "seed" in state and int(state["seed"]) != self.seed:
            logger.warning(
                "resuming with seed %d instead of the saved %d: the order will differ",
                self.seed,
                state["seed"],
            )
        self._shared[_EPOCH] = int(state["epoch"])
        self._shared[_START] = int(state.get("examples_consumed", 0))
        self._position = None

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        """Entries skipped so far (all epochs, all workers of this process), by reason."""
        counts = self._shared[_FIRST_COUNTER:].view(_WORKER_SLOTS, len(SKIP_REASONS)).sum(dim=0).tolist()
        return dict(zip(SKIP_REASONS, counts))

    @property
    def num_skipped(self) -> int:
        """Total entries skipped so far (corrupt, truncated, non-image, ...); log it."""
        return sum(self.skipped_by_reason.values())

    @property
    def num_examples(self) -> int | None:
        """Examples in the whole dataset (all processes), when known."""
        if not self.is_streaming:
            return len(self.dataset)
        splits = self.dataset.info.splits
        split = str(self.dataset.split) if self.dataset.split is not None else None
        if splits and split in splits and splits[split].num_examples:
            return int(splits[split].num_examples)
        return None

    @property
    def num_examples_per_rank(self) -> int | None:
        """Examples this rank sees per epoch (map-style datasets; ranks differ by at most one)."""
        if self.is_streaming:
            return None
        return len(range(self.rank, len(self.dataset), self.world_size))

    # -- iteration -----------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[list[torch.Tensor] | None]:
        worker = torch.utils.data.get_worker_info()
        if worker is None:
            yield from self.iterate(worker_id=0, num_workers=1, track_position=True)
        else:
            yield from self.iterate(worker_id=worker.id, num_workers=worker.num_workers)

    def iterate(
        self, *, worker_id: int = 0, num_workers: int = 1, track_position: bool = False
    ) -> Iterator[list[torch.Tensor] | None]:
        """The examples of one worker (what `__iter__` runs in a DataLoader worker; callable directly to
        simulate workers in one process).

        Yields:
            The crops of each example (a list of 2 + N tensors), or None for a skipped entry.
        """
        if not 0 <= worker_id < num_workers:
            raise ValueError(f"worker_id must be in [0, num_workers), got {worker_id}, {num_workers}")
        epoch, start = int(self._shared[_EPOCH]), int(self._shared[_START])
        self._worker_slot = worker_id % _WORKER_SLOTS
        if track_position:
            self._position = start
        for position, value, key in self._assigned_examples(epoch, start, worker_id, num_workers):
            views = self._process(value, key, example_seed(self.seed, epoch, self.rank, position))
            if track_position:
                self._position = position + 1
            if views is not None or self.keep_placeholders:
                yield views

    def _owns(self, position: int, start: int, worker_id: int, num_workers: int) -> bool:
        return position >= start and ((position - start) // self.batch_size) % num_workers == worker_id

    def _assigned_examples(
        self, epoch: int, start: int, worker_id: int, num_workers: int
    ) -> Iterator[tuple[int, Any, Any]]:
        """(position in this rank's stream, image value, key for logs) of the examples this worker handles."""
        if self.is_streaming:
            yield from self._assigned_streaming(epoch, start, worker_id, num_workers)
            return
        size = len(self.dataset)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(size)
        else:
            order = np.arange(size)
        rank_indices = order[self.rank :: self.world_size]
        positions = (
            position
            for block_start in range(
                start + worker_id * self.batch_size, len(rank_indices), num_workers * self.batch_size
            )
            for position in range(block_start, min(block_start + self.batch_size, len(rank_indices)))
        )
        # Fetch rows in groups: one `datasets` lookup per row would dominate the cost for small images.
        while group := [position for _, position in zip(range(64), positions)]:
            indices = [int(rank_indices[position]) for position in group]
            values = self._fetch(indices)
            yield from zip(group, values, indices)

    def _fetch(self, indices: list[int]) -> list[Any]:
        if self.is_hf_dataset:
            if self._image_column_view is None:
                self._image_column_view = self.dataset.select_columns([self.image_column])
            return self._image_column_view[indices][self.image_column]
        values = []
        for index in indices:
            item = self.dataset[index]
            if isinstance(item, dict):
                item = item[self.image_column or "image"]
            elif isinstance(item, tuple):
                item = item[0]
            values.append(item)
        return values

    def _assigned_streaming(
        self, epoch: int, start: int, worker_id: int, num_workers: int
    ) -> Iterator[tuple[int, Any, Any]]:
        from datasets.distributed import split_dataset_by_node

        stream = self.dataset
        columns = [self.image_column] + [name for name in ("__key__",) if name in (stream.features or {})]
        stream = stream.select_columns(columns)
        if self.shuffle:
            stream = stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer_size)
        stream.set_epoch(epoch)
        if self.world_size > 1:
            stream = split_dataset_by_node(stream, rank=self.rank, world_size=self.world_size)
        position = 0
        # `.iter()` rather than `for example in stream`: inside a DataLoader worker `datasets` would otherwise
        # hand each worker whole shards of its own, and with fewer shards than workers some would get nothing.
        for batch in stream.iter(batch_size=64):
            keys = batch.get("__key__") or [None] * len(batch[self.image_column])
            for value, key in zip(batch[self.image_column], keys):
                if self._owns(position, start, worker_id, num_workers):
                    yield position, value, key
                position += 1

    def _process(self, value: Any, key: Any, seed: int) -> list[torch.Tensor] | None:
        minimum_size = getattr(self.augmentation, "minimum_decode_size", None)
        image, reason = decode_image(value, image_mode=self.image_mode, minimum_size=minimum_size)
        if image is None:
            self._count_skip(reason, value, key)
            return None
        try:
            if self.augmentation is None:
                return image_to_tensor(image)
            return self.augmentation(image, seed=seed)
        except Exception as error:  # an odd image must not stop the run: count it like a corrupt file
            self._count_skip("unsupported", value, key, error)
            return None

    def _count_skip(self, reason: str, value: Any, key: Any, error: Exception | None = None) -> None:
        self._shared[_FIRST_COUNTER + self._worker_slot * len(SKIP_REASONS) + SKIP_REASONS.index(reason)] += 1
        if self._logged_skips < self.max_logged_skips:
            self._logged_skips += 1
            where = value.get("path") if isinstance(value, dict) and value.get("path") else key
            detail = f": {error}" if error is not None else ""
            logger.warning("skipped an image (%s) at %s%s", reason, where, detail)


def collate_multicrop(batch: Sequence[Sequence[torch.Tensor] | None]) -> list[torch.Tensor] | None:
    """Stack the views of a batch: one tensor (B, C, H, W) per crop, in crop order.

    Skipped entries (None) are dropped, so a batch with corrupt files is smaller. Returns None when every
    entry was skipped; the training loop should then move on to the next batch.

    Args:
        batch: per example, the list of its 2 + N crops (C, H, W) (or a single tensor), or None.

    Returns:
        2 + N tensors (B', C, H, W), B' = number of valid examples (one tensor for single images); or None.
    """
    examples = [example for example in batch if example is not None]
    if not examples:
        return None
    try:
        if isinstance(examples[0], torch.Tensor):  # single images (augmentation=None)
            return torch.stack(examples)
        return [torch.stack([example[crop] for example in examples]) for crop in range(len(examples[0]))]
    except RuntimeError as error:
        first_crops = [example if isinstance(example, torch.Tensor) else example[0] for example in examples]
        shapes = sorted({tuple(crop.shape) for crop in first_crops})
        raise ValueError(
            f"cannot batch crops of different shapes {shapes}; mixed grayscale and colour images need "
            "image_mode='RGB' or 'L' rather than 'native'"
        ) from error


# ------------------------------------------------------------------------------------------------------------
# CPU throughput of the data pipeline
# ------------------------------------------------------------------------------------------------------------


def sample_benchmark_jpegs(
    count: int = 8, size: tuple[int, int] = (500, 375), quality: int = 90
) -> list[bytes]:
    """ImageNet-like JPEGs (500 x 375, quality 90): scikit-image's photos if installed, else synthetic."""
    photos = []
    try:
        import skimage.data

        for name in (
            "astronaut",
            "coffee",
            "chelsea",
            "rocket",
            "immunohistochemistry",
            "retina",
            "cat",
            "colorwheel",
        ):
            loader = getattr(skimage.data, name, None)
            if loader is None:
                continue
            array = loader()
            if array.ndim == 3 and array.shape[2] == 3:
                photos.append(PILImage.fromarray(array).convert("RGB"))
    except ImportError:
        pass
    rng = np.random.default_rng(0)
    while len(photos) < count:
        y, x = np.mgrid[0 : size[1], 0 : size[0]] / 50.0
        channels = [
            np.sin(x * rng.uniform(0.2, 2) + y * rng.uniform(0.2, 2) + rng.uniform(0, 6)) for _ in range(3)
        ]
        noise = rng.normal(0, 0.1, (size[1], size[0], 3))
        array = np.clip((np.stack(channels, -1) * 0.4 + 0.5 + noise) * 255, 0, 255).astype(np.uint8)
        photos.append(PILImage.fromarray(array))
    encoded = []
    for photo in photos[:count]:
        buffer = io.BytesIO()
        photo.resize(size, PILImage.Resampling.BICUBIC).save(buffer, format="JPEG", quality=quality)
        encoded.append(buffer.getvalue())
    return encoded


def benchmark_cpu_pipeline(
    images: Sequence[bytes] | None = None,
    *,
    config: MultiCropConfig | None = None,
    photometric_on: Literal["workers", "accelerator"] = "accelerator",
    seconds: float = 5.0,
) -> dict[str, Any]:
    """Images per second per CPU core of the data-worker work: decode + multi-crop (+ photometric on
    "workers").

    Runs single-threaded (`torch.set_num_threads(1)`) and divides by the process's CPU time, so the figure is
    per core even on a busy machine.

    Returns:
        {"images_per_second_per_core", "images_per_second_wall", "images", "num_crops", "photometric_on",
        ...}.
    """
    images = list(images) if images is not None else sample_benchmark_jpegs()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        augmentation = MultiCropAugmentation(config, photometric_on=photometric_on)
        for index, data in enumerate(images[:2]):  # warm-up
            augmentation(decode_image(data, minimum_size=augmentation.minimum_decode_size)[0], seed=index)
        count, cpu_start, wall_start = 0, time.process_time(), time.perf_counter()
        while time.process_time() - cpu_start < seconds:
            for data in images:
                image, reason = decode_image(data, minimum_size=augmentation.minimum_decode_size)
                if image is None:
                    raise ValueError(f"benchmark image could not be decoded ({reason})")
                augmentation(image, seed=count)
                count += 1
        cpu_seconds, wall_seconds = time.process_time() - cpu_start, time.perf_counter() - wall_start
    finally:
        torch.set_num_threads(threads)
    first = PILImage.open(io.BytesIO(images[0]))
    return {
        "images_per_second_per_core": count / cpu_seconds,
        "images_per_second_wall": count / wall_seconds,
        "images": count,
        "num_crops": augmentation.config.num_crops,
        "crop_sizes": [augmentation.config.global_crop_size, augmentation.config.local_crop_size],
        "photometric_on": photometric_on,
        "image_size": list(first.size),
        "torch": torch.__version__,
    }


def benchmark_main(argv: list[str] | None = None) -> int:
    """`python -m hf_dino.data [--local-crops-number 10] [--photometric-on both] [--images DIR]`."""
    parser = argparse.ArgumentParser(
        prog="python -m hf_dino.data", description="CPU throughput of the DINO data pipeline, per core."
    )
    parser.add_argument("--local-crops-number", type=int, default=10, help="local crops (issue target: 10)")
    parser.add_argument("--photometric-on", choices=["accelerator", "workers", "both"], default="both")
    parser.add_argument("--seconds", type=float, default=5.0, help="CPU seconds per measurement")
    parser.add_argument(
        "--images", help="folder of JPEGs to use instead of the built-in ImageNet-like samples"
    )
    args = parser.parse_args(argv)
    images = None
    if args.images:
        files, _ = list_image_files(args.images)
        images = [path.read_bytes() for path in files[:64]]
        if not images:
            parser.error(f"no images under {args.images}")
    config = MultiCropConfig(local_crops_number=args.local_crops_number)
    placements = ["accelerator", "workers"] if args.photometric_on == "both" else [args.photometric_on]
    for placement in placements:
        result = benchmark_cpu_pipeline(images, config=config, photometric_on=placement, seconds=args.seconds)
        work = "decode + crops" if placement == "accelerator" else "decode + crops + photometric"
        width, height = result["image_size"]
        print(
            f"{work:<30} {result['num_crops']} crops, {width}x{height} JPEG: "
            f"{result['images_per_second_per_core']:.1f} images/s per core"
        )
    return 0


if __name__ == "__main__":
    sys.exit(benchmark_main())
