"""Official checkpoints in, stock transformers checkpoints out."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pytest
import torch

from hf_dino.convert import (
    CheckpointFormatError,
    convert_official,
    convert_transformers_vit,
    export_backbone,
    load_center,
    save_dino_model,
)
from hf_dino.modeling_dino import DinoModel
from reference_dino import ReferenceHead, ReferenceViT

OUT_DIM = 48


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.fixture(scope="module")
def reference() -> tuple[ReferenceViT, ReferenceHead]:
    torch.manual_seed(0)
    backbone = ReferenceViT(patch=16, dim=128, depth=2, heads=2, img=224).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head = ReferenceHead(128, OUT_DIM).eval()
    with torch.no_grad():  # a trained last layer's norm is not 1 everywhere
        head.last_layer.weight_g.uniform_(0.5, 1.5)
    return backbone, head


def full_checkpoint(backbone: torch.nn.Module, head: torch.nn.Module) -> dict:
    network = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    network |= {f"head.{k}": v for k, v in head.state_dict().items()}
    student = {f"module.{k}": v + 0.01 for k, v in network.items()}  # DDP-wrapped, and different weights
    return {
        "student": student,
        "teacher": network,
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0)}},
            "param_groups": [{"lr": 0.1, "params": [0]}],
        },
        "epoch": 3,
        "args": argparse.Namespace(
            arch="vit_small", patch_size=16, out_dim=OUT_DIM, norm_last_layer=False, lr=5e-4
        ),
        "dino_loss": {"center": torch.randn(1, OUT_DIM)},
    }


@pytest.mark.parametrize("size", [(224, 224), (96, 96), (160, 96)])
def test_full_checkpoint_parity_with_reference(tmp_path: Path, reference, size) -> None:
    backbone, head = reference
    checkpoint = full_checkpoint(backbone, head)
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    model, center = convert_official(path)
    assert torch.equal(center, checkpoint["dino_loss"]["center"])
    assert model.config.out_dim == OUT_DIM and model.config.norm_last_layer is False
    assert model.config.backbone_config.num_hidden_layers == 2 and model.config.patch_size == 16
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected_tokens, expected_attention = backbone.forward_all(images)
        expected_features = expected_tokens[:, 0]
        features = model(images).pooler_output
        attention = model.last_self_attention(images)
        assert relative_error(features, expected_features) < 1e-5
        assert relative_error(model.head(features), head(expected_features)) < 1e-5
        assert relative_error(attention, expected_attention) < 1e-5


def test_student_key_and_center_saved(tmp_path: Path, reference) -> None:
    backbone, head = reference
    checkpoint = full_checkpoint(backbone, head)
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    student, _ = convert_official(tmp_path / "checkpoint.pth", checkpoint_key="student")
    expected = checkpoint["student"]["module.backbone.cls_token"]
    assert torch.equal(student.backbone.embeddings.cls_token, expected)
    teacher, center = convert_official(tmp_path / "checkpoint.pth")
    save_dino_model(teacher, tmp_path / "out", center)
    assert torch.equal(load_center(tmp_path / "out"), center)
    reloaded = DinoModel.from_pretrained(tmp_path / "out")
    assert torch.equal(reloaded.head.last_layer.weight_g, teacher.head.last_layer.weight_g)


def test_backbone_only_file(tmp_path: Path, reference) -> None:
    backbone, _ = reference
    torch.save(backbone.state_dict(), tmp_path / "dino_deitsmall16_pretrain.pth")
    model, center = convert_official(tmp_path / "dino_deitsmall16_pretrain.pth", out_dim=32)
    assert center is None and model.config.out_dim == 32
    images = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert relative_error(model(images).pooler_output, backbone(images)) < 1e-5


def test_resnet50_matches_torchvision(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50(weights=None).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for module in resnet.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    state = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    torch.save(state, tmp_path / "dino_resnet50_pretrain.pth")
    model, _ = convert_official(tmp_path / "dino_resnet50_pretrain.pth", out_dim=16)
    resnet.fc = torch.nn.Identity()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert relative_error(model(images).pooler_output, resnet(images)) < 1e-5


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path: Path, reference) -> None:
    marker = tmp_path / "pwned"
    backbone, _ = reference
    torch.save({"teacher": backbone.state_dict(), "args": _Exploit(marker)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refusing to load"):
        convert_official(tmp_path / "evil.pth")
    assert not marker.exists()


def test_unknown_layout_names_the_keys(tmp_path: Path) -> None:
    torch.save({"encoder.weird.weight": torch.zeros(2)}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointFormatError, match="encoder.weird.weight"):
        convert_official(tmp_path / "odd.pth")


def test_extra_keys_are_an_error(tmp_path: Path, reference) -> None:
    backbone, _ = reference
    state = dict(backbone.state_dict()) | {"blocks.0.attn.mystery": torch.zeros(1)}
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(CheckpointFormatError, match="mystery"):
        convert_official(tmp_path / "extra.pth")


@pytest.fixture
def tiny_dino() -> DinoModel:
    from hf_dino import DinoConfig

    torch.manual_seed(0)
    config = DinoConfig.from_preset(
        "vit_tiny_patch16",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=224,
        patch_size=16,
        out_dim=64,
        hidden_dim=32,
        bottleneck_dim=16,
    )
    return DinoModel(config).eval()


def test_export_loads_in_stock_vit_without_missing_keys(tmp_path: Path, tiny_dino: DinoModel) -> None:
    from transformers import AutoModel, ViTModel

    export_backbone(tiny_dino, tmp_path / "export")
    vit, info = ViTModel.from_pretrained(
        tmp_path / "export", add_pooling_layer=False, output_loading_info=True
    )
    assert not any(info.values()), info
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = tiny_dino(images).pooler_output
        assert relative_error(vit.eval()(images).last_hidden_state[:, 0], expected) < 1e-5
        auto = AutoModel.from_pretrained(tmp_path / "export")
        assert type(auto).__name__ == "ViTModel"


def test_export_works_in_feature_extraction_pipeline(tmp_path: Path, tiny_dino: DinoModel) -> None:
    from PIL import Image
    from transformers import pipeline

    export_backbone(tiny_dino, tmp_path / "export")
    extractor = pipeline("image-feature-extraction", model=str(tmp_path / "export"), device="cpu")
    image = Image.fromarray((torch.rand(300, 260, 3) * 255).byte().numpy())
    features = torch.tensor(extractor(image))
    assert features.shape[-2:] == (197, 32)  # 224/16 = 14x14 patches + CLS after resize 256 / crop 224


def test_transformers_vit_round_trip(tmp_path: Path, tiny_dino: DinoModel) -> None:
    export_backbone(tiny_dino, tmp_path / "export")
    converted = convert_transformers_vit(str(tmp_path / "export"), out_dim=64)
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(converted(images).pooler_output, tiny_dino(images).pooler_output, atol=1e-6)


def test_cli_convert_and_export(tmp_path: Path, reference) -> None:
    from hf_dino.cli import main

    backbone, head = reference
    torch.save(full_checkpoint(backbone, head), tmp_path / "checkpoint.pth")
    assert main(["convert", str(tmp_path / "checkpoint.pth"), str(tmp_path / "dino")]) == 0
    assert (tmp_path / "dino" / "dino_center.safetensors").is_file()
    assert (tmp_path / "dino" / "preprocessor_config.json").is_file()
    assert main(["export", str(tmp_path / "dino"), str(tmp_path / "stock")]) == 0
    assert (tmp_path / "stock" / "config.json").is_file()
