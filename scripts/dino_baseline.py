"""The baseline the benchmarks compare against: a DINO training step written the way the original does it.

Written from the paper and the documented behaviour of the official `main_dino.py` (not copied from it), so that
`scripts/benchmark_step.py` and `scripts/benchmark_data.py` can measure hf_dino's fast path against the original's
habits on the same machine at the same moment:

- a timm-style ViT with a fused `qkv` projection and eager attention (the softmax materialised, paper §3.1);
- one backbone forward per crop resolution (the original's multi-crop wrapper), the head once on all crops;
- the loss with one `log_softmax` per (teacher view, student view) pair: 2 * (2 + N) - 2 of them;
- fp16 autocast with a `GradScaler` on CUDA (official default `--use_fp16 True`); fp32 elsewhere;
- gradient clipping per parameter tensor with a host read of each norm and a host-side comparison;
- a Python loop over parameters for the teacher EMA, a `loss.item()` finiteness check and a device
  synchronisation every step;
- a per-tensor (for-loop) AdamW, as PyTorch's AdamW was in 2021;
- PIL multi-crop augmentation in data workers (torchvision transforms with the official parameters).

The networks load their weights from a `DinoModel`, so both paths can start from the same weights, and their
state maps back to `DinoModel` names (through hf_dino's own converter) for the equivalence checks.

This is a benchmark reference, not part of the hf_dino package.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# ImageNet statistics used by the original's Normalize.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------------------
# Networks in the official layout (fused qkv, blocks.N.*, head.mlp.{0,2,4}, head.last_layer.weight_{g,v})
# ---------------------------------------------------------------------------------------------------------------
def drop_path(hidden_states: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample, as in the original's DropPath."""
    if drop_prob == 0.0 or not training:
        return hidden_states
    keep_prob = 1.0 - drop_prob
    shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
    mask = torch.floor(keep_prob + torch.rand(shape, dtype=hidden_states.dtype, device=hidden_states.device))
    return hidden_states.div(keep_prob) * mask


class EagerAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and the probabilities materialised."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)
        probabilities = ((query @ key.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, heads, T, T)
        context = (probabilities @ value).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(context)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden_states)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, drop_path_rate: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = EagerAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden)
        self.drop_path_rate = drop_path_rate

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + drop_path(
            self.attn(self.norm1(hidden_states)), self.drop_path_rate, self.training
        )
        return hidden_states + drop_path(
            self.mlp(self.norm2(hidden_states)), self.drop_path_rate, self.training
        )


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """A ViT whose forward returns the final-norm CLS token `(B, dim)`, as the original's backbone does.

    Args:
        image_size, patch_size, channels, dim, depth, num_heads, mlp_hidden: the architecture.
        drop_path_rate: stochastic depth of the last block (rising linearly from 0).
        eps: LayerNorm epsilon (1e-6 in the original).
    """

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        channels: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_hidden: int,
        drop_path_rate: float = 0.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, channels, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        rates = [drop_path_rate * index / max(depth - 1, 1) for index in range(depth)]
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_hidden, rate, eps) for rate in rates])
        self.norm = nn.LayerNorm(dim, eps=eps)

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Positional embeddings for another grid: bicubic, `scale_factor` with the +0.1 offset (dino#8)."""
        num_positions = self.pos_embed.shape[1] - 1
        rows, columns = height // self.patch_size, width // self.patch_size
        if rows * columns == num_positions and rows == columns:
            return self.pos_embed
        side = int(math.sqrt(num_positions))
        dim = self.pos_embed.shape[-1]
        grid = self.pos_embed[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((rows + 0.1) / side, (columns + 0.1) / side), mode="bicubic")
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((self.pos_embed[:, :1], grid), dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(pixel_values)
        tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(*pixel_values.shape[-2:])
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)[:, 0]


class ProjectionHead(nn.Module):
    """MLP -> L2 normalisation -> weight-normalised linear layer (paper §3.1), official parameter names."""

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int, norm_last_layer: bool
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        self.last_layer = nn.Module()
        self.last_layer.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)
        self.last_layer.weight_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.kaiming_uniform_(self.last_layer.weight_v, a=math.sqrt(5))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        bottleneck = F.normalize(self.mlp(features), dim=-1, p=2)
        weight_v = self.last_layer.weight_v
        weight = self.last_layer.weight_g * weight_v / weight_v.norm(dim=1, keepdim=True)
        return F.linear(bottleneck, weight)


class MultiCropNetwork(nn.Module):
    """Backbone + head over a list of crops: one backbone pass per run of same-resolution crops."""

    def __init__(self, backbone: VisionTransformer, head: ProjectionHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[torch.Tensor]) -> torch.Tensor:
        # Runs of consecutive crops of equal width (the original finds them with unique_consecutive on a CPU
        # tensor; plain Python here, so that the CPU sync counter only sees reads of real device tensors).
        features = []
        for _, group in itertools.groupby(crops, key=lambda crop: crop.shape[-1]):
            features.append(self.backbone(torch.cat(list(group))))
        return self.head(torch.cat(features))


