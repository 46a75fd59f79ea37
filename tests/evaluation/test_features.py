"""Frozen features: transforms, feature layouts, extraction over a dataset, the on-disk cache, model loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hf_dino.evaluation.features import (
    EvaluationTransform,
    FeatureCache,
    FeatureExtractor,
    detect_image_column,
    extract_features,
    load_evaluation_model,
    to_model_image,
)


def test_evaluation_transform_is_resize_then_centre_crop() -> None:
    image = Image.fromarray(
        np.random.default_rng(0).integers(0, 256, size=(30, 40), dtype=np.uint8), mode="L"
    )
    tensor = EvaluationTransform(resize_size=32, crop_size=28, num_channels=1).build()(image)
    # By hand: shorter side 30 -> 32 (bicubic), so 40 -> 42 (torchvision truncates); crop 28 in the middle.
    resized = np.asarray(image.resize((42, 32), Image.BICUBIC), dtype=np.float32) / 255.0
    top, left = round((32 - 28) / 2), round((42 - 28) / 2)
    expected = (resized[top : top + 28, left : left + 28] - 0.5) / 0.5
    assert tensor.shape == (1, 28, 28)
    np.testing.assert_allclose(tensor[0].numpy(), expected, atol=1e-6)


def test_evaluation_transform_defaults_and_native_size() -> None:
    transform = EvaluationTransform()
    assert (transform.resize_size, transform.crop_size) == (256, 224)
    assert transform.mean == (0.485, 0.456, 0.406)
    image = Image.new("RGB", (28, 28), (255, 0, 0))
    tensor = EvaluationTransform(resize_size=None, crop_size=28).build()(image)
    assert tensor.shape == (3, 28, 28)
    assert tensor[0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)
    with pytest.raises(ValueError, match="need 3 values"):
        EvaluationTransform(mean=(0.5,))


def test_to_model_image_converts_modes() -> None:
    sixteen_bit = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert np.asarray(to_model_image(sixteen_bit, 1)).max() == 255
    half = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert np.asarray(to_model_image(half, 1))[0, 0] == 128
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    assert to_model_image(rgba, 3).mode == "RGB" and to_model_image(rgba, 1).mode == "L"
    assert to_model_image(np.zeros((4, 4, 3), dtype=np.uint8), 3).size == (4, 4)
    with pytest.raises(ValueError, match="1- or 3-channel"):
        to_model_image(rgba, 4)


def test_detect_image_column(toy_dataset_dict) -> None:
    import datasets

    assert detect_image_column(toy_dataset_dict["train"]) == "image"
    renamed = toy_dataset_dict["train"].rename_column("image", "photo_of_it")
    assert detect_image_column(renamed) == "photo_of_it"  # found by its Image feature
    plain = datasets.Dataset.from_dict({"text": ["a"], "label": [0]})
    with pytest.raises(ValueError, match="--image-column"):
        detect_image_column(plain)


def test_dino_feature_layouts(tiny_dino_model) -> None:
    pixel_values = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        cls = tiny_dino_model.forward_features(pixel_values)
        blocks = tiny_dino_model.get_intermediate_layers(pixel_values, n=2)
    torch.testing.assert_close(FeatureExtractor(tiny_dino_model)(pixel_values), cls)
    torch.testing.assert_close(
        FeatureExtractor(tiny_dino_model, n_last_blocks=2)(pixel_values),
        torch.cat([blocks[0][:, 0], blocks[1][:, 0]], dim=1),
    )
    # CLS + average patch token, interleaved as the official linear evaluation lays them out.
    with_average = FeatureExtractor(tiny_dino_model, avgpool_patch_tokens=True)(pixel_values)
    average = blocks[1][:, 1:].mean(dim=1)
    assert with_average.shape == (3, 64)
    torch.testing.assert_close(with_average[:, 0::2], blocks[1][:, 0])
    torch.testing.assert_close(with_average[:, 1::2], average)
    # The final-norm CLS of the last block is the feature itself.
    torch.testing.assert_close(blocks[1][:, 0], cls)


def test_transformers_vit_feature_layouts(tiny_vit_model) -> None:
    pixel_values = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        output = tiny_vit_model(pixel_values, output_hidden_states=True)
        expected_last = output.last_hidden_state[:, 0]
        expected_two = torch.cat(
            [
                tiny_vit_model.layernorm(output.hidden_states[-2])[:, 0],
                tiny_vit_model.layernorm(output.hidden_states[-1])[:, 0],
            ],
            dim=1,
        )
    torch.testing.assert_close(FeatureExtractor(tiny_vit_model)(pixel_values), expected_last)
    torch.testing.assert_close(FeatureExtractor(tiny_vit_model, n_last_blocks=2)(pixel_values), expected_two)


def test_raw_pixels_are_flattened() -> None:
    pixel_values = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(FeatureExtractor(None)(pixel_values), pixel_values.flatten(1))
    with pytest.raises(ValueError, match="raw pixels"):
        FeatureExtractor(None, n_last_blocks=2)


def test_extract_features_matches_per_image_forward_and_caches(
    tiny_dino_model, toy_dataset_dict, tmp_path
) -> None:
    dataset = toy_dataset_dict["test"]
    transform = EvaluationTransform(resize_size=None, crop_size=28, num_channels=1)
    cache = FeatureCache(tmp_path)
    identity = {"model": {"path": "tiny"}, "dataset": {"id": "toy", "split": "test"}}
    extracted = extract_features(
        tiny_dino_model,
        dataset,
        label_column="label",
        transform=transform,
        batch_size=5,
        cache=cache,
        cache_identity=identity,
    )
    assert extracted.features.shape == (12, 32) and not extracted.from_cache
    assert extracted.labels.tolist() == dataset["label"][:]
    build = transform.build()
    with torch.no_grad():
        for index in (0, 7, 11):
            single = tiny_dino_model.forward_features(build(dataset[index]["image"]).unsqueeze(0))
            torch.testing.assert_close(extracted.features[index : index + 1], single, rtol=1e-5, atol=1e-5)

    again = extract_features(
        tiny_dino_model,
        dataset,
        label_column="label",
        transform=transform,
        normalize=True,
        cache=cache,
        cache_identity=identity,
    )
    assert again.from_cache
    torch.testing.assert_close(again.features, torch.nn.functional.normalize(extracted.features, dim=1))
    torch.testing.assert_close(again.features.norm(dim=1), torch.ones(12))
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 1

    # Anything that changes the features changes the key: a different crop is computed afresh.
    other = extract_features(
        tiny_dino_model,
        dataset,
        label_column="label",
        cache=cache,
        cache_identity=identity,
        transform=EvaluationTransform(resize_size=32, crop_size=28, num_channels=1),
    )
    assert not other.from_cache and len(list(tmp_path.glob("features-*.safetensors"))) == 2


def test_corrupt_cache_entry_is_recomputed(tiny_dino_model, toy_dataset_dict, tmp_path) -> None:
    cache = FeatureCache(tmp_path)
    options = {
        "label_column": "label",
        "transform": EvaluationTransform(resize_size=None, crop_size=28, num_channels=1),
        "cache": cache,
        "cache_identity": {"model": "tiny", "dataset": "toy"},
    }
    first = extract_features(tiny_dino_model, toy_dataset_dict["test"], **options)
    (entry,) = tmp_path.glob("features-*.safetensors")
    entry.write_bytes(b"not safetensors")
    second = extract_features(tiny_dino_model, toy_dataset_dict["test"], **options)
    assert not second.from_cache
    torch.testing.assert_close(first.features, second.features)


def test_load_evaluation_model(tiny_dino_model, tiny_dino_dir, tmp_path) -> None:
    model, identity = load_evaluation_model(tiny_dino_dir)
    assert identity["path"] == str(tiny_dino_dir.resolve()) and len(identity["weights_sha256"]) == 64
    pixel_values = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(
            model.forward_features(pixel_values), tiny_dino_model.forward_features(pixel_values)
        )

    # A training output folder: its teacher/ is evaluated.
    output_dir = tmp_path / "run"
    tiny_dino_model.save_pretrained(output_dir / "teacher")
    _, identity = load_evaluation_model(output_dir)
    assert identity["path"].endswith("teacher")

    random_model, identity = load_evaluation_model(tiny_dino_dir, random_init=True, seed=3)
    assert identity["random_init"] and "weights_sha256" not in identity
    with torch.no_grad():
        assert not torch.allclose(
            random_model.forward_features(pixel_values), model.forward_features(pixel_values)
        )


def test_extraction_leaves_a_training_model_in_training_mode(tiny_dino_model) -> None:
    from hf_dino import DinoConfig, DinoModel

    config = DinoConfig.from_dict(tiny_dino_model.config.to_dict())
    config.drop_path_rate = 0.5
    model = DinoModel(config).train()
    pixel_values = torch.randn(4, 1, 28, 28)
    first, second = FeatureExtractor(model)(pixel_values), FeatureExtractor(model)(pixel_values)
    torch.testing.assert_close(first, second)  # drop path is off while extracting
    assert model.training and all(parameter.requires_grad for parameter in model.parameters())


def test_resnet_features_are_the_pooled_vector() -> None:
    from hf_dino import DinoConfig, DinoModel

    config = DinoConfig.from_preset(
        "resnet50", hidden_sizes=[8, 8, 8, 16], embedding_size=8, depths=[1, 1, 1, 1], out_dim=16, hidden_dim=16,
        bottleneck_dim=8,
    )  # fmt: skip
    model = DinoModel(config).eval()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values).pooler_output
    torch.testing.assert_close(FeatureExtractor(model)(pixel_values), expected)
    with torch.no_grad():
        torch.testing.assert_close(
            FeatureExtractor(model.backbone)(pixel_values), expected
        )  # transformers ResNetModel
    with pytest.raises(ValueError, match="ViT"):
        FeatureExtractor(model, avgpool_patch_tokens=True)(pixel_values)
