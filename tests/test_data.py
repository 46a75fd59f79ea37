"""Tests of dataset loading, robust decoding, sharding, resuming and collation (CPU, small images)."""

from __future__ import annotations

import functools
import http.server
import io
import json
import subprocess
import sys
import tarfile
import textwrap
import threading
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_dino.augmentation import MultiCropAugmentation, MultiCropConfig
from hf_dino.data import (
    EMBEDDED_DATASET,
    FASHION_MNIST_LABELS,
    MultiCropDataset,
    benchmark_cpu_pipeline,
    collate_multicrop,
    decode_image,
    detect_image_column,
    fashion_mnist_arrays,
    list_image_files,
    load_embedded_dataset,
    load_fashion_mnist,
    load_image_dataset,
    read_idx_file,
)

torch.set_num_threads(1)

SMALL = MultiCropConfig(global_crop_size=16, local_crop_size=8, local_crops_number=2)


def encode(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def gray_png(value: int, size: int = 4) -> bytes:
    """A constant image whose pixel value identifies the example."""
    return encode(Image.fromarray(np.full((size, size), value, dtype=np.uint8)))


def identities(examples) -> list[int]:
    """Pixel value of each yielded example (augmentation=None yields the decoded image as a tensor)."""
    return [int(example[0, 0, 0]) for example in examples if example is not None]


def photo_like(width: int = 40, height: int = 30) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """Nested images of every awkward kind and broken entries: 8 usable, 3 bad, 1 file that is no image."""
    root = tmp_path / "messy"
    for folder in ("a/b", "c/d/e", ".hidden"):
        (root / folder).mkdir(parents=True)
    rgb = photo_like()
    (root / "a/b/rgb.jpg").write_bytes(encode(rgb, "JPEG", quality=90))
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    (root / "a/palette.png").write_bytes(encode(palette, transparency=0))
    (root / "rgba.png").write_bytes(encode(rgb.convert("RGBA")))
    (root / "c/cmyk.jpg").write_bytes(encode(rgb.convert("CMYK"), "JPEG"))
    sixteen = np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50
    (root / "c/d/e/sixteen.png").write_bytes(encode(Image.fromarray(sixteen)))
    (root / "gray.png").write_bytes(encode(rgb.convert("L")))
    (root / "la.png").write_bytes(encode(rgb.convert("LA")))
    four = io.BytesIO()
    np.save(four, np.random.default_rng(1).integers(0, 255, (30, 40, 4), dtype=np.uint8))
    (root / "c/four.npy").write_bytes(four.getvalue())
    # Broken entries: random bytes, a JPEG cut in half, text named like an image.
    (root / "broken.png").write_bytes(
        np.random.default_rng(2).integers(0, 255, 300, dtype=np.uint8).tobytes()
    )
    jpeg = encode(photo_like(200, 150), "JPEG", quality=95)
    (root / "a/truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "fake.jpg").write_text("this is not an image")
    (root / "notes.txt").write_text("ignored: not an image suffix")
    (root / ".hidden/secret.png").write_bytes(encode(rgb))
    return root


USABLE, SKIPPED = 8, {"not_an_image": 2, "truncated": 1}


# -- decoding
# ----------------------------------------------------------------------------------------------------


def test_decode_image_converts_every_mode(messy_folder: Path):
    def decoded(name: str, mode="RGB"):
        image, reason = decode_image({"bytes": None, "path": str(messy_folder / name)}, image_mode=mode)
        assert reason is None, name
        return image

    for name in ("a/b/rgb.jpg", "a/palette.png", "rgba.png", "c/cmyk.jpg", "gray.png", "la.png"):
        image = decoded(name)
        assert image.mode == "RGB" and image.size == (40, 30), name
        assert decoded(name, "L").mode == "L", name
    assert decoded("gray.png", "native").mode == "L" and decoded("la.png", "native").mode == "L"
    assert decoded("c/cmyk.jpg", "native").mode == "RGB"
    # 16-bit stays 16-bit: a uint16 array (replicated to 3 channels for RGB), values above 255 kept.
    sixteen = decoded("c/d/e/sixteen.png")
    assert sixteen.dtype == np.uint16 and sixteen.shape == (30, 40, 3) and sixteen.max() == (30 * 40 - 1) * 50
    assert decoded("c/d/e/sixteen.png", "native").shape == (30, 40, 1)
    # N-channel arrays (.npy): kept in "native" mode, first 3 channels for RGB.
    assert decoded("c/four.npy", "native").shape == (30, 40, 4) and decoded("c/four.npy").shape == (30, 40, 3)


def test_decode_image_reports_why_it_skips(messy_folder: Path):
    def reason(value):
        image, why = decode_image(value)
        assert image is None
        return why

    assert reason({"bytes": None, "path": str(messy_folder / "broken.png")}) == "not_an_image"
    assert reason({"bytes": None, "path": str(messy_folder / "fake.jpg")}) == "not_an_image"
    assert reason({"bytes": None, "path": str(messy_folder / "a/truncated.jpg")}) == "truncated"
    assert (
        reason(None) == "missing"
        and reason({"bytes": None, "path": None}) == "missing"
        and reason(b"") == "missing"
    )
    assert reason({"bytes": None, "path": str(messy_folder / "absent.png")}) == "corrupt"
    assert reason(np.zeros((8, 9, 7), dtype=np.uint8)) == "unsupported"  # 7 channels cannot become RGB
    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert reason(pickled.getvalue()) == "corrupt"  # object arrays are never unpickled


def test_large_jpegs_are_decoded_at_reduced_size():
    data = encode(photo_like(1600, 1200), "JPEG")
    augmentation = MultiCropAugmentation()
    image, _ = decode_image(data, minimum_size=augmentation.minimum_decode_size)
    full, _ = decode_image(data)
    assert full.size == (1600, 1200) and image.size[0] < 1600 and image.size[1] < 1200
    width, height = augmentation.minimum_decode_size(1600, 1200)
    assert image.size[0] >= width and image.size[1] >= height


# -- loading
# -----------------------------------------------------------------------------------------------------


def test_list_image_files_walks_any_nesting(messy_folder: Path):
    files, ignored = list_image_files(messy_folder)
    names = [str(path.relative_to(messy_folder)) for path in files]
    assert len(names) == USABLE + 3 and "c/d/e/sixteen.png" in names and "c/four.npy" in names
    assert not any(".hidden" in name for name in names)
    assert [path.name for path in ignored] == ["notes.txt"]


@pytest.mark.parametrize("streaming", [False, True])
def test_folder_dataset_skips_and_counts_bad_entries(messy_folder: Path, streaming: bool):
    dataset = load_image_dataset(str(messy_folder), streaming=streaming)
    assert detect_image_column(dataset.features) == "image" and "label" not in dataset.features
    views = MultiCropDataset(dataset, MultiCropAugmentation(SMALL), shuffle=False)
    examples = list(views)
    assert len(examples) == USABLE + 3  # placeholders keep positions
    valid = [example for example in examples if example is not None]
    assert len(valid) == USABLE
    assert all(
        len(crops) == 4 and crops[0].shape == (3, 16, 16) and crops[2].shape == (3, 8, 8) for crops in valid
    )
    assert views.num_skipped == 3 and {k: v for k, v in views.skipped_by_reason.items() if v} == SKIPPED
    list(views)  # counts accumulate over passes
    assert views.num_skipped == 6
    batch = collate_multicrop(examples[:6])
    assert len(batch) == 4 and batch[0].shape[0] == sum(e is not None for e in examples[:6])


def test_folder_with_class_folders_and_splits(tmp_path: Path):
    for split, count in (("train", 3), ("val", 2)):
        for label in ("cat", "dog"):
            (tmp_path / split / label).mkdir(parents=True)
            for index in range(count):
                (tmp_path / split / label / f"{index}.png").write_bytes(gray_png(index))
    train = load_image_dataset(str(tmp_path), split="train", streaming=False)
    validation = load_image_dataset(str(tmp_path), split="validation", streaming=False)
    assert len(train) == 6 and len(validation) == 4
    assert train.features["label"].names == ["cat", "dog"] and sorted(train["label"]) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="no 'test' subfolder"):
        load_image_dataset(str(tmp_path), split="test")
    with pytest.raises(FileNotFoundError):
        load_image_dataset(str(tmp_path / "missing"))


def test_parquet_arrow_and_saved_datasets(tmp_path: Path):
    values = list(range(10, 17))
    table = datasets.Dataset.from_dict(
        {"photo": [gray_png(v) for v in values] + [b"garbage"], "index": values + [99]},
        features=datasets.Features({"photo": datasets.Value("binary"), "index": datasets.Value("int64")}),
    )
    with pytest.raises(ValueError, match="image column"):
        detect_image_column(table.features)  # bytes under an unusual name: must be named
    table.to_parquet(str(tmp_path / "part.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    arrow_file = next((tmp_path / "saved").glob("*.arrow"))
    sources = [
        str(tmp_path / "part.parquet"),
        str(tmp_path / "*.parquet"),
        str(tmp_path / "saved"),
        str(arrow_file),
    ]
    for source in sources:
        for streaming in (True, False):
            dataset = load_image_dataset(
                source, image_column="photo", streaming=streaming, cache_dir=str(tmp_path / "c")
            )
            assert isinstance(dataset.features["photo"], datasets.Image) and "index" in dataset.features
            views = MultiCropDataset(dataset, None, image_column="photo", shuffle=False)
            assert identities(views) == values, (source, streaming)
            assert views.skipped_by_reason["not_an_image"] == 1


def test_webdataset_tar(tmp_path: Path):
    path = tmp_path / "shard-000.tar"
    with tarfile.open(path, "w") as tar:
        members = [(f"{i:04d}.png", gray_png(i)) for i in range(5)] + [
            ("0005.png", b"not a png"),
            ("0002.cls", b"1"),
        ]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    dataset = load_image_dataset(str(path))
    assert detect_image_column(dataset.features) == "png"
    views = MultiCropDataset(dataset, None, shuffle=False)
    assert identities(views) == [0, 1, 2, 3, 4] and views.skipped_by_reason["not_an_image"] == 1


def test_remote_parquet_over_http(tmp_path: Path):
    datasets.Dataset.from_dict(
        {"image": [{"bytes": gray_png(v), "path": None} for v in range(6)]},
        features=datasets.Features({"image": datasets.Image()}),
    ).to_parquet(str(tmp_path / "remote.parquet"))

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(tmp_path))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/remote.parquet"
        dataset = load_image_dataset(url)
        assert identities(MultiCropDataset(dataset, None, shuffle=False)) == list(range(6))
    finally:
        server.shutdown()
        thread.join()


HUB_CLIENT = """
import json, sys
from hf_dino.data import MultiCropDataset, load_image_dataset

dataset = load_image_dataset(sys.argv[1], revision="main")
seen, skipped = [], 0
for rank in range(2):
    views = MultiCropDataset(dataset, None, rank=rank, world_size=2, batch_size=2)
    for worker in range(2):
        seen += [int(image[0, 0, 0]) for image in views.iterate(worker_id=worker, num_workers=2) if image is
        not None]
    skipped += views.num_skipped
print(json.dumps({"type": type(dataset).__name__, "seen": sorted(seen), "skipped": skipped}))
"""


def test_hub_dataset_id_is_streamed(local_hub, tmp_path: Path):
    rows = [{"bytes": gray_png(v), "path": None} for v in range(9)] + [{"bytes": b"junk", "path": None}]
    table = datasets.Dataset.from_dict(
        {"image": rows, "label": list(range(10))},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    table.to_parquet(str(tmp_path / "train.parquet"))
    local_hub.server.add_files(
        "test-user/tiny-stream",
        {"data/train-00000-of-00001.parquet": (tmp_path / "train.parquet").read_bytes()},
        repo_type="dataset",
    )
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(HUB_CLIENT))
    completed = subprocess.run(
        [sys.executable, str(script), "test-user/tiny-stream"],
        env=local_hub.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report == {"type": "IterableDataset", "seen": list(range(9)), "skipped": 1}


def test_detect_image_column():
    features = datasets.Features
    assert detect_image_column(features({"label": datasets.Value("int64"), "img": datasets.Image()})) == "img"
    assert detect_image_column(features({"thumb": datasets.Image(), "image": datasets.Image()})) == "image"
    assert (
        detect_image_column(features({"jpg": datasets.Value("binary"), "txt": datasets.Value("string")}))
        == "jpg"
    )
    assert detect_image_column(features({"bands": datasets.Array3D((4, 8, 8), "uint16")})) == "bands"
    with pytest.raises(ValueError, match="image_column"):
        detect_image_column(features({"text": datasets.Value("string")}))


# -- embedded and full Fashion-MNIST
# ----------------------------------------------------------------------------


def test_embedded_dataset_is_balanced_and_labelled():
    for split, per_class in (("train", 500), ("test", 100)):
        dataset = load_embedded_dataset(split)
        assert len(dataset) == 10 * per_class
        assert dataset.features["label"].names == list(FASHION_MNIST_LABELS)
        assert Counter(dataset["label"]) == dict.fromkeys(range(10), per_class)
        image = dataset[0]["image"]
        assert image.mode == "L" and image.size == (28, 28)
    licence = (
        Path(load_embedded_dataset.__code__.co_filename).parent / "data_files/fashion_mnist/LICENSE"
    ).read_text()
    assert "Zalando SE" in licence and "Permission is hereby granted" in licence


def test_embedded_dataset_streams_by_default():
    dataset = load_image_dataset()  # no argument: the embedded subset, streamed
    assert isinstance(dataset, datasets.IterableDataset) and dataset.features["image"].decode is False
    assert load_image_dataset(EMBEDDED_DATASET, split="test", streaming=False).num_rows == 1000
    views = MultiCropDataset(dataset.take(12), MultiCropAugmentation(SMALL), batch_size=4)
    loader = torch.utils.data.DataLoader(views, batch_size=4, collate_fn=collate_multicrop)
    batches = list(loader)
    assert (
        len(batches) == 3
        and [tuple(b.shape) for b in batches[0]] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 2
    )
    assert views.num_skipped == 0


def test_full_fashion_mnist_from_debian(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", directory=tmp_path)
    try:
        images, labels = fashion_mnist_arrays("test")
    except FileNotFoundError:
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,) and labels.max() == 9
    embedded = np.asarray(load_embedded_dataset("test")[0]["image"])
    assert any(np.array_equal(embedded, image) for image in images[:2000])  # the subset comes from here


def test_read_idx_file_rejects_other_files(tmp_path: Path):
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="IDX"):
        read_idx_file(tmp_path / "bad")
    (tmp_path / "good").write_bytes(
        b"\x00\x00\x08\x02" + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes(6)
    )
    assert read_idx_file(tmp_path / "good").shape == (2, 3)


# -- sharding, epochs and resuming
# ------------------------------------------------------------------------------


def numbered_dataset(count: int, *, corrupt: tuple[int, ...] = (), streaming: bool = False, shards: int = 1):
    rows = [{"bytes": b"broken" if i in corrupt else gray_png(i), "path": None} for i in range(count)]
    dataset = datasets.Dataset.from_dict(
        {"image": rows}, features=datasets.Features({"image": datasets.Image(decode=False)})
    )
    return dataset.to_iterable_dataset(num_shards=shards) if streaming else dataset


def loader_order(views: MultiCropDataset, num_workers: int, batch_size: int) -> list[list]:
    """The batches a DataLoader would produce: worker w's k-th batch comes in round k, worker order."""
    streams = [list(views.iterate(worker_id=w, num_workers=num_workers)) for w in range(num_workers)]
    chunks = [[stream[i : i + batch_size] for i in range(0, len(stream), batch_size)] for stream in streams]
    return [
        chunks[w][k] for k in range(max(map(len, chunks))) for w in range(num_workers) if k < len(chunks[w])
    ]


@pytest.mark.parametrize(("streaming", "shards"), [(False, 1), (True, 1), (True, 4)])
def test_two_ranks_two_workers_see_every_example_exactly_once(streaming: bool, shards: int):
    count, batch_size = 37, 3
    dataset = numbered_dataset(count, streaming=streaming, shards=shards)
    seen = []
    for rank in range(2):
        views = MultiCropDataset(dataset, None, batch_size=batch_size, rank=rank, world_size=2, seed=1)
        views.set_epoch(3)
        for worker in range(2):
            seen += identities(views.iterate(worker_id=worker, num_workers=2))
        # Two workers produce the same batches, in the same order, as one worker.
        flat = [example for batch in loader_order(views, 2, batch_size) for example in batch]
        assert identities(flat) == identities(views.iterate())
    assert sorted(seen) == list(range(count))  # the union is the dataset, each example once


def test_real_dataloader_workers_share_skip_counts_and_order():
    dataset = numbered_dataset(22, corrupt=(5, 17))
    views = MultiCropDataset(dataset, None, batch_size=4, seed=2)
    loader = torch.utils.data.DataLoader(views, batch_size=4, num_workers=2, collate_fn=collate_multicrop)
    batches = list(loader)
    in_process = [collate_multicrop(batch) for batch in loader_order(views, 1, 4)]
    assert [b.shape[0] for b in batches] == [b.shape[0] for b in in_process]
    assert all(torch.equal(a, b) for a, b in zip(batches, in_process))
    assert sorted(int(image[0, 0, 0]) for batch in batches for image in batch) == sorted(
        set(range(22)) - {5, 17}
    )
    assert views.num_skipped == 4  # 2 from the workers + 2 from the in-process pass, seen by the main process


@pytest.mark.parametrize("streaming", [False, True])
def test_set_epoch_reshuffles_deterministically(streaming: bool):
    dataset = numbered_dataset(30, streaming=streaming)
    views = MultiCropDataset(dataset, None, shuffle_buffer_size=8)
    first = identities(views)
    assert identities(views) == first and sorted(first) == list(range(30))
    views.set_epoch(1)
    second = identities(views)
    assert second != first and sorted(second) == list(range(30))
    unshuffled = MultiCropDataset(dataset, None, shuffle=False)
    assert identities(unshuffled) == list(range(30))


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_skips_to_the_same_place_with_the_same_views(streaming: bool):
    dataset = numbered_dataset(26, streaming=streaming, corrupt=(7,))
    augmentation = MultiCropAugmentation(SMALL)
    batch_size = 4

    def run(views: MultiCropDataset, num_workers: int) -> list:
        return [collate_multicrop(batch) for batch in loader_order(views, num_workers, batch_size)]

    uninterrupted = MultiCropDataset(dataset, augmentation, batch_size=batch_size, seed=5)
    uninterrupted.set_epoch(2)
    reference = run(uninterrupted, num_workers=2)
    # A run stopped after 3 batches (12 examples) resumes from its state with another number of workers.
    resumed = MultiCropDataset(dataset, augmentation, batch_size=batch_size, seed=5)
    resumed.load_state_dict({"epoch": 2, "examples_consumed": 3 * batch_size, "seed": 5})
    resumed.set_epoch(2)  # the loop's usual call keeps the position within the same epoch
    remainder = run(resumed, num_workers=3)
    assert len(remainder) == len(reference) - 3
    for expected, actual in zip(reference[3:], remainder):
        assert all(torch.equal(a, b) for a, b in zip(expected, actual))
    resumed.set_epoch(3)
    assert resumed.state_dict() == {"epoch": 3, "examples_consumed": 0, "seed": 5}


def test_state_dict_tracks_the_position_without_workers():
    dataset = numbered_dataset(20)
    views = MultiCropDataset(dataset, None, batch_size=4)
    loader = torch.utils.data.DataLoader(views, batch_size=4, collate_fn=collate_multicrop)
    iterator = iter(loader)
    consumed = [next(iterator) for _ in range(2)]
    state = views.state_dict()
    assert state == {"epoch": 0, "examples_consumed": 8, "seed": 0}
    rest = list(iterator)
    fresh = MultiCropDataset(dataset, None, batch_size=4)
    fresh.load_state_dict(state)
    resumed = list(torch.utils.data.DataLoader(fresh, batch_size=4, collate_fn=collate_multicrop))
    assert all(torch.equal(a, b) for a, b in zip(rest, resumed)) and len(rest) == len(resumed) == 3
    assert len(consumed) == 2 and views.state_dict()["examples_consumed"] == 20


def test_collate_multicrop():
    crops = [torch.zeros(3, 8, 8), torch.ones(3, 4, 4)]
    batch = collate_multicrop([crops, None, crops])
    assert [tuple(t.shape) for t in batch] == [(2, 3, 8, 8), (2, 3, 4, 4)]
    assert collate_multicrop([None, None]) is None
    with pytest.raises(ValueError, match="image_mode"):
        collate_multicrop([crops, [torch.zeros(1, 8, 8), torch.ones(1, 4, 4)]])


def test_invalid_arguments_fail_clearly():
    dataset = numbered_dataset(4)
    with pytest.raises(ValueError, match="rank"):
        MultiCropDataset(dataset, None, rank=2, world_size=2)
    with pytest.raises(ValueError, match="image_mode"):
        MultiCropDataset(dataset, None, image_mode="CMYK")
    with pytest.raises(ValueError, match="unknown built-in"):
        load_image_dataset("hf_dino:mnist")


def test_cpu_benchmark_reports_images_per_second_per_core():
    images = [encode(photo_like(100, 75), "JPEG") for _ in range(2)]
    result = benchmark_cpu_pipeline(images, config=SMALL, seconds=0.2)
    assert result["images_per_second_per_core"] > 0 and result["num_crops"] == 4
    assert result["photometric_on"] == "accelerator" and result["image_size"] == [100, 75]


@pytest.mark.slow
@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_persistent_workers_under_any_start_method_follow_set_epoch(context: str):
    views = MultiCropDataset(numbered_dataset(22, corrupt=(5, 17)), None, batch_size=4)
    loader = torch.utils.data.DataLoader(
        views,
        batch_size=4,
        num_workers=2,
        collate_fn=collate_multicrop,
        multiprocessing_context=context,
        persistent_workers=True,
    )
    orders = []
    for epoch in range(2):
        views.set_epoch(epoch)
        orders.append([int(image[0, 0, 0]) for batch in loader for image in batch])
        assert orders[-1] == identities(views.iterate())  # what one in-process worker yields for this epoch
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1]) == sorted(
        set(range(22)) - {5, 17}
    )
    assert views.num_skipped == 8  # 2 per pass, 4 passes (2 in workers, 2 in process)
