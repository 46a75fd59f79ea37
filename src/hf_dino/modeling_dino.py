"""DinoModel: a ViT (or ResNet) backbone and the DINO projection head, as a transformers `PreTrainedModel`.

The ViT reuses transformers' own modules (`ViTEmbeddings`; `ViTLayer`, subclassed as `DinoBlock`), so its
weights carry transformers' names and export to a stock `ViTModel` unchanged. The forward pass is written here
because DINO needs three things transformers' ViT does not do: stochastic depth, the original positional-embedding
interpolation (bicubic with `scale_factor` and a +0.1 offset, dino#8) and the last layer's attention
probabilities without running every layer in eager attention.

This file is copied next to saved checkpoints (remote code), so it imports nothing from hf_dino but its config.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel, ResNetModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.models.vit.modeling_vit import ViTEmbeddings, ViTLayer
from transformers.utils import ModelOutput

from .configuration_dino import DinoConfig


@dataclass
class DinoModelOutput(ModelOutput):
    r"""Output of [`DinoModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch, 1 + num_patches, hidden_size)`):
            ViT: every token after the final norm (CLS first). ResNet: the last feature map
            `(batch, channels, height, width)`.
        pooler_output (`torch.FloatTensor` of shape `(batch, embed_dim)`):
            The features DINO trains and evaluates: the final-norm CLS token (ViT) or the average-pooled last
            feature map (ResNet). Feed them to `model.head` for the projection-head output.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            With `output_hidden_states=True`: the embeddings and the output of every block, before the final norm.
        attentions (`tuple(torch.FloatTensor)`, *optional*):
            With `output_attentions=True`: attention probabilities of shape `(batch, heads, tokens, tokens)`.
            Under the default (sdpa) attention only the last layer's is computed, so the tuple holds one tensor;
            with `attn_implementation="eager"` it holds every layer's. `attentions[-1]` is always the last layer.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def drop_path(hidden_states: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample, rescaling the kept ones (official DropPath)."""
    if drop_prob == 0.0 or not training:
        return hidden_states
    keep_prob = 1.0 - drop_prob
    shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
    keep = torch.floor(keep_prob + torch.rand(shape, dtype=hidden_states.dtype, device=hidden_states.device))
    return hidden_states.div(keep_prob) * keep