def networks_like(dino_model: nn.Module, *, drop_path_rate: float | None = None) -> MultiCropNetwork:
    """A baseline network with the architecture and the weights of a hf_dino `DinoModel` (ViT backbone).

    Args:
        dino_model: a `hf_dino.DinoModel` with a ViT backbone.
        drop_path_rate: stochastic depth for this copy (default: the model config's).

    Returns:
        A `MultiCropNetwork` on the model's device and dtype, holding the same weights.
    """
    config = dino_model.config
    if not config.is_vit:
        raise ValueError("the baseline only covers ViT backbones")
    vit = config.backbone_config
    image_size = vit.image_size if isinstance(vit.image_size, int) else vit.image_size[0]
    backbone = VisionTransformer(
        image_size=image_size,
        patch_size=config.patch_size,
        channels=vit.num_channels,
        dim=vit.hidden_size,
        depth=vit.num_hidden_layers,
        num_heads=vit.num_attention_heads,
        mlp_hidden=vit.intermediate_size,
        drop_path_rate=config.drop_path_rate if drop_path_rate is None else drop_path_rate,
        eps=vit.layer_norm_eps,
    )
    head = ProjectionHead(
        config.embed_dim, config.out_dim, config.hidden_dim, config.bottleneck_dim, config.norm_last_layer
    )
    if config.head_layers != 3 or config.use_bn_in_head:
        raise ValueError("the baseline head is the paper's: 3 layers, no batch norm")
    network = MultiCropNetwork(backbone, head)
    network.load_state_dict(official_state_dict_of(dino_model))
    reference = dino_model.head.last_layer.weight_v
    return network.to(device=reference.device, dtype=reference.dtype)


def official_state_dict_of(dino_model: nn.Module) -> dict[str, torch.Tensor]:
    """A `DinoModel`'s weights under the official names (`backbone.blocks.N.attn.qkv`, `head.mlp.0`, ...)."""
    source = dino_model.backbone
    state = {
        "backbone.cls_token": source.embeddings.cls_token,
        "backbone.pos_embed": source.embeddings.position_embeddings,
        "backbone.patch_embed.proj.weight": source.embeddings.patch_embeddings.projection.weight,
        "backbone.patch_embed.proj.bias": source.embeddings.patch_embeddings.projection.bias,
        "backbone.norm.weight": source.layernorm.weight,
        "backbone.norm.bias": source.layernorm.bias,
    }
    for index, layer in enumerate(source.layers):
        prefix = f"backbone.blocks.{index}"
        attention = layer.attention
        for kind in ("weight", "bias"):
            state[f"{prefix}.attn.qkv.{kind}"] = torch.cat(
                [getattr(getattr(attention, name), kind) for name in ("q_proj", "k_proj", "v_proj")]
            )
            state[f"{prefix}.attn.proj.{kind}"] = getattr(attention.o_proj, kind)
            state[f"{prefix}.norm1.{kind}"] = getattr(layer.layernorm_before, kind)
            state[f"{prefix}.norm2.{kind}"] = getattr(layer.layernorm_after, kind)
            state[f"{prefix}.mlp.fc1.{kind}"] = getattr(layer.mlp.fc1, kind)
            state[f"{prefix}.mlp.fc2.{kind}"] = getattr(layer.mlp.fc2, kind)
    for key, value in dino_model.head.state_dict().items():
        state[f"head.{key}"] = value
    return {key: value.detach().clone() for key, value in state.items()}


