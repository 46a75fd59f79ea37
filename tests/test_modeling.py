"""DinoConfig / DinoModel: shapes, round trips, Auto classes, remote code, attention, interpolation, errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel

import hf_dino
from hf_dino import DinoConfig, DinoModel
from reference_dino import ReferenceViT


def tiny_config(**overrides) -> DinoConfig:
    settings = dict(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        out_dim=64,
        hidden_dim=32,
        bottleneck_dim=16,
    )
    settings.update(overrides)
    return DinoConfig.from_preset("vit_tiny_patch16", **settings)


@pytest.fixture
def model() -> DinoModel:
    torch.manual_seed(0)
    return DinoModel(tiny_config()).eval()


def test_presets_and_unknown_preset() -> None:
    small = DinoConfig.from_preset("vit_small_patch8")
    assert (small.embed_dim, small.patch_size, small.backbone_config.num_attention_heads) == (384, 8, 6)
    assert small.backbone_config.layer_norm_eps == 1e-6 and small.out_dim == 65536
    assert DinoConfig.from_preset("vit_base_patch16").embed_dim == 768
    assert DinoConfig.from_preset("resnet50").embed_dim == 2048
    assert DinoConfig.from_preset("resnet18").embed_dim == 512
    with pytest.raises(ValueError, match="vit_small_patch16"):
        DinoConfig.from_preset("vit_huge_patch14")
    with pytest.raises(ValueError, match="not_a_field"):
        DinoConfig.from_preset("vit_small_patch16", not_a_field=3)


def test_output_shapes(model: DinoModel) -> None:
    images = torch.randn(2, 3, 32, 32)
    output = model(images, output_attentions=True, output_hidden_states=True)
    assert output.last_hidden_state.shape == (2, 17, 32)
    assert output.pooler_output.shape == (2, 32)
    assert len(output.hidden_states) == 4
    assert output.attentions[-1].shape == (2, 2, 17, 17)
    assert torch.allclose(output.attentions[-1].sum(-1), torch.ones(2, 2, 17))
    assert model.head(output.pooler_output).shape == (2, 64)
    assert torch.equal(output.pooler_output, output.last_hidden_state[:, 0])
    assert torch.allclose(model.forward_features(images), output.pooler_output)


def test_save_load_round_trip_is_bit_exact(tmp_path: Path, model: DinoModel) -> None:
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    reloaded = DinoModel.from_pretrained(tmp_path).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(reloaded.forward_with_head(images), model.forward_with_head(images))
    # norm_last_layer survives the round trip: the norm stays out of the trainable parameters
    assert "head.last_layer.weight_g" not in dict(reloaded.named_parameters())
    assert "head.last_layer.weight_g" in reloaded.state_dict()


def test_auto_classes_in_process(tmp_path: Path, model: DinoModel) -> None:
    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), DinoConfig)
    auto = AutoModel.from_pretrained(tmp_path)
    assert isinstance(auto, DinoModel)
    assert isinstance(AutoModel.from_config(tiny_config()), DinoModel)


def test_remote_code_without_hf_dino(tmp_path: Path, model: DinoModel) -> None:
    model.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "modeling_dino.py").is_file()
    images = torch.randn(2, 3, 32, 32)
    torch.save(images, tmp_path / "images.pt")
    with torch.no_grad():
        torch.save(model.forward_with_head(images), tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        class BlockHfDino:
            def find_spec(self, name, path=None, target=None):
                if name == "hf_dino" or name.startswith("hf_dino."):
                    raise ModuleNotFoundError("hf_dino is blocked in this test")
        sys.meta_path.insert(0, BlockHfDino())
        try:
            import hf_dino
            raise SystemExit("hf_dino should not be importable here")
        except ModuleNotFoundError:
            pass
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        assert "hf_dino" not in type(model).__module__, type(model).__module__
        images = torch.load({str(tmp_path / "images.pt")!r})
        with torch.no_grad():
            out = model.forward_with_head(images)
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        assert torch.equal(out, expected), (out - expected).abs().max()
        print("REMOTE_OK", type(model).__module__)
        """
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert "REMOTE_OK" in result.stdout, result.stdout + result.stderr