def packed_drop_path(
    hidden_states: torch.Tensor, drop_prob: float, training: bool, segments: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """`drop_path` on packed sequences `(sum B_i * T_i, D)`: one keep-or-drop draw per sequence (per crop), as
    in the unpacked layout, spread over the sequence's tokens."""
    if drop_prob == 0.0 or not training:
        return hidden_states
    keep_prob = 1.0 - drop_prob
    dtype, device = hidden_states.dtype, hidden_states.device
    keep = torch.cat(
        [
            torch.floor(keep_prob + torch.rand((batch, 1, 1), dtype=dtype, device=device))
            .expand(batch, tokens, 1)
            .reshape(batch * tokens, 1)
            for batch, tokens in segments
        ]
    )
    return hidden_states.div(keep_prob) * keep


class GeluThenLinear(torch.autograd.Function):
    """`linear(gelu(hidden), weight, bias)` that keeps only `hidden` for the backward and recomputes the GELU.

    The plain composition keeps both the MLP's hidden activations and their GELU (each 4x the width per token)
    until the backward; recomputing the GELU there is one elementwise pass and drops a fifth of a ViT block's
    activation memory. Same operations, same dtypes as the plain path: under autocast `hidden` arrives in the
    autocast dtype and the weight is cast to it, as `F.linear` would; the gradients of the weight and bias come
    back in their own dtype.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        compute_weight = weight.to(hidden.dtype)
        compute_bias = bias.to(hidden.dtype) if bias is not None else None
        ctx.save_for_backward(hidden, compute_weight)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return F.linear(F.gelu(hidden), compute_weight, compute_bias)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        hidden, compute_weight = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        grad_output = grad_output.to(hidden.dtype)
        activated = F.gelu(hidden)
        grad_hidden = torch.ops.aten.gelu_backward(grad_output @ compute_weight, hidden)
        flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
        grad_weight = (flat_grad.t() @ activated.reshape(-1, activated.shape[-1])).to(weight_dtype)
        grad_bias = flat_grad.sum(0).to(bias_dtype) if bias_dtype is not None else None
        return grad_hidden, grad_weight, grad_bias


class NormThenLinear(torch.autograd.Function):
    """`linear(layer_norm(hidden), weight, bias)` that keeps only `hidden` and its per-token statistics for the
    backward and recomputes the normalised tokens there.

    The plain composition keeps the layer norm's input for its own backward and, for the linear layer's, the
    normalised tokens (under autocast their half-precision copy): recomputing them is one elementwise pass and
    drops a seventh of a ViT block's activation memory. Same operations, same dtypes as the plain path: the
    norm in the input's dtype (float32 under autocast, which keeps layer norms in float32), the product in the
    autocast dtype when autocast is on; the gradients come back in their parameters' dtypes.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        norm_weight: torch.Tensor,
        norm_bias: torch.Tensor,
        eps: float,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        normed, _, _ = torch.native_layer_norm(hidden, hidden.shape[-1:], norm_weight, norm_bias, eps)
        device_type = hidden.device.type
        autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
        dtype = torch.get_autocast_dtype(device_type) if autocast else normed.dtype
        compute_weight = weight.to(dtype)
        compute_bias = bias.to(dtype) if bias is not None else None
        ctx.save_for_backward(hidden, norm_weight, norm_bias, compute_weight)
        ctx.eps = eps
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        # The operands are in the product's dtype already; autocast must not cast them again.
        with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
            return F.linear(normed.to(dtype), compute_weight, compute_bias)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        hidden, norm_weight, norm_bias, compute_weight = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        grad_output = grad_output.to(compute_weight.dtype)
        # The normalised tokens and their statistics again, by the same kernel as in the forward.
        normed, mean, rstd = torch.native_layer_norm(
            hidden, hidden.shape[-1:], norm_weight, norm_bias, ctx.eps
        )
        normed = normed.to(compute_weight.dtype)
        flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
        grad_weight = (flat_grad.t() @ normed.reshape(-1, normed.shape[-1])).to(weight_dtype)
        grad_bias = flat_grad.sum(0).to(bias_dtype) if bias_dtype is not None else None
        grad_normed = (grad_output @ compute_weight).to(hidden.dtype)
        grad_hidden, grad_norm_weight, grad_norm_bias = torch.ops.aten.native_layer_norm_backward(
            grad_normed, hidden, hidden.shape[-1:], mean, rstd, norm_weight, norm_bias, [True, True, True]
        )
        return grad_hidden, grad_norm_weight, grad_norm_bias, None, grad_weight, grad_bias


class DinoBlock(ViTLayer):
    """One pre-norm transformer block: transformers' `ViTLayer` (same parameter names), DINO's forward.

    The forward adds stochastic depth on both residual branches and materialises the attention probabilities
    only when asked for. Being the block's own `forward`, it is what FSDP wraps and gathers as one unit.

    Args:
        config: the `ViTConfig`.
        drop_path_rate: this block's stochastic-depth rate.
    """

    def __init__(self, config, drop_path_rate: float = 0.0) -> None:
        super().__init__(config)
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.activation = ACT2FN[config.hidden_act]
        self.exact_gelu = config.hidden_act == "gelu"
        self.drop_path_rate = drop_path_rate
        self.set_recomputation(True)

    def set_recomputation(self, enabled: bool) -> None:
        """Recompute the exact GELU's output (`GeluThenLinear`) and the layer norms' outputs (`NormThenLinear`)
        in the backward instead of keeping them for it: less activation memory for one more elementwise pass."""
        self.recompute_gelu = enabled and self.exact_gelu
        self.recompute_norms = enabled

    def qkv_parameters(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The q, k and v projections as one `(3D, D)` weight and `(3D,)` bias.

        One projection (the original's fused qkv layer) from the three weights: one matrix product, and under
        autocast one half-precision copy of the input kept for the backward, not three."""
        module = self.attention
        projections = (module.q_proj, module.k_proj, module.v_proj)
        weight = torch.cat([projection.weight for projection in projections])
        bias = None
        if module.q_proj.bias is not None:
            bias = torch.cat([projection.bias for projection in projections])
        return weight, bias

    def normed_linear(
        self, norm: nn.LayerNorm, hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """`linear(norm(hidden_states))`; when gradients are recorded, the normalised tokens are recomputed in the
        backward instead of kept (`NormThenLinear`).

        Not under `torch.compile`: its partitioner chooses what to recompute from the plain composition itself,
        and torch 2.11's dynamo broke the graph at this Function under CUDA autocast (31 graphs and recompiles
        for the ViT-S step, 644 instead of 1,520 images/s on an H100)."""
        if self.recompute_norms and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return NormThenLinear.apply(hidden_states, norm.weight, norm.bias, norm.eps, weight, bias)
        return F.linear(norm(hidden_states), weight, bias)

    def self_attention(
        self, qkv: torch.Tensor, return_probabilities: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Multi-head self-attention on `(B, T, 3D)` projections; probabilities only materialised when asked for."""
        batch, tokens, _ = qkv.shape
        module = self.attention
        qkv = qkv.view(batch, tokens, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, head_dim)
        probabilities = None
        if return_probabilities:
            scores = (query @ key.transpose(-2, -1)) * self.head_dim**-0.5
            probabilities = scores.softmax(dim=-1)
            context = probabilities @ value
        else:
            context = F.scaled_dot_product_attention(query, key, value)
        context = context.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
        return module.o_proj(context), probabilities

    def packed_self_attention(self, qkv: torch.Tensor, segments: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Self-attention within each sequence of packed `(sum B_i * T_i, 3D)` projections.

        Each segment (B_i sequences of T_i tokens) attends on a view of the projections, and goes through the
        output projection on its own, so that nothing but the projected result is copied (the projection keeps
        the attention's own output for the backward)."""
        module = self.attention
        outputs, start = [], 0
        for batch, tokens in segments:
            segment = qkv[start : start + batch * tokens].view(
                batch, tokens, 3, self.num_heads, self.head_dim
            )
            query, key, value = segment.permute(2, 0, 3, 1, 4).unbind(0)
            context = F.scaled_dot_product_attention(query, key, value).transpose(1, 2)
            outputs.append(module.o_proj(context.reshape(batch * tokens, -1)))
            start += batch * tokens
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]

    def drop_path(self, branch: torch.Tensor, segments: Sequence[tuple[int, int]] | None) -> torch.Tensor:
        """This block's stochastic depth on a residual branch, packed or not."""
        if segments is None:
            return drop_path(branch, self.drop_path_rate, self.training)
        return packed_drop_path(branch, self.drop_path_rate, self.training, segments)

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        return_probabilities: bool = False,
        segments: Sequence[tuple[int, int]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(B, T, D)` -> `((B, T, D), attention probabilities (B, heads, T, T) or None)`.

        With `segments` ((B_i, T_i) pairs), `hidden_states` is packed, `(sum B_i * T_i, D)`: sequences of
        different lengths share every token-wise operation and attend within themselves (no probabilities)."""
        qkv = self.normed_linear(self.layernorm_before, hidden_states, *self.qkv_parameters())
        if segments is None:
            attended, probabilities = self.self_attention(qkv, return_probabilities)
        elif return_probabilities:
            raise ValueError("packed sequences return no attention probabilities")
        else:
            attended, probabilities = self.packed_self_attention(qkv, segments), None
        hidden_states = hidden_states + self.drop_path(attended, segments)
        fc1 = self.mlp.fc1
        hidden = self.normed_linear(self.layernorm_after, hidden_states, fc1.weight, fc1.bias)
        if self.recompute_gelu and torch.is_grad_enabled():
            mlp = GeluThenLinear.apply(hidden, self.mlp.fc2.weight, self.mlp.fc2.bias)
        else:
            mlp = self.mlp.fc2(self.activation(hidden))
        hidden_states = hidden_states + self.drop_path(mlp, segments)
        return hidden_states, probabilities


class DinoVisionTransformer(nn.Module):
    """The ViT backbone: transformers' ViT modules (same parameter names as `ViTModel`), DINO's forward.

    Args:
        config: the `DinoConfig`; its `backbone_config` is a `ViTConfig`.
    """

    def __init__(self, config: DinoConfig) -> None:
        super().__init__()
        vit_config = config.backbone_config
        self.patch_size = config.patch_size
        self.embeddings = ViTEmbeddings(vit_config)
        # Official schedule: drop-path rate rising linearly with depth, 0 for the first block.
        depth = vit_config.num_hidden_layers
        self.drop_path_rates = [config.drop_path_rate * index / max(depth - 1, 1) for index in range(depth)]
        self.layers = nn.ModuleList([DinoBlock(vit_config, rate) for rate in self.drop_path_rates])
        self.layernorm = nn.LayerNorm(vit_config.hidden_size, eps=vit_config.layer_norm_eps)
        self.gradient_checkpointing = False

    def interpolate_position_embeddings(
        self, height_patches: int, width_patches: int, square_image: bool = True
    ) -> torch.Tensor:
        """Positional embeddings for a `height_patches x width_patches` grid, as the original DINO resizes them.

        Args:
            height_patches, width_patches: the patch grid of the input.
            square_image: whether the input image is square in pixels. The original keeps its embeddings
                as they are only for a square image with the trained number of patches; any other image goes
                through the interpolation, even when its patch grid is the trained one.

        Returns:
            `(1, 1 + height_patches * width_patches, hidden_size)`.
        """
        position_embeddings = self.embeddings.position_embeddings
        num_positions = position_embeddings.shape[1] - 1
        if height_patches * width_patches == num_positions and square_image:
            return position_embeddings
        side = int(math.sqrt(num_positions))
        dim = position_embeddings.shape[-1]
        class_position = position_embeddings[:, :1]
        grid = position_embeddings[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        # The +0.1 makes the output size round to the wanted grid despite floating point (dino#8).
        scale = ((height_patches + 0.1) / side, (width_patches + 0.1) / side)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic")
        if grid.shape[-2:] != (height_patches, width_patches):
            raise RuntimeError(
                f"interpolated grid {tuple(grid.shape[-2:])} != {(height_patches, width_patches)}"
            )
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_position, grid), dim=1)

    def patchify(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """The patch projection: `(B, C, H, W)` -> `((B, h * w, D), h, w)`, pixels beyond whole patches dropped.

        The projection is a convolution with stride = kernel (transformers' ViT, the original's `PatchEmbed`),
        that is one matrix product over the flattened patches, which is how it runs here: on an H100 cuDNN
        ran the convolution of the ViT-S/16 step in a kernel without tensor cores (`precomputed_convolve_sgemm`,
        1.5 ms of a 41 ms step, 15 TFLOP/s); a matrix product of that size takes a few hundredths of that."""
        projection = self.embeddings.patch_embeddings.projection
        patch_height, patch_width = projection.kernel_size
        if tuple(projection.stride) != (patch_height, patch_width) or projection.padding != (0, 0):
            patches = projection(pixel_values)  # not a patch projection: the convolution as it is
            return patches.flatten(2).transpose(1, 2), patches.shape[-2], patches.shape[-1]
        batch, channels, height, width = pixel_values.shape
        # DinoModel has checked that the image holds at least one patch each way
        height_patches, width_patches = height // patch_height, width // patch_width
        pixels = pixel_values[:, :, : height_patches * patch_height, : width_patches * patch_width]
        # (B, C, h, ph, w, pw) -> (B, h, w, C, ph, pw): each patch flattened in the convolution weight's order
        pixels = pixels.reshape(batch, channels, height_patches, patch_height, width_patches, patch_width)
        pixels = pixels.permute(0, 2, 4, 1, 3, 5).reshape(batch, height_patches * width_patches, -1)
        weight = projection.weight.reshape(projection.out_channels, -1)
        return F.linear(pixels, weight, projection.bias), height_patches, width_patches

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch embedding + CLS token + positional embedding: `(B, C, H, W)` -> `(B, 1 + N, D)`."""
        patches, height_patches, width_patches = self.patchify(pixel_values)
        cls_token = self.embeddings.cls_token.expand(patches.shape[0], -1, -1)
        tokens = torch.cat((cls_token, patches), dim=1)
        square_image = pixel_values.shape[-2] == pixel_values.shape[-1]
        positions = self.interpolate_position_embeddings(height_patches, width_patches, square_image)
        return tokens + positions.to(tokens.dtype)

    def forward(
        self,
        pixel_values: torch.Tensor,
        attention_layers: str = "none",
        output_hidden_states: bool = False,
        output_intermediate: int = 0,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...], list[torch.Tensor]]:
        """Run the blocks.

        Args:
            pixel_values: `(B, C, H, W)`.
            attention_layers: "none", "last" or "all": whose attention probabilities to compute.
            output_hidden_states: keep the embeddings and every block's output.
            output_intermediate: keep the final-norm output of the last n blocks.

        Returns:
            `(sequence_output (B, 1+N, D) after the final norm, hidden_states, attentions, intermediate)`.
        """
        hidden_states = self.embed(pixel_values)
        all_hidden_states: list[torch.Tensor] = [hidden_states] if output_hidden_states else []
        attentions: list[torch.Tensor] = []
        intermediate: list[torch.Tensor] = []
        depth = len(self.layers)
        for index in range(depth):
            wants_probabilities = attention_layers == "all" or (
                attention_layers == "last" and index == depth - 1
            )
            if self.gradient_checkpointing and self.training and not wants_probabilities:
                hidden_states, probabilities = checkpoint(
                    self.layers[index], hidden_states, False, use_reentrant=False
                )
            else:
                hidden_states, probabilities = self.layers[index](hidden_states, wants_probabilities)
            if probabilities is not None:
                attentions.append(probabilities)
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            if index >= depth - output_intermediate:
                intermediate.append(self.layernorm(hidden_states))
        return self.layernorm(hidden_states), tuple(all_hidden_states), tuple(attentions), intermediate

    def forward_packed(self, pixel_groups: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The CLS features of several batches of different resolutions in one pass over packed tokens.

        Every group's tokens are packed into one `(sum B_i * (1 + N_i), D)` sequence: layer norms, projections,
        the MLP and the residual additions run once for all groups, attention within each image.

        Args:
            pixel_groups: `(B_i, C, H_i, W_i)` batches.

        Returns:
            `[(B_i, D), ...]`: each group's CLS token after the final norm, as `forward(...)[0][:, 0]`.
        """
        embedded = [self.embed(pixels) for pixels in pixel_groups]
        segments = tuple((tokens.shape[0], tokens.shape[1]) for tokens in embedded)
        hidden_states = torch.cat([tokens.flatten(0, 1) for tokens in embedded])
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden_states, _ = checkpoint(layer, hidden_states, False, segments, use_reentrant=False)
            else:
                hidden_states, _ = layer(hidden_states, False, segments)
        features, start = [], 0
        for batch, tokens in segments:
            features.append(hidden_states[start : start + batch * tokens : tokens])  # the CLS rows
            start += batch * tokens
        return list(self.layernorm(torch.cat(features)).split([batch for batch, _ in segments]))


class WeightNormalizedLinear(nn.Module):
    """A bias-free linear layer with weight normalisation, `weight = g * v / ||v||` per output row.

    Parameters keep the names of the official checkpoints (`weight_g` `(out, 1)`, `weight_v` `(out, in)`).
    With `freeze_norm` (the config's `norm_last_layer`), `weight_g` is a buffer fixed at 1: it is saved and loaded
    under the same name but never trained, however the model was loaded.
    """

    def __init__(self, in_features: int, out_features: int, freeze_norm: bool) -> None:
        super().__init__()
        if freeze_norm:
            self.register_buffer("weight_g", torch.ones(out_features, 1))
        else:
            self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default, as in the original

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.linear(inputs, torch._weight_norm(self.weight_v, self.weight_g, 0))


class DinoHead(nn.Module):
    """The DINO projection head (paper §3.1): MLP -> L2 normalisation -> weight-normalised linear layer.

    Args:
        config: `hidden_dim`, `bottleneck_dim`, `out_dim`, `head_layers`, `use_bn_in_head`, `norm_last_layer`.
    """

    def __init__(self, config: DinoConfig) -> None:
        super().__init__()
        in_dim = config.embed_dim
        if config.head_layers == 1:
            self.mlp = nn.Linear(in_dim, config.bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            widths = [in_dim] + [config.hidden_dim] * (config.head_layers - 1)
            for width_in, width_out in zip(widths[:-1], widths[1:]):
                layers.append(nn.Linear(width_in, width_out))
                if config.use_bn_in_head:
                    layers.append(nn.BatchNorm1d(width_out))
                layers.append(nn.GELU())
            layers.append(nn.Linear(config.hidden_dim, config.bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormalizedLinear(
            config.bottleneck_dim, config.out_dim, config.norm_last_layer
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`(B, embed_dim)` features -> `(B, out_dim)` logits."""
        bottleneck = F.normalize(self.mlp(features), dim=-1, p=2)
        return self.last_layer(bottleneck)


class DinoPreTrainedModel(PreTrainedModel):
    config_class = DinoConfig
    config: DinoConfig
    base_model_prefix = "dino"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["DinoBlock", "ResNetBottleNeckLayer", "ResNetBasicLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # The original's init: truncated normal (std 0.02) linear weights, zero biases, unit norms; the patch
        # convolution and the last layer keep PyTorch's default init.
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm1d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
        elif isinstance(module, ViTEmbeddings):
            init.trunc_normal_(module.position_embeddings, std=0.02)
            init.trunc_normal_(module.cls_token, std=0.02)
        elif isinstance(module, WeightNormalizedLinear):
            init.ones_(module.weight_g)
            init.kaiming_uniform_(module.weight_v, a=math.sqrt(5))


class DinoModel(DinoPreTrainedModel):
    """A DINO network: backbone (`model.backbone`) + projection head (`model.head`).

    `model(pixel_values)` returns the backbone's outputs ([`DinoModelOutput`]); `model.head(features)` or
    `model.forward_with_head(pixel_values)` gives the `(B, out_dim)` logits used by the DINO loss.
    """

    def __init__(self, config: DinoConfig) -> None:
        super().__init__(config)
        if config.is_vit:
            self.backbone = DinoVisionTransformer(config)
            # Not ViTEmbeddings: the forward uses its parts without calling it, so an FSDP unit around it would
            # never gather its parameters.
            no_split = ["DinoBlock"]
        else:
            self.backbone = ResNetModel(config.backbone_config)
            basic = config.backbone_config.layer_type == "basic"
            no_split = ["ResNetBasicLayer" if basic else "ResNetBottleNeckLayer"]
        # Only the blocks this network has: FSDP's transformer-based auto-wrap refuses a listed class that the
        # model does not contain.
        self._no_split_modules = no_split
        self.head = DinoHead(config)
        self.post_init()

    # -- input checks -----------------------------------------------------------------------------------
    def _check_pixel_values(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not isinstance(pixel_values, torch.Tensor):
            raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.ndim != 4:
            raise ValueError(
                f"pixel_values must have shape (batch, channels, height, width), got {tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values must be a floating-point tensor (normalised images), got {pixel_values.dtype}; "
                "convert with .float() and normalise (e.g. ImageNet mean/std) first"
            )
        channels = self.config.backbone_config.num_channels
        if pixel_values.shape[1] != channels:
            raise ValueError(
                f"the model expects {channels} channels, got pixel_values with {pixel_values.shape[1]}"
            )
        minimum = self.config.patch_size if self.config.is_vit else 1
        if min(pixel_values.shape[-2:]) < minimum:
            raise ValueError(
                f"images of {tuple(pixel_values.shape[-2:])} pixels are smaller than one {minimum}-pixel patch"
            )
        weight_dtype = self.head.last_layer.weight_v.dtype
        return pixel_values.to(weight_dtype) if pixel_values.dtype != weight_dtype else pixel_values

    def _require_vit(self, what: str) -> None:
        if not self.config.is_vit:
            raise ValueError(f"{what} needs a ViT backbone; this model has a ResNet")

    # -- forward passes ---------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DinoModelOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, channels, height, width)`):
                Normalised images; any height and width of at least one patch (positional embeddings are
                interpolated as in the original DINO).
            output_attentions (`bool`, *optional*): return attention probabilities (see `DinoModelOutput`).
            output_hidden_states (`bool`, *optional*): return the embeddings and every block's output.

        Returns:
            [`DinoModelOutput`]: `pooler_output` `(batch, embed_dim)` holds the features.
        """
        output_attentions = bool(
            output_attentions if output_attentions is not None else self.config.output_attentions
        )
        output_hidden_states = bool(
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        pixel_values = self._check_pixel_values(pixel_values)
        if self.config.is_vit:
            attention_layers = "none"
            if output_attentions:
                attention_layers = "all" if self.config._attn_implementation == "eager" else "last"
            sequence, hidden_states, attentions, _ = self.backbone(
                pixel_values, attention_layers=attention_layers, output_hidden_states=output_hidden_states
            )
            output = DinoModelOutput(
                last_hidden_state=sequence,
                pooler_output=sequence[:, 0],
                hidden_states=hidden_states if output_hidden_states else None,
                attentions=attentions if output_attentions else None,
            )
        else:
            if output_attentions:
                raise ValueError("a ResNet backbone has no attention maps; use a ViT for output_attentions")
            resnet = self.backbone(pixel_values, output_hidden_states=output_hidden_states)
            output = DinoModelOutput(
                last_hidden_state=resnet.last_hidden_state,
                pooler_output=resnet.pooler_output.flatten(1),
                hidden_states=resnet.hidden_states if output_hidden_states else None,
            )
        return output if return_dict else output.to_tuple()

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The features alone, `(B, C, H, W)` -> `(B, embed_dim)`."""
        pixel_values = self._check_pixel_values(pixel_values)
        if self.config.is_vit:
            return self.backbone(pixel_values)[0][:, 0]
        return self.backbone(pixel_values).pooler_output.flatten(1)

    def set_activation_recomputation(self, enabled: bool) -> None:
        """Whether the ViT blocks recompute their GELU and layer-norm outputs in the backward (the default) or
        keep them. On one H100 (ViT-S/16, 2x224 + 10x96, batch 64, uncompiled) recomputing took the step's peak
        memory from 0.77x to 0.56x an original-style baseline's and its throughput from 1.75x to 1.50x
        (benchmarks/README.md). No effect on a ResNet."""
        if self.config.is_vit:
            for block in self.backbone.layers:
                block.set_recomputation(enabled)

    def forward_with_head(
        self, pixel_values: torch.Tensor | list[torch.Tensor], pack: bool = False
    ) -> torch.Tensor:
        """Head logits for one batch or for a list of crops (the multi-crop forward used in training).

        Consecutive crops of the same resolution share one backbone pass; the head runs once on all of them
        (so a batch-norm head sees every crop, as in the original).

        Args:
            pixel_values: `(B, C, H, W)`, or a list of such tensors (crops may differ in size).
            pack: ViT only: one backbone pass for all resolutions over packed tokens
                (`DinoVisionTransformer.forward_packed`) instead of one pass per resolution. Same function;
                fewer, larger operations. Stochastic depth draws its masks in another order.

        Returns:
            `(B * len(list), out_dim)`, crops in list order.
        """
        crops = [pixel_values] if isinstance(pixel_values, torch.Tensor) else list(pixel_values)
        if not crops:
            raise ValueError("forward_with_head needs at least one crop")
        groups: list[torch.Tensor] = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            groups.append(crops[start] if end == start + 1 else torch.cat(crops[start:end]))
            start = end
        if pack and len(groups) > 1:
            self._require_vit("packed multi-crop forward")
            features = self.backbone.forward_packed([self._check_pixel_values(group) for group in groups])
        else:
            features = [self.forward_features(group) for group in groups]
        return self.head(torch.cat(features) if len(features) > 1 else features[0])

    def last_self_attention(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Last block's attention probabilities `(B, heads, 1 + N, 1 + N)`; only that block runs eager attention."""
        self._require_vit("last_self_attention")
        pixel_values = self._check_pixel_values(pixel_values)
        return self.backbone(pixel_values, attention_layers="last")[2][-1]

    def get_intermediate_layers(self, pixel_values: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Tokens of the last `n` blocks, each with the final norm applied: n tensors `(B, 1 + N, D)`."""
        self._require_vit("get_intermediate_layers")
        if not 1 <= n <= len(self.backbone.layers):
            raise ValueError(f"n must be between 1 and {len(self.backbone.layers)}, got {n}")
        pixel_values = self._check_pixel_values(pixel_values)
        return self.backbone(pixel_values, output_intermediate=n)[3]

    def patch_grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """Number of patches `(rows, columns)` for images of this size."""
        self._require_vit("patch_grid")
        return pixel_values.shape[-2] // self.config.patch_size, pixel_values.shape[
            -1
        ] // self.config.patch_size


__all__ = ["DinoHead", "DinoModel", "DinoModelOutput", "DinoPreTrainedModel", "DinoVisionTransformer"]