# ---------------------------------------------------------------------------------------------------------------
# The objective, clipping and EMA as the original computes them
# ---------------------------------------------------------------------------------------------------------------
class PairwiseDinoLoss(nn.Module):
    """The DINO loss with one `log_softmax` per (teacher view, student view) pair (22 for 2 + 10 crops).

    Args:
        out_dim: K.
        num_crops: total crops per image (2 global + N local).
        student_temp: tau_s (0.1).
        center_momentum: m (0.9).
    """

    def __init__(
        self, out_dim: int, num_crops: int, student_temp: float = 0.1, center_momentum: float = 0.9
    ) -> None:
        super().__init__()
        self.num_crops = num_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(
        self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        student_views = (student_output / self.student_temp).chunk(self.num_crops)
        teacher_views = F.softmax((teacher_output - self.center) / teacher_temp, dim=-1).detach().chunk(2)
        total, num_terms = 0.0, 0
        for teacher_index, teacher_probs in enumerate(teacher_views):
            for student_index, student_view in enumerate(student_views):
                if student_index == teacher_index:
                    continue
                # A fresh log_softmax for every pair: the waste the fused loss removes.
                term = torch.sum(-teacher_probs * F.log_softmax(student_view, dim=-1), dim=-1)
                total = total + term.mean()
                num_terms += 1
        self.update_center(teacher_output)
        return total / num_terms

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def clip_gradients_with_host_sync(model: nn.Module, clip: float) -> list[float]:
    """Per-tensor clipping as the original: each norm read to the host, each comparison on the host."""
    norms = []
    for _, parameter in model.named_parameters():
        if parameter.grad is None:
            continue
        norm = parameter.grad.data.norm(2)
        norms.append(norm.item())  # host sync 1 of 2 per tensor
        clip_coefficient = clip / (norm + 1e-6)
        if clip_coefficient < 1:  # host sync 2 of 2 per tensor (Tensor.__bool__)
            parameter.grad.data.mul_(clip_coefficient)
    return norms


def cancel_last_layer_gradients(model: nn.Module, epoch: int, freeze_last_layer: int) -> None:
    if epoch >= freeze_last_layer:
        return
    for name, parameter in model.named_parameters():
        if "last_layer" in name:
            parameter.grad = None


@torch.no_grad()
def ema_python_loop(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, one pair of small kernels per parameter tensor."""
    for student_parameter, teacher_parameter in zip(student.parameters(), teacher.parameters()):
        teacher_parameter.data.mul_(momentum).add_((1 - momentum) * student_parameter.detach().data)


# ---------------------------------------------------------------------------------------------------------------
# The training step
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class StepSchedule:
    """The scheduled values of one step (the benchmarks vary them per step, as a real run does)."""

    lr: float = 5e-4
    weight_decay: float = 0.04
    teacher_momentum: float = 0.996
    teacher_temp: float = 0.04
    epoch: int = 1


class BaselineTrainer:
    """One DINO optimisation step with the original's habits (see the module docstring).

    Args:
        dino_model: the `DinoModel` whose architecture and weights to start from (left untouched).
        num_crops: 2 + number of local crops.
        use_fp16: fp16 autocast and a GradScaler (the official default, CUDA only).
        clip_grad: per-tensor clipping threshold (3.0 official; 0 disables).
        freeze_last_layer: epochs during which the head's last layer gets no update.
        drop_path_rate: the student's stochastic depth (0.1 official).
    """

    def __init__(
        self,
        dino_model: nn.Module,
        *,
        num_crops: int,
        use_fp16: bool,
        clip_grad: float = 3.0,
        freeze_last_layer: int = 1,
        drop_path_rate: float = 0.1,
    ) -> None:
        self.student = networks_like(dino_model, drop_path_rate=drop_path_rate).train()
        self.teacher = networks_like(dino_model, drop_path_rate=0.0).train()
        for parameter in self.teacher.parameters():
            parameter.requires_grad = False
        device = self.student.head.last_layer.weight_v.device
        self.device = device
        self.loss_fn = PairwiseDinoLoss(dino_model.config.out_dim, num_crops).to(device)
        regularized = [
            p for n, p in self.student.named_parameters() if p.requires_grad and not _no_decay(n, p)
        ]
        not_regularized = [
            p for n, p in self.student.named_parameters() if p.requires_grad and _no_decay(n, p)
        ]
        # 2021's AdamW was a Python loop over tensors; foreach=False keeps that.
        self.optimizer = torch.optim.AdamW(
            [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}], foreach=False
        )
        self.use_fp16 = use_fp16 and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.use_fp16 else None
        self.clip_grad = clip_grad
        self.freeze_last_layer = freeze_last_layer

    def step(self, crops: Sequence[torch.Tensor], schedule: StepSchedule) -> torch.Tensor:
        """One optimisation step on a multi-crop batch.

        Args:
            crops: `2 + N` tensors `(B, C, H, W)`, global crops first.
            schedule: this step's lr, weight decay, teacher momentum and temperature.

        Returns:
            The loss (a 0-dim tensor).
        """
        for index, group in enumerate(self.optimizer.param_groups):
            group["lr"] = schedule.lr
            if index == 0:
                group["weight_decay"] = schedule.weight_decay
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_fp16):
            teacher_output = self.teacher(crops[:2])
            student_output = self.student(crops)
            loss = self.loss_fn(student_output, teacher_output, schedule.teacher_temp)
        if not math.isfinite(loss.item()):  # host sync every step
            raise FloatingPointError(f"loss is {loss.item()}, stopping training")
        self.optimizer.zero_grad()
        if self.scaler is None:
            loss.backward()
            if self.clip_grad:
                clip_gradients_with_host_sync(self.student, self.clip_grad)
            cancel_last_layer_gradients(self.student, schedule.epoch, self.freeze_last_layer)
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            if self.clip_grad:
                self.scaler.unscale_(self.optimizer)
                clip_gradients_with_host_sync(self.student, self.clip_grad)
            cancel_last_layer_gradients(self.student, schedule.epoch, self.freeze_last_layer)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        ema_python_loop(self.student, self.teacher, schedule.teacher_momentum)
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # the original synchronises before logging every step
        return loss.detach()

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor this trainer keeps between steps (for the memory accounting)."""
        tensors = [*self.student.parameters(), *self.teacher.parameters(), self.loss_fn.center]
        for state in self.optimizer.state.values():
            tensors += [value for value in state.values() if isinstance(value, torch.Tensor)]
        return tensors

    def dino_state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """Student and teacher weights under `DinoModel` names, plus the loss center (for comparisons)."""
        return {
            "student": dino_names(self.student.state_dict(), len(self.student.backbone.blocks)),
            "teacher": dino_names(self.teacher.state_dict(), len(self.teacher.backbone.blocks)),
            "center": {"center": self.loss_fn.center.detach().clone()},
        }


def _no_decay(name: str, parameter: torch.Tensor) -> bool:
    return name.endswith(".bias") or parameter.ndim <= 1


def dino_names(state_dict: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Official names -> `DinoModel` names, through hf_dino's own converter (which splits the fused qkv)."""
    from hf_dino.convert import vit_from_official

    backbone = {
        key[len("backbone.") :]: value for key, value in state_dict.items() if key.startswith("backbone.")
    }
    converted = {f"backbone.{key}": value for key, value in vit_from_official(backbone, depth).items()}
    converted.update({key: value for key, value in state_dict.items() if key.startswith("head.")})
    return converted


# ---------------------------------------------------------------------------------------------------------------
# The original's data augmentation: PIL transforms in data workers
# ---------------------------------------------------------------------------------------------------------------
class PILGaussianBlur:
    """PIL's Gaussian blur with a radius drawn uniformly in [0.1, 2], applied with a probability (official)."""

    def __init__(self, probability: float, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        self.probability = probability
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, image):  # noqa: ANN001, ANN204 - PIL image in, PIL image out
        from PIL import ImageFilter

        if random.random() >= self.probability:
            return image
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class PILSolarize:
    """PIL's solarisation (threshold 128) with a probability (official: 0.2 on the second global crop)."""

    def __init__(self, probability: float) -> None:
        self.probability = probability

    def __call__(self, image):  # noqa: ANN001, ANN204 - PIL image in, PIL image out
        from PIL import ImageOps

        return ImageOps.solarize(image) if random.random() < self.probability else image


class PILMultiCrop:
    """Multi-crop augmentation with torchvision's PIL transforms and the official parameters.

    Global crops: RandomResizedCrop(224, scale (0.4, 1), bicubic), flip 0.5, ColorJitter(0.4, 0.4, 0.2, 0.1)
    with p 0.8, grayscale p 0.2, Gaussian blur (sigma 0.1-2) with p 1.0 / 0.1, solarisation p 0.2 on the second;
    local crops: 96 px, scale (0.05, 0.4), blur p 0.5; ImageNet normalisation.

    Args:
        local_crops_number: N local crops.
        global_size, local_size: crop sizes.
        global_scale, local_scale: RandomResizedCrop area ranges.
    """

    def __init__(
        self,
        local_crops_number: int = 8,
        global_size: int = 224,
        local_size: int = 96,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
    ) -> None:
        from torchvision import transforms

        bicubic = transforms.InterpolationMode.BICUBIC
        flip_and_color = transforms.Compose(
            [
                transforms.RandomHorizontalFlip(p=0.5),
                transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                transforms.RandomGrayscale(p=0.2),
            ]
        )
        normalize = transforms.Compose(
            [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        )

        def blur(probability: float) -> PILGaussianBlur:
            return PILGaussianBlur(probability)

        self.global_1 = transforms.Compose(
            [transforms.RandomResizedCrop(global_size, scale=global_scale, interpolation=bicubic), flip_and_color,
             blur(1.0), normalize]
        )  # fmt: skip
        self.global_2 = transforms.Compose(
            [transforms.RandomResizedCrop(global_size, scale=global_scale, interpolation=bicubic), flip_and_color,
             blur(0.1), PILSolarize(0.2), normalize]
        )  # fmt: skip
        self.local = transforms.Compose(
            [transforms.RandomResizedCrop(local_size, scale=local_scale, interpolation=bicubic), flip_and_color,
             blur(0.5), normalize]
        )  # fmt: skip
        self.local_crops_number = local_crops_number

    def __call__(self, image) -> list[torch.Tensor]:  # noqa: ANN001 - a PIL image
        """One PIL image -> `2 + N` tensors `(3, H, W)`."""
        crops = [self.global_1(image), self.global_2(image)]
        crops += [self.local(image) for _ in range(self.local_crops_number)]
        return crops