def manual_last_attention(model: DinoModel, images: torch.Tensor) -> torch.Tensor:
    """The last block's attention recomputed by hand from its input hidden state."""
    hidden = model(images, output_hidden_states=True).hidden_states[-2]
    layer = model.backbone.layers[-1]
    x = layer.layernorm_before(hidden)
    heads, width = model.config.backbone_config.num_attention_heads, x.shape[-1]
    q = layer.attention.q_proj(x).unflatten(-1, (heads, width // heads)).transpose(1, 2)
    k = layer.attention.k_proj(x).unflatten(-1, (heads, width // heads)).transpose(1, 2)
    return torch.softmax(q @ k.transpose(-1, -2) / (width // heads) ** 0.5, dim=-1)


def test_default_attention_equals_eager(tmp_path: Path, model: DinoModel) -> None:
    assert model.config._attn_implementation == "sdpa"
    images = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        default = model(images, output_attentions=True)
        assert len(default.attentions) == 1  # only the last layer is paid for
        model.save_pretrained(tmp_path)
        eager_model = DinoModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
        eager = eager_model(images, output_attentions=True)
        assert len(eager.attentions) == 3
        torch.testing.assert_close(default.attentions[-1], eager.attentions[-1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(default.pooler_output, eager.pooler_output, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            default.attentions[-1], manual_last_attention(model, images), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(model.last_self_attention(images), default.attentions[-1])


@pytest.mark.parametrize("size", [(224, 224), (96, 96), (64, 160), (120, 72), (224, 230)])
def test_interpolation_matches_reference(size) -> None:
    """Positional interpolation as the original: bicubic with scale_factor and +0.1 (at 96 px, non-square)."""
    torch.manual_seed(0)
    reference = ReferenceViT(patch=16, dim=64, depth=1, heads=1, img=224).eval()
    config = DinoConfig.from_preset(
        "vit_tiny_patch16",
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=256,
        out_dim=16,
        hidden_dim=16,
        bottleneck_dim=8,
    )
    model = DinoModel(config).eval()
    q, k, v = reference.blocks[0].attn.qkv.weight.chunk(3)
    qb, kb, vb = reference.blocks[0].attn.qkv.bias.chunk(3)
    block = reference.blocks[0]
    state = {
        "embeddings.cls_token": reference.cls_token,
        "embeddings.position_embeddings": reference.pos_embed,
        "embeddings.patch_embeddings.projection.weight": reference.patch_embed.proj.weight,
        "embeddings.patch_embeddings.projection.bias": reference.patch_embed.proj.bias,
        "layers.0.attention.q_proj.weight": q,
        "layers.0.attention.k_proj.weight": k,
        "layers.0.attention.v_proj.weight": v,
        "layers.0.attention.q_proj.bias": qb,
        "layers.0.attention.k_proj.bias": kb,
        "layers.0.attention.v_proj.bias": vb,
        "layers.0.attention.o_proj.weight": block.attn.proj.weight,
        "layers.0.attention.o_proj.bias": block.attn.proj.bias,
        "layers.0.layernorm_before.weight": block.norm1.weight,
        "layers.0.layernorm_before.bias": block.norm1.bias,
        "layers.0.layernorm_after.weight": block.norm2.weight,
        "layers.0.layernorm_after.bias": block.norm2.bias,
        "layers.0.mlp.fc1.weight": block.mlp.fc1.weight,
        "layers.0.mlp.fc1.bias": block.mlp.fc1.bias,
        "layers.0.mlp.fc2.weight": block.mlp.fc2.weight,
        "layers.0.mlp.fc2.bias": block.mlp.fc2.bias,
        "layernorm.weight": reference.norm.weight,
        "layernorm.bias": reference.norm.bias,
    }
    model.backbone.load_state_dict(state)
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        tokens, attention = reference.forward_all(images)
        out = model(images, output_attentions=True)
    torch.testing.assert_close(out.last_hidden_state, tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.attentions[-1], attention, rtol=1e-5, atol=1e-6)
    assert out.last_hidden_state.shape[1] == 1 + (size[0] // 16) * (size[1] // 16)


def test_intermediate_layers(model: DinoModel) -> None:
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        layers = model.get_intermediate_layers(images, n=2)
        hidden = model(images, output_hidden_states=True).hidden_states
    assert len(layers) == 2
    torch.testing.assert_close(layers[-1], model.backbone.layernorm(hidden[-1]))
    torch.testing.assert_close(layers[0], model.backbone.layernorm(hidden[-2]))
    with pytest.raises(ValueError):
        model.get_intermediate_layers(images, n=4)


def test_drop_path_only_in_training() -> None:
    torch.manual_seed(0)
    model = DinoModel(tiny_config(drop_path_rate=0.5))
    images = torch.randn(8, 3, 32, 32)
    model.eval()
    assert torch.equal(model.forward_features(images), model.forward_features(images))
    model.train()
    assert not torch.equal(model.forward_features(images), model.forward_features(images))
    assert model.backbone.drop_path_rates == pytest.approx([0.0, 0.25, 0.5])


def test_gradient_checkpointing_same_gradients() -> None:
    torch.manual_seed(0)
    model = DinoModel(tiny_config()).train()
    images = torch.randn(2, 3, 32, 32)
    model.forward_with_head(images).square().mean().backward()
    plain = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model.forward_with_head(images).square().mean().backward()
    checkpointed = [p.grad for p in model.parameters() if p.grad is not None]
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)


def test_recomputing_functions_pass_gradcheck() -> None:
    from hf_dino.modeling_dino import GeluThenLinear, NormThenLinear

    generator = torch.Generator().manual_seed(0)

    def leaf(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)

    assert torch.autograd.gradcheck(GeluThenLinear.apply, (leaf(3, 5, 8), leaf(4, 8), leaf(4)))
    norm_inputs = (leaf(3, 5, 8), leaf(8), leaf(8), 1e-6, leaf(4, 8), leaf(4))
    assert torch.autograd.gradcheck(NormThenLinear.apply, norm_inputs)
    hidden, norm_weight, norm_bias, eps, weight, bias = norm_inputs
    expected = torch.nn.functional.linear(
        torch.nn.functional.layer_norm(hidden, (8,), norm_weight, norm_bias, eps), weight, bias
    )
    torch.testing.assert_close(NormThenLinear.apply(*norm_inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("switch", ["recompute_gelu", "recompute_norms"])
def test_recomputed_activations_give_the_plain_gradients(switch: str) -> None:
    # The GELU (GeluThenLinear) and the layer norms' outputs (NormThenLinear) recomputed in the backward instead of
    # kept: the same outputs and gradients, in float32 and under bfloat16 autocast, with the gradients in float32.
    torch.manual_seed(0)
    model = DinoModel(tiny_config()).train()
    images = torch.randn(4, 3, 32, 32)
    for autocast in (
        False,
        True,
    ):  # float32, then bfloat16 autocast (half-precision products, float32 weights)
        results = []
        for recompute in (True, False):
            for block in model.backbone.layers:
                setattr(block, switch, recompute)
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                output = model.forward_with_head(images)
            output.float().square().mean().backward()
            gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
            results.append((output.detach(), gradients))
        (output, gradients), (plain_output, plain_gradients) = results
        assert output.dtype == plain_output.dtype
        torch.testing.assert_close(output, plain_output, rtol=0, atol=0)
        assert gradients.keys() == plain_gradients.keys()
        for name, value in plain_gradients.items():
            assert gradients[name].dtype == value.dtype == torch.float32
            torch.testing.assert_close(gradients[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_multicrop_forward_groups_resolutions(model: DinoModel) -> None:
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
    with torch.no_grad():
        together = model.forward_with_head(crops)
        separate = torch.cat([model.head(model.forward_features(crop)) for crop in crops])
    assert together.shape == (6, 64)
    torch.testing.assert_close(together, separate, rtol=1e-5, atol=1e-6)


def _multicrop_gradients(model: DinoModel, crops: list[torch.Tensor], pack: bool) -> dict[str, torch.Tensor]:
    model.zero_grad()
    output = model.forward_with_head(crops, pack=pack)
    output.square().mean().backward()
    return {
        "output": output.detach(),
        **{n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
    }


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_multicrop_forward_computes_the_same_function(checkpointing: bool) -> None:
    torch.manual_seed(0)
    model = DinoModel(tiny_config()).train()  # drop path 0: both layouts compute the same
    if checkpointing:
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        assert model.backbone.gradient_checkpointing
    crops = [torch.randn(3, 3, 32, 32) for _ in range(2)] + [torch.randn(3, 3, 16, 16) for _ in range(4)]
    crops.append(torch.randn(3, 3, 24, 16))  # a third resolution, not square
    separate = _multicrop_gradients(model, crops, pack=False)
    packed = _multicrop_gradients(model, crops, pack=True)
    assert separate.keys() == packed.keys()
    scale = max(value.abs().max().item() for name, value in separate.items() if name != "output")
    for name, value in separate.items():
        # The key bias's true gradient is 0 (softmax ignores a constant per query): compare at the scale of the
        # largest gradient there.
        torch.testing.assert_close(packed[name], value, rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_packed_drop_path_keeps_or_drops_whole_crops() -> None:
    from hf_dino.modeling_dino import packed_drop_path

    torch.manual_seed(0)
    segments = ((300, 5), (500, 2))
    hidden = torch.ones(300 * 5 + 500 * 2, 4)
    assert packed_drop_path(hidden, 0.3, training=False, segments=segments) is hidden
    dropped = packed_drop_path(hidden, 0.3, training=True, segments=segments)
    first, second = dropped[:1500].view(300, 5, 4), dropped[1500:].view(500, 2, 4)
    for group in (first, second):
        per_crop = group[:, 0, 0]
        assert torch.equal(group, per_crop.view(-1, 1, 1).expand_as(group))  # one draw per crop
        assert per_crop.unique().tolist() == pytest.approx([0.0, 1 / 0.7])
    kept = torch.cat([first[:, 0, 0], second[:, 0, 0]]).ne(0).float().mean().item()
    assert kept == pytest.approx(0.7, abs=0.05)  # 800 crops: 3.5 standard deviations


def test_packed_forward_needs_a_vit() -> None:
    config = DinoConfig.from_preset(
        "resnet18", hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], embedding_size=8, out_dim=16,
        hidden_dim=16, bottleneck_dim=8,
    )  # fmt: skip
    model = DinoModel(config).eval()
    crops = [torch.randn(1, 3, 64, 64), torch.randn(1, 3, 32, 32)]
    assert model.forward_with_head(crops[:1], pack=True).shape == (1, 16)  # one resolution: nothing to pack
    with pytest.raises(ValueError, match="needs a ViT"):
        model.forward_with_head(crops, pack=True)


def test_head_variants() -> None:
    for layers in (1, 2, 3):
        config = tiny_config(head_layers=layers, use_bn_in_head=True, norm_last_layer=False)
        model = DinoModel(config).eval()
        assert model.head(torch.randn(3, 32)).shape == (3, 64)
        assert "head.last_layer.weight_g" in dict(model.named_parameters())


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_presets_match_torchvision_sizes(name: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    reference = getattr(torchvision.models, name)(weights=None)
    expected = sum(p.numel() for n, p in reference.named_parameters() if not n.startswith("fc."))
    backbone = DinoModel(DinoConfig.from_preset(name, out_dim=16)).backbone
    assert sum(p.numel() for p in backbone.parameters()) == expected


def test_resnet_backbone() -> None:
    config = DinoConfig.from_preset(
        "resnet50",
        hidden_sizes=[16, 32, 48, 64],
        depths=[1, 1, 1, 1],
        embedding_size=8,
        out_dim=32,
        hidden_dim=32,
        bottleneck_dim=8,
    )
    model = DinoModel(config).eval()
    output = model(torch.randn(2, 3, 64, 64))
    assert output.pooler_output.shape == (2, 64)
    assert model.forward_with_head(torch.randn(2, 3, 64, 64)).shape == (2, 32)
    with pytest.raises(ValueError, match="attention"):
        model(torch.randn(1, 3, 64, 64), output_attentions=True)


def test_bad_inputs_raise_clear_errors(model: DinoModel) -> None:
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="smaller than one 8-pixel patch"):
        model(torch.randn(1, 3, 4, 32))
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(3, 32, 32))


def test_registration() -> None:
    assert hf_dino.DinoModel is DinoModel
    assert isinstance(AutoConfig.for_model("dino"), DinoConfig)


def test_patch_projection_is_the_convolution_as_one_matrix_product(model: DinoModel) -> None:
    # Sizes that are not whole patches (the convolution drops the remainder), values and weight gradients.
    backbone = model.backbone
    projection = backbone.embeddings.patch_embeddings.projection
    pixels = torch.randn(2, 3, 35, 42, generator=torch.Generator().manual_seed(0))
    patches, height_patches, width_patches = backbone.patchify(pixels)
    expected = projection(pixels)
    assert (height_patches, width_patches) == tuple(expected.shape[-2:]) == (4, 5)
    torch.testing.assert_close(patches, expected.flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(patches)
    (gradient,) = torch.autograd.grad((patches * upstream).sum(), projection.weight)
    (expected_gradient,) = torch.autograd.grad(
        (expected.flatten(2).transpose(1, 2) * upstream).sum(), projection.weight
    )
    torch.testing.assert_close(gradient, expected_gradient, atol=1e-4, rtol=1e-5)
