"""The DINO training loop with accelerate: one CPU process to many GPUs, exact resume.

    hf-dino train --preset demo                                  # CPU, embedded Fashion-MNIST, minutes
    accelerate launch -m hf_dino.cli train --preset vit_small_vanilla --dataset /data/imagenet/train
    accelerate launch scripts/train.py --config my_recipe.yaml --batch-size 128

The recipe reads in the order of the paper and the official `main_dino.py`: data, networks, loss,
optimizer, schedules, resume, loop. Per optimizer step:

1. the teacher (EMA of the student, no gradient) sees the 2 global crops, the student sees every crop;
   crops of one resolution share one forward pass;
2. loss = cross-entropy between the centred, sharpened teacher and the student over all pairs of
   different views, summed over `gradient_accumulation_steps` micro-batches;
3. gradients are clipped (per tensor, as the original, or globally), the head's last layer is kept
   frozen during the first `freeze_last_layer` epochs, and the optimizer steps with this step's learning
   rate and weight decay;
4. the teacher moves towards the student with this step's momentum, and the center towards the mean
   teacher output of the whole effective batch (every micro-batch, every process).

No step reads a value back to the host except every `logging_steps` (progress bar, metrics, NaN check).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_dino.training import checkpointing
from hf_dino.training.arguments import ARCHITECTURES, DinoTrainingArguments
from hf_dino.training.data_pipeline import (
    AugmentedImages,
    PrecomputedCrops,
    StepBatchSampler,
    collate_crops,
    example_seed,
    steps_per_epoch_for,
)
from hf_dino.training.monitoring import (
    MetricsRecorder,
    NonFiniteLossError,
    collapse_statistics_on_device,
    make_json_safe,
)
from hf_dino.training.online_evaluation import (
    EvaluationData,
    knn_accuracy,
    knn_report,
    load_evaluation_data,
)
from hf_dino.training.optimization import (
    apply_schedule,
    build_optimizer,
    cancel_last_layer_gradients,
    clip_gradients_per_parameter,
    complete_optimizer_state,
    matching_parameters,
    parameter_groups,
    update_teacher,
)

logger = logging.getLogger(__name__)


class MultiCropNetwork(nn.Module):
    """A `DinoModel` whose forward takes the list of crops, so that DDP / FSDP wrap the multi-crop pass.

    Args:
        model: the `DinoModel` (backbone + head).
        pack: one backbone pass for all resolutions over packed tokens (`DinoModel.forward_with_head`).
    """

    def __init__(self, model: nn.Module, pack: bool = False) -> None:
        super().__init__()
        self.model = model
        self.pack = pack
        # FSDP's transformer-based auto-wrap reads the blocks not to split from the wrapped module.
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """`[(B, C, H_i, W_i), ...]` -> `(len(crops) * B, out_dim)` head outputs, crops in order."""
        return self.model.forward_with_head(crops, pack=self.pack)


def build_model_config(arguments: DinoTrainingArguments, *, drop_path_rate: float | None = None) -> Any:
    """The `DinoConfig` of the recipe's architecture (`--arch`, `--patch-size`, head options, overrides)."""
    from hf_dino.configuration_dino import PRESETS, DinoConfig

    arch = arguments.arch
    if arch in ARCHITECTURES and arch.startswith("vit_"):
        preset = f"{arch}_patch{arguments.patch_size}"
        overrides: dict[str, Any] = {}
        if preset not in DinoConfig.preset_names():  # e.g. patch 14: start from patch 16 and override
            preset = f"{arch}_patch16"
            overrides["patch_size"] = arguments.patch_size
    else:
        preset = arch
        overrides = {}
    if preset not in DinoConfig.preset_names():
        raise ValueError(
            f"unknown --arch {arch!r}: choose one of {', '.join(ARCHITECTURES)} or a DinoConfig preset "
            f"({', '.join(DinoConfig.preset_names())})"
        )
    overrides.update(
        out_dim=arguments.out_dim,
        norm_last_layer=arguments.norm_last_layer,
        use_bn_in_head=arguments.use_bn_in_head,
        drop_path_rate=arguments.drop_path_rate if drop_path_rate is None else drop_path_rate,
    )
    overrides.update(arguments.model_config)
    if PRESETS[preset]["backbone"] == "resnet":
        overrides.pop("patch_size", None)
    return DinoConfig.from_preset(preset, **overrides)


def model_config_from_checkpoint(arguments: DinoTrainingArguments) -> Any:
    """Continued pretraining: the architecture of the `--init-from` folder, with this run's drop path and
    last-layer norm setting (`--arch`, `--patch-size`, `--out-dim` and `--model-config` are not used)."""
    from hf_dino.configuration_dino import DinoConfig

    folder = Path(arguments.init_from).expanduser()
    if (folder / "teacher" / "config.json").is_file():
        folder = folder / "teacher"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--init-from {arguments.init_from}: no DinoModel config.json in this folder")
    config = DinoConfig.from_pretrained(folder)
    config.drop_path_rate = arguments.drop_path_rate
    config.norm_last_layer = arguments.norm_last_layer
    logger.info("--init-from: architecture read from %s (out_dim %d)", folder, config.out_dim)
    return config


def resolve_mixed_precision(requested: str) -> str:
    """`auto` -> fp16 on CUDA (the official default), no precision change elsewhere."""
    if requested != "auto":
        return requested
    return "fp16" if torch.cuda.is_available() else "no"


def _tracker_names(report_to: str) -> list[str] | None:
    if report_to in ("none", ""):
        return None
    if report_to == "auto":
        from accelerate.utils import is_tensorboard_available

        return ["tensorboard"] if is_tensorboard_available() else None
    return ["all"] if report_to == "all" else [name.strip() for name in report_to.split(",") if name.strip()]


def _flat_scalars(values: dict[str, Any]) -> dict[str, Any]:
    """Tracker hyper-parameters must be scalars: lists and dicts become strings."""
    return {
        key: value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
        for key, value in values.items()
    }


class DinoTrainer:
    """Sets up and runs one DINO training run.

    Args:
        arguments: the recipe.
        train_dataset: optional map-style dataset of crops addressed by `(epoch, index)` (e.g.
            `PrecomputedCrops`), replacing `--dataset` and the augmentation; tests use it for fixed views.
        train_images: optional map-style dataset of images (rows with `--image-column`, or images),
            replacing `--dataset` but going through the multi-crop augmentation.
        evaluation_data: optional pre-processed k-NN data replacing `--eval-dataset`.
        accelerator_kwargs: extra `accelerate.Accelerator` arguments (e.g. `cpu=True`).
    """

    def __init__(
        self,
        arguments: DinoTrainingArguments,
        *,
        train_dataset: Any | None = None,
        train_images: Any | None = None,
        evaluation_data: EvaluationData | None = None,
        accelerator_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.arguments = arguments
        self.output_dir = Path(arguments.output_dir)
        self._train_dataset_override = train_dataset
        self._train_images_override = train_images
        self.evaluation_data = evaluation_data
        self._accelerator_kwargs = accelerator_kwargs or {}

    # ------------------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Build everything in the order of the recipe: accelerator, data, networks, loss, optimizer,
        schedules, then restore a checkpoint when resuming."""
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        arguments = self.arguments
        self.mixed_precision = resolve_mixed_precision(arguments.mixed_precision)
        self.accelerator = Accelerator(
            mixed_precision=self.mixed_precision,
            # accelerate divides each micro-batch loss by this in `backward`; the loop itself decides when
            # gradients are all-reduced (`no_sync`) and steps once per optimizer step.
            gradient_accumulation_steps=arguments.gradient_accumulation_steps,
            log_with=_tracker_names(arguments.report_to),
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir)
            ),
            **self._accelerator_kwargs,
        )
        accelerator = self.accelerator
        self.device = accelerator.device
        if self.mixed_precision == "fp16" and not accelerator.native_amp:
            logger.warning(
                "--mixed-precision fp16 has no effect on %s (accelerate autocasts to float16 only on "
                "accelerators): training in float32; bf16 is the reduced precision on CPUs",
                self.device,
            )
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # one bar per save_pretrained would drown the training bar
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            checkpointing.remove_stale_temporaries(self.output_dir)
        accelerator.wait_for_everyone()

        # ---- data (the model config first: it says how many channels the images must have)
        set_seed(arguments.seed)
        self.model_config = (
            model_config_from_checkpoint(arguments) if arguments.init_from else build_model_config(arguments)
        )
        self._build_data()

        # ---- networks: the teacher starts as a copy of the student, without stochastic depth
        from hf_dino.modeling_dino import DinoModel

        student_model = DinoModel(self.model_config)
        teacher_config = copy.deepcopy(self.model_config)
        teacher_config.drop_path_rate = 0.0
        teacher_model = DinoModel(teacher_config)
        initial_center = None
        if arguments.init_from:
            initial_center = self._initialise_from(arguments.init_from, student_model, teacher_model)
        else:
            teacher_model.load_state_dict(student_model.state_dict())
        teacher_model.requires_grad_(False)
        self.log_out_dim = math.log(self.model_config.out_dim)

        # ---- loss (its center is a buffer: float32 whatever the autocast dtype)
        from hf_dino.loss import DinoLoss

        self.loss_fn = DinoLoss(
            self.model_config.out_dim,
            student_temp=arguments.student_temp,
            center_momentum=arguments.center_momentum,
        ).to(self.device)
        if initial_center is not None:
            self.loss_fn.center.copy_(initial_center.to(self.device))

        # ---- optimizer on the student; no weight decay on biases and 1-D parameters (official)
        if arguments.pack_crops and not self.model_config.is_vit:
            raise ValueError("--pack-crops needs a ViT backbone; this recipe trains a ResNet")
        student_model.set_activation_recomputation(arguments.recompute_activations)
        student = MultiCropNetwork(student_model, pack=arguments.pack_crops)
        teacher = MultiCropNetwork(teacher_model)
        if accelerator.num_processes > 1 and self.device.type == "cuda" and _has_batch_norm(student):
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        from accelerate.utils import DistributedType

        # AdamW's fused kernel where torch has it and the parameters are plain tensors (not FSDP's DTensors),
        # instead of torch's default foreach implementation: 16 instead of 94 ms per optimizer step on this
        # project's development CPU (ViT-Ti/16 and head, 27M parameters). With foreach, this loop's compiled
        # ViT-S/16 step on an H100 spent 0.9 ms (of 39.9) more in optimizer kernels than a fused-AdamW step.
        fused = (
            arguments.optimizer == "adamw"
            and self.device.type in ("cuda", "cpu")
            and accelerator.distributed_type != DistributedType.FSDP
        )
        optimizer = build_optimizer(arguments.optimizer, parameter_groups(student), fused=fused or None)

        if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
            raise ValueError(
                "FSDP1 is not supported: set `fsdp_version: 2` under `fsdp_config` in the accelerate config "
                "(FSDP1 keeps the root's gathered weights after a forward, so the teacher would miss its EMA "
                "updates)"
            )
        self.student, self.optimizer = accelerator.prepare(student, optimizer)

        self.is_fsdp = accelerator.distributed_type == DistributedType.FSDP
        if self.is_fsdp:
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            # Sharded like the student, so that the EMA pairs local shards. accelerate's FSDP2 `prepare` wants
            # an optimizer with every model; the teacher has none, so it is sharded by the same helper.
            self.teacher = fsdp2_prepare_model(accelerator, teacher)
            # FSDP2 keeps the root's gathered parameters after a forward (the backward would need them). The
            # teacher has no backward: without resharding, its next forward would reuse the gathered copy and
            # miss the EMA update, which writes to the shards.
            self.teacher.set_reshard_after_forward(True)
        else:
            self.teacher = teacher.to(self.device)
        # The official teacher stays in train mode (batch-norm statistics); it has no dropout or drop path.
        self.teacher.train()
        self.student.train()
        self.unwrapped_student = accelerator.unwrap_model(self.student)
        self.unwrapped_teacher = accelerator.unwrap_model(self.teacher)
        self.student_parameters, self.teacher_parameters = matching_parameters(
            self.unwrapped_student, self.unwrapped_teacher
        )
        self.trainable_parameters = [p for p in self.unwrapped_student.parameters() if p.requires_grad]
        # ---- the forward passes and the loss, compiled on request (--torch-compile)
        self._forward_and_loss = self._eager_forward_and_loss
        self._cuda_graphs = False
        if arguments.torch_compile:
            if self.is_fsdp:
                raise ValueError("--torch-compile is not supported under FSDP; leave it out")
            self._forward_and_loss = torch.compile(
                self._eager_forward_and_loss, mode=arguments.torch_compile, dynamic=False
            )
            self._cuda_graphs = arguments.torch_compile == "reduce-overhead" and self.device.type == "cuda"
            if self.device_augmentation is not None:
                # The photometric stage too: hundreds of small kernels per batch become a few fused ones.
                self.device_augmentation.photometric.compile_apply(arguments.torch_compile)
            # The teacher temperature enters as a device tensor, so that its warm-up neither recompiles nor
            # copies from the host (a fill kernel updates it).
            self._teacher_temp_tensor = torch.zeros((), dtype=torch.float32, device=self.device)
        # The checkpoint keeps the weights in student/ and teacher/ (save_pretrained): accelerate's
        # training_state/ needs only optimizer, scaler and RNG states.
        if not self.is_fsdp:
            accelerator.register_save_state_pre_hook(lambda models, weights, directory: weights.clear())
            accelerator.register_load_state_pre_hook(lambda models, directory: models.clear())

        # ---- schedules, per optimizer step (official), from the total batch (linear scaling rule)
        from hf_dino.schedules import DinoSchedules

        self.total_batch_size = (
            arguments.batch_size * accelerator.num_processes * arguments.gradient_accumulation_steps
        )
        self.schedules = DinoSchedules.build(
            lr=arguments.lr,
            min_lr=arguments.min_lr,
            warmup_epochs=arguments.warmup_epochs,
            weight_decay=arguments.weight_decay,
            weight_decay_end=arguments.weight_decay_end,
            momentum_teacher=arguments.momentum_teacher,
            warmup_teacher_temp=arguments.warmup_teacher_temp,
            teacher_temp=arguments.teacher_temp,
            warmup_teacher_temp_epochs=arguments.warmup_teacher_temp_epochs,
            epochs=arguments.epochs,
            steps_per_epoch=self.steps_per_epoch,
            total_batch_size=self.total_batch_size,
        )
        if arguments.momentum_teacher_end != 1.0:
            from hf_dino.schedules import cosine_schedule

            self.schedules = dataclasses.replace(
                self.schedules,
                teacher_momentum=cosine_schedule(
                    arguments.momentum_teacher,
                    arguments.momentum_teacher_end,
                    arguments.epochs,
                    self.steps_per_epoch,
                ),
            )
        self.total_steps = self.schedules.total_steps
        if arguments.max_steps is not None:
            self.total_steps = min(self.total_steps, arguments.max_steps)

        # ---- resume
        self.step = 0
        self.elapsed_before_resume = 0.0
        if arguments.resume:
            source = self._resume_source(arguments.resume)
            if source is not None:
                self._load_checkpoint(source)
            elif accelerator.is_main_process:
                logger.info("--resume auto: no checkpoint in %s, starting afresh", self.output_dir)
        elif accelerator.is_main_process and checkpointing.list_checkpoints(self.output_dir):
            logger.warning(
                "%s already holds checkpoints; this run starts afresh (use --resume auto to continue)",
                self.output_dir,
            )

        # Per-process randomness (drop path, device-side augmentation) after the shared initialisation.
        if not arguments.resume or self.step == 0:
            set_seed(arguments.seed + accelerator.process_index)
        self.augmentation_generator = None
        if self.device_augmentation is not None:
            try:
                self.augmentation_generator = torch.Generator(device=self.device)
            except RuntimeError:  # a device without its own generators (e.g. XLA): use the global stream
                logger.warning(
                    "no random generator on %s: the device-side augmentation is not seeded", self.device
                )
        if self.step == 0 and accelerator.is_main_process:
            metrics = self.output_dir / "metrics.jsonl"
            if metrics.is_file() and metrics.stat().st_size:
                logger.warning("starting afresh: the previous %s is replaced", metrics)
                metrics.unlink()

        self._write_training_config()
        if accelerator.log_with:
            accelerator.init_trackers("hf_dino", config=_flat_scalars(arguments.to_dict()))
        self.pusher = self._make_pusher()

    def _build_data(self) -> None:
        """The training data: `self.dataset` (map-style, addressed by step) or `self.stream` (streamed)."""
        arguments = self.arguments
        accelerator = self.accelerator
        self.device_augmentation = None
        self.augmentation_config = None
        self.stream = None
        global_batch = (
            arguments.batch_size * accelerator.num_processes * arguments.gradient_accumulation_steps
        )
        if self._train_dataset_override is not None:
            self.dataset = self._train_dataset_override
        else:
            from hf_dino.augmentation import MultiCropAugmentation, MultiCropConfig

            self.augmentation_config = MultiCropConfig(
                global_crops_scale=tuple(arguments.global_crops_scale),
                local_crops_scale=tuple(arguments.local_crops_scale),
                local_crops_number=arguments.local_crops_number,
                global_crop_size=arguments.global_crop_size,
                local_crop_size=arguments.local_crop_size,
                **arguments.augmentation,
            )
            augmentation = MultiCropAugmentation(
                self.augmentation_config, photometric_on=arguments.photometric_on
            )
            if arguments.photometric_on == "accelerator":
                self.device_augmentation = augmentation
            image_mode = {1: "L", 3: "RGB"}.get(self.model_config.backbone_config.num_channels, "native")
            if self._train_images_override is not None:
                images, image_column = self._train_images_override, arguments.image_column
            else:
                images, image_column = load_training_images(arguments)
            if _is_streamed(images):
                from hf_dino.data import MultiCropDataset

                self.stream = MultiCropDataset(
                    images,
                    augmentation,
                    image_column=image_column,
                    image_mode=image_mode,
                    batch_size=arguments.batch_size,
                    rank=accelerator.process_index,
                    world_size=accelerator.num_processes,
                    seed=arguments.seed,
                )
                self.dataset = None
            else:
                self.dataset = AugmentedImages(
                    images,
                    _SeededAugmentation(augmentation, arguments.seed),
                    image_column=image_column,
                    decode=_decoder(image_mode),
                )
        if self.stream is not None:
            num_examples = self.stream.num_examples
            if arguments.steps_per_epoch is None and num_examples is None:
                raise ValueError(
                    "the streamed dataset does not say how many images it holds: give --steps-per-epoch "
                    "(optimizer steps that make an epoch)"
                )
        else:
            num_examples = len(self.dataset)
        natural_steps = steps_per_epoch_for(num_examples, global_batch) if num_examples is not None else None
        if arguments.steps_per_epoch is not None:
            if self.stream is None and arguments.steps_per_epoch > natural_steps:
                raise ValueError(
                    f"--steps-per-epoch {arguments.steps_per_epoch} needs more images than the dataset's "
                    f"{num_examples} at a total batch of {global_batch} (at most {natural_steps})"
                )
            self.steps_per_epoch = arguments.steps_per_epoch
        else:
            self.steps_per_epoch = natural_steps
        self.num_examples = num_examples

    def _batches(self, start_step: int):
        """Micro-batches for steps `start_step..total_steps`, on the device, as lists of crops."""
        arguments = self.arguments
        num_workers = min(arguments.num_workers, os.cpu_count() or 1)
        loader_options = dict(
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            # A private generator: creating an iterator must not consume the global RNG (exact resume).
            generator=torch.Generator().manual_seed(arguments.seed),
            prefetch_factor=4 if num_workers > 0 else None,
        )
        if self.stream is not None:
            batches = self._stream_batches(start_step, loader_options)
        else:
            sampler = StepBatchSampler(
                num_examples=self.num_examples,
                batch_size=arguments.batch_size,
                accumulation_steps=arguments.gradient_accumulation_steps,
                process_index=self.accelerator.process_index,
                num_processes=self.accelerator.num_processes,
                seed=arguments.seed,
                start_step=start_step,
                total_steps=self.total_steps,
                shuffle=not isinstance(self.dataset, PrecomputedCrops),
            )
            sampler.steps_per_epoch = self.steps_per_epoch  # --steps-per-epoch may shorten the epochs
            batches = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=sampler, collate_fn=collate_crops, **loader_options
            )
        for crops in batches:
            if crops is None:
                raise ValueError(
                    "every image of a micro-batch failed to decode (see the skipped-image warnings): check "
                    "the dataset or --image-column"
                )
            yield [crop.to(self.device, non_blocking=True) for crop in crops]

    def _stream_batches(self, start_step: int, loader_options: dict[str, Any]):
        """Micro-batches of a streamed dataset (hf_dino.data.MultiCropDataset), resumed at `start_step`.

        An epoch is `steps_per_epoch` optimizer steps; each process consumes batch_size x accumulation
        images of its shard per step, which is what `examples_consumed` records for a resume.
        """
        from hf_dino.data import collate_multicrop

        accumulation = self.arguments.gradient_accumulation_steps
        micro_batches_per_epoch = self.steps_per_epoch * accumulation
        epoch, step_in_epoch = divmod(start_step, self.steps_per_epoch)
        skip = step_in_epoch * accumulation * self.arguments.batch_size
        remaining = (self.total_steps - start_step) * accumulation
        while remaining > 0:
            self.stream.load_state_dict(
                {"epoch": epoch, "examples_consumed": skip, "seed": self.arguments.seed}
            )
            loader = torch.utils.data.DataLoader(
                self.stream,
                batch_size=self.arguments.batch_size,
                collate_fn=collate_multicrop,
                **loader_options,
            )
            budget = micro_batches_per_epoch - skip // self.arguments.batch_size
            for crops in loader:
                if budget == 0 or remaining == 0:
                    break
                yield crops
                budget -= 1
                remaining -= 1
            if budget > 0 and remaining > 0:
                logger.warning(
                    "epoch %d of the stream ended %d micro-batches early: --steps-per-epoch is larger than the "
                    "data; the next epoch starts now",
                    epoch,
                    budget,
                )
            epoch, skip = epoch + 1, 0

    # ------------------------------------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        """Run to `total_steps` (or `--max-steps`). Returns a summary (final step, last metrics, k-NN)."""
        if not hasattr(self, "accelerator"):
            self.setup()
        arguments = self.arguments
        accelerator = self.accelerator
        metrics_path = self.output_dir / "metrics.jsonl" if accelerator.is_main_process else None
        recorder = MetricsRecorder(
            metrics_path, log_out_dim=self.log_out_dim, collapse_patience=arguments.collapse_warning_steps
        )
        self.recorder = recorder
        if accelerator.is_main_process:
            logger.info(
                "training %s for %d steps (%d per epoch), total batch %d = %d per device x %d processes x %d "
                "accumulation; lr %.3g after the linear scaling rule",
                arguments.arch,
                self.total_steps,
                self.steps_per_epoch,
                self.total_batch_size,
                arguments.batch_size,
                accelerator.num_processes,
                arguments.gradient_accumulation_steps,
                self.schedules.base_learning_rate,
            )
        from tqdm.auto import tqdm

        progress = tqdm(
            total=self.total_steps * self.total_batch_size,
            initial=self.step * self.total_batch_size,
            unit="img",
            unit_scale=True,
            dynamic_ncols=True,
            disable=not accelerator.is_local_main_process,
            desc="dino",
        )
        knn_results: dict[str, Any] | None = None
        has_evaluation = self.evaluation_data is not None or bool(arguments.eval_dataset)
        baselines = self.evaluate_baselines() if has_evaluation and arguments.eval_baselines else {}
        self._start_time = time.time()
        self._evaluation_seconds = 0.0  # online k-NN pauses, not counted as training time
        batches = self._batches(self.step)
        save_every = arguments.save_steps or self.steps_per_epoch
        finished = self.step >= self.total_steps
        try:
            while not finished:
                record = self._training_step(batches)
                record["elapsed_seconds"] = self._elapsed()
                record["timestamp"] = time.time()
                progress.update(self.total_batch_size)
                self.step += 1
                finished = self.step >= self.total_steps or self._out_of_time()
                if self.step % arguments.logging_steps == 0 or finished:
                    self._log(recorder, progress)
                if arguments.eval_steps and self.step % arguments.eval_steps == 0 and not finished:
                    paused = time.time()
                    knn_results = self.evaluate()
                    self._evaluation_seconds += time.time() - paused
                if self.step % save_every == 0 or finished:
                    self._log(recorder, progress)  # no checkpoint from a run whose loss became NaN
                    self.save_checkpoint(elapsed=self._elapsed())
        except NonFiniteLossError as error:
            progress.close()
            logger.error(str(error))
            accelerator.end_training()
            raise
        progress.close()
        self._log(recorder, progress)
        train_seconds = self._elapsed()
        if has_evaluation:
            knn_results = self.evaluate()
            if accelerator.is_main_process:
                print(knn_report(knn_results, baselines, self.evaluation_data, arguments))
        self.save_final_teacher()
        if self.pusher is not None:
            self.pusher.submit(self.output_dir, commit_message="Final teacher")
            self.pusher.wait()
        accelerator.end_training()
        return {
            "step": self.step,
            "last_metrics": recorder.last_record,
            "knn": knn_results,
            "knn_baselines": baselines,
            "train_seconds": train_seconds,
            "output_dir": str(self.output_dir),
        }

    def _elapsed(self) -> float:
        """Training seconds so far, including those before a resume, excluding online k-NN evaluations."""
        running = (
            time.time()
            - getattr(self, "_start_time", time.time())
            - getattr(self, "_evaluation_seconds", 0.0)
        )
        return self.elapsed_before_resume + max(0.0, running)

    def _out_of_time(self) -> bool:
        """`--max-time-minutes` reached? Checked at logging steps, agreed on by every process."""
        limit = self.arguments.max_time_minutes
        if limit is None or self.step % self.arguments.logging_steps != 0:
            return False
        out_of_time = self._elapsed() >= 60 * limit
        if self.accelerator.num_processes > 1:  # every process must stop at the same step
            flag = torch.tensor(float(out_of_time), device=self.device)
            out_of_time = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        return out_of_time

    def _training_step(self, batches) -> dict[str, Any]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches. Returns its host-side record."""
        arguments = self.arguments
        accelerator = self.accelerator
        step = self.step
        epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
        values = self.schedules.at(step)
        teacher_temp = values["teacher_temp"]
        apply_schedule(self.optimizer, lr=values["lr"], weight_decay=values["weight_decay"])

        teacher_outputs: list[torch.Tensor] = []
        total_loss = torch.zeros((), device=self.device)
        accumulation = arguments.gradient_accumulation_steps
        for micro_batch in range(accumulation):
            crops = next(batches)
            if self.device_augmentation is not None:
                if self.augmentation_generator is not None:
                    # Seeded by (seed, step, micro-batch, process): the same views after a resume.
                    self.augmentation_generator.manual_seed(
                        example_seed(
                            arguments.seed,
                            step,
                            micro_batch * accelerator.num_processes + accelerator.process_index,
                        )
                    )
                crops = self.device_augmentation.apply_on_device(crops, self.augmentation_generator)
            last = micro_batch == accumulation - 1
            # Gradients are all-reduced once per optimizer step, on its last micro-batch.
            synchronisation = contextlib.nullcontext() if last else accelerator.no_sync(self.student)
            with synchronisation:
                with accelerator.autocast():
                    temperature: float | torch.Tensor = teacher_temp
                    if arguments.torch_compile:
                        temperature = self._teacher_temp_tensor.fill_(teacher_temp)
                    if self._cuda_graphs:
                        torch.compiler.cudagraph_mark_step_begin()
                    loss, teacher_output = self._forward_and_loss(crops, temperature)
                    if self._cuda_graphs:  # out of the graphs' memory, which the next replay overwrites
                        loss, teacher_output = loss.clone(), teacher_output.clone()
                accelerator.backward(loss)  # divided by the accumulation steps inside
            teacher_outputs.append(teacher_output.detach())
            total_loss += loss.detach()

        if arguments.clip_grad:
            if accelerator.scaler is not None:
                accelerator.unscale_gradients(self.optimizer)
            if arguments.clip_grad_mode == "global":
                accelerator.clip_grad_norm_(self.trainable_parameters, arguments.clip_grad)
            else:
                clip_gradients_per_parameter(self.trainable_parameters, arguments.clip_grad)
        if epoch < arguments.freeze_last_layer:
            cancel_last_layer_gradients(self.unwrapped_student)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        # The momentum teacher and the center move once per optimizer step, from the whole effective batch.
        update_teacher(self.teacher_parameters, self.student_parameters, values["teacher_momentum"])
        step_loss = total_loss / accumulation
        device_values = collapse_statistics_on_device(
            loss=step_loss,
            teacher_output=torch.cat(teacher_outputs) if len(teacher_outputs) > 1 else teacher_outputs[0],
            center=self.loss_fn.center,
            teacher_temp=teacher_temp,
        )
        self.loss_fn.update_center(teacher_outputs)
        record = {
            "step": step + 1,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch + 1,
            "images_seen": (step + 1) * self.total_batch_size,
            **values,
        }
        self.recorder.record(record, device_values)
        return record

    def _eager_forward_and_loss(
        self, crops: list[torch.Tensor], teacher_temp: float | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher on the global crops, student on all crops, and the DINO loss: (loss, teacher output)."""
        with torch.no_grad():
            teacher_output = self.teacher(crops[:2])  # the teacher sees only the global crops
        student_output = self.student(crops)
        loss = self.loss_fn.compute(
            student_output=student_output, teacher_output=teacher_output, teacher_temp=teacher_temp
        )
        return loss, teacher_output

    def _log(self, recorder: MetricsRecorder, progress: Any) -> None:
        records = recorder.flush()  # raises NonFiniteLossError on a NaN loss
        if not records:
            return
        last = records[-1]
        progress.set_postfix(
            loss=f"{last['loss']:.4f}",
            lr=f"{last['lr']:.2e}",
            entropy=f"{last['teacher_entropy']:.2f}",
            refresh=False,
        )
        if self.accelerator.trackers:
            for record in records:
                self.accelerator.log(
                    {
                        f"train/{key}": value
                        for key, value in record.items()
                        if isinstance(value, (int, float))
                    },
                    step=record["step"],
                )

    # ---------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(
        self, *, name: str | None = None, model: nn.Module | None | str = "teacher"
    ) -> dict[str, Any] | None:
        """Weighted k-NN (paper §4.1) of frozen features on the evaluation set; logged and saved in eval/.

        Args:
            name: the record's name (default `step-N`).
            model: "teacher" (the current teacher), None (raw pixels) or a module.
        """
        data = self.evaluation_data or self._load_evaluation_data()
        if data is None:
            return None
        evaluated = self.unwrapped_teacher.model if model == "teacher" else model
        # Under FSDP the inner model's top-level weights (embeddings, final norm, head) belong to the root
        # unit, whose hooks a call of the inner model skips: gather them for the evaluation (every process
        # takes part; the blocks gather themselves).
        gathered = self.is_fsdp and model == "teacher"
        if gathered:
            # FSDP2 settles which unit is the root at the root's first forward, and refuses one after a block
            # has run alone; the evaluation before step 1 would be such a run, so settle it first (a no-op
            # later).
            self.teacher._get_fsdp_state()._lazy_init()
            self.teacher.unshard()
        try:
            results = knn_accuracy(
                evaluated,
                data,
                k=self.arguments.knn_k,
                temperature=self.arguments.knn_temperature,
                mixed_precision=self.mixed_precision,
            )
        finally:
            if gathered:
                self.teacher.reshard()
        if model == "teacher":
            self.teacher.train()  # feature extraction switched it to eval mode
        name = name or f"step-{self.step:08d}"
        if self.accelerator.is_main_process:
            logger.info("k-NN %s: top-1 %.2f%%, top-5 %.2f%%", name, results["top1"], results["top5"])
            with open(self.output_dir / "metrics.jsonl", "a") as handle:
                record = {
                    "step": self.step,
                    "knn": results,
                    "evaluated": name,
                    "elapsed_seconds": self._elapsed(),
                }
                handle.write(json.dumps(record) + "\n")
            self._write_evaluation_record(results, data, name)
            if self.accelerator.trackers and model == "teacher":
                self.accelerator.log(
                    {"eval/knn_top1": results["top1"], "eval/knn_top5": results["top5"]}, step=self.step
                )
        return results

    def evaluate_baselines(self) -> dict[str, dict[str, float]]:
        """k-NN of raw pixels and of the network at its random initialisation (the teacher before step 1).

        Written to eval/knn-raw-pixels.json and eval/knn-random-init.json; on a resumed run they are read back.
        """
        baselines: dict[str, dict[str, float]] = {}
        for name in ("raw-pixels", "random-init"):
            path = self.output_dir / "eval" / f"knn-{name}.json"
            if self.step > 0 and path.is_file():
                baselines[name] = json.loads(path.read_text())["results"]
            elif self.step == 0:
                baselines[name] = self.evaluate(name=name, model=None if name == "raw-pixels" else "teacher")
        return baselines

    def _load_evaluation_data(self) -> EvaluationData | None:
        if not self.arguments.eval_dataset:
            return None
        self.evaluation_data = load_evaluation_data(
            self.arguments,
            num_channels=self.model_config.backbone_config.num_channels,
            augmentation_config=self.augmentation_config,
        )
        return self.evaluation_data

    def _write_evaluation_record(self, results: dict[str, Any], data: EvaluationData, name: str) -> None:
        try:
            from hf_dino.evaluation.records import evaluation_record, write_evaluation_record
        except ImportError:  # evaluation package not available: keep the numbers in metrics.jsonl only
            return
        record = evaluation_record(
            protocol="knn",
            parameters={
                "k": self.arguments.knn_k,
                "temperature": self.arguments.knn_temperature,
                "features": "raw pixels"
                if name == "raw-pixels"
                else "teacher CLS (final norm), L2-normalised",
                "online": True,
            },
            dataset=data.description,
            model={"path": str(self.output_dir), "revision": None, "step": self.step},
            results=results,
        )
        write_evaluation_record(self.output_dir / "eval" / f"knn-{name}.json", record)

    # -------------------------------------------------------------------------------------- checkpoints
    def trainer_state(self, elapsed: float) -> dict[str, Any]:
        epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
        return {
            "step": self.step,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            # Map-style data: the position is the step (see data_pipeline); recorded explicitly for readers.
            "data_position": {"epoch": epoch, "images_into_epoch": step_in_epoch * self.total_batch_size},
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "total_batch_size": self.total_batch_size,
            "num_processes": self.accelerator.num_processes,
            "elapsed_seconds": elapsed,
            "seed": self.arguments.seed,
        }

    def save_checkpoint(self, elapsed: float = 0.0) -> Path:
        """Write `checkpoints/step-N` atomically (every process takes part; the main process publishes)."""
        accelerator = self.accelerator
        directory = self.output_dir / checkpointing.CHECKPOINTS_DIRECTORY
        final = directory / checkpointing.checkpoint_name(self.step)
        temporary = directory / f".tmp-{final.name}"
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir(parents=True)
        accelerator.wait_for_everyone()
        student_state = accelerator.get_state_dict(self.student, unwrap=True) if self.is_fsdp else None
        teacher_state = accelerator.get_state_dict(self.teacher, unwrap=True) if self.is_fsdp else None
        if accelerator.is_main_process:
            self.unwrapped_student.model.save_pretrained(
                temporary / "student", state_dict=_strip_prefix(student_state), safe_serialization=True
            )
            self.unwrapped_teacher.model.save_pretrained(
                temporary / "teacher", state_dict=_strip_prefix(teacher_state), safe_serialization=True
            )
            checkpointing.save_center(self.loss_fn.center, temporary / checkpointing.CENTER_FILE)
        if self.is_fsdp:  # the sharded optimizer checkpoint needs a state for the frozen last layer too
            complete_optimizer_state(getattr(self.optimizer, "optimizer", self.optimizer))
        accelerator.save_state(str(temporary / "training_state"))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            # trainer_state.json last: its presence marks a complete checkpoint.
            checkpointing.write_json_atomically(
                temporary / checkpointing.TRAINER_STATE_FILE, self.trainer_state(elapsed)
            )
            checkpointing.publish_checkpoint(temporary, final, self.arguments.save_total_limit)
            logger.info("saved checkpoint %s", final)
            if self.pusher is not None:
                self.pusher.submit(self.output_dir, commit_message=f"Checkpoint at step {self.step}")
        accelerator.wait_for_everyone()
        return final

    def _resume_source(self, resume: str) -> Path | None:
        if resume != "auto" and not Path(resume).expanduser().exists():
            try:
                from hf_dino.hub import resolve_resume_checkpoint
            except ImportError:
                resolve_resume_checkpoint = None
            if resolve_resume_checkpoint is not None:
                return resolve_resume_checkpoint(resume)
        return checkpointing.resolve_resume_source(resume, self.output_dir)

    def _load_checkpoint(self, checkpoint: Path) -> None:
        """Restore weights, center, optimizer, scaler, RNG states and position from a checkpoint."""
        state = checkpointing.read_trainer_state(checkpoint)
        if self.is_fsdp:
            # accelerate's training_state/ restores the student (a prepared model); the teacher, sharded
            # outside `prepare`, is restored from its full weights, each process keeping its own shards.
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            full_state = checkpointing.read_model_weights(checkpoint / "teacher")
            set_model_state_dict(
                self.teacher,
                {f"model.{key}": value.to(self.device) for key, value in full_state.items()},
                options=StateDictOptions(full_state_dict=True, strict=True),
            )
        else:
            checkpointing.load_model_weights(self.unwrapped_student.model, checkpoint / "student")
            checkpointing.load_model_weights(self.unwrapped_teacher.model, checkpoint / "teacher")
        self.loss_fn.center.copy_(
            checkpointing.load_center(checkpoint / checkpointing.CENTER_FILE).to(self.device)
        )
        if state.get("total_batch_size") not in (None, self.total_batch_size):
            logger.warning(
                "resuming with a total batch of %d where the checkpoint used %d: the data order and schedules "
                "differ from the original run",
                self.total_batch_size,
                state["total_batch_size"],
            )
        if state.get("num_processes", 1) != self.accelerator.num_processes:
            logger.warning(
                "the checkpoint was written by %s processes; RNG streams will differ", state["num_processes"]
            )
        self.accelerator.load_state(str(checkpoint / "training_state"))
        self.step = int(state["step"])
        self.elapsed_before_resume = float(state.get("elapsed_seconds", 0.0))
        if self.accelerator.is_main_process:
            logger.info("resumed from %s at step %d", checkpoint, self.step)
            metrics = self.output_dir / "metrics.jsonl"
            if metrics.is_file():  # drop lines written after the checkpoint by the interrupted run
                _truncate_metrics(metrics, self.step)

    def save_final_teacher(self) -> Path:
        """`OUTPUT_DIR/teacher/`: the final teacher (save_pretrained) and `dino_center.safetensors`."""
        accelerator = self.accelerator
        target = self.output_dir / "teacher"
        teacher_state = accelerator.get_state_dict(self.teacher, unwrap=True) if self.is_fsdp else None
        if accelerator.is_main_process:
            temporary = self.output_dir / ".tmp-teacher"
            shutil.rmtree(temporary, ignore_errors=True)
            self.unwrapped_teacher.model.save_pretrained(
                temporary, state_dict=_strip_prefix(teacher_state), safe_serialization=True
            )
            checkpointing.save_center(self.loss_fn.center, temporary / checkpointing.CENTER_FILE)
            checkpointing.fsync_tree(temporary)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(temporary, target)
            logger.info("saved the final teacher to %s", target)
        accelerator.wait_for_everyone()
        return target

    # -------------------------------------------------------------------------------------------- helpers
    def _initialise_from(self, source: str, student: nn.Module, teacher: nn.Module) -> torch.Tensor | None:
        """Continued pretraining: weights (and center) from a converted official checkpoint or a checkpoint."""
        folder = Path(source).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"--init-from {source}: no such folder")
        if (folder / "student").is_dir() and (folder / "teacher").is_dir():
            checkpointing.load_model_weights(student, folder / "student")
            checkpointing.load_model_weights(teacher, folder / "teacher")
        else:
            checkpointing.load_model_weights(teacher, folder)
            student.load_state_dict(teacher.state_dict())
        center_path = folder / checkpointing.CENTER_FILE
        if not center_path.is_file() and (folder / "teacher" / checkpointing.CENTER_FILE).is_file():
            center_path = folder / "teacher" / checkpointing.CENTER_FILE
        if center_path.is_file():
            center = checkpointing.load_center(center_path)
            if center.shape[-1] != self.model_config.out_dim:
                raise ValueError(
                    f"{center_path} has {center.shape[-1]} dimensions, the head {self.model_config.out_dim}"
                )
            return center
        logger.warning("--init-from %s: no %s, the center starts at 0", source, checkpointing.CENTER_FILE)
        return None

    def _write_training_config(self) -> None:
        if not self.accelerator.is_main_process:
            return
        device_name = str(self.device)
        if self.device.type == "cuda":
            device_name = torch.cuda.get_device_name(self.device)
        from hf_dino import __version__

        content = {
            "training_arguments": self.arguments.to_dict(),
            "model_config": self.model_config.to_dict(),
            "augmentation": self.augmentation_config.to_dict() if self.augmentation_config else None,
            "dataset": self.arguments.dataset,
            "dataset_split": self.arguments.dataset_split,
            "num_examples": self.num_examples,
            "num_processes": self.accelerator.num_processes,
            "total_batch_size": self.total_batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "base_learning_rate": self.schedules.base_learning_rate,
            "mixed_precision": self.mixed_precision,
            "distributed_type": str(self.accelerator.distributed_type),
            "hardware": device_name,
            "torch_version": torch.__version__,
            "hf_dino_version": __version__,
        }
        checkpointing.write_json_atomically(self.output_dir / "training_config.json", make_json_safe(content))

    def _make_pusher(self) -> Any:
        if not self.arguments.push_to_hub or not self.accelerator.is_main_process:
            return None
        try:
            from hf_dino.hub import BackgroundPusher
        except ImportError:
            logger.warning("--push-to-hub needs hf_dino.hub; nothing will be pushed")
            return None
        return BackgroundPusher(self.arguments.push_to_hub)


class _SeededAugmentation:
    """(image, epoch, index) -> crops, with the augmentation seeded by `(seed, epoch, index)`."""

    def __init__(self, augmentation: Any, seed: int) -> None:
        self.augmentation = augmentation
        self.seed = seed

    def __call__(self, image: Any, epoch: int, index: int) -> list[torch.Tensor]:
        return list(self.augmentation(image, seed=example_seed(self.seed, epoch, index)))


def _is_streamed(dataset: Any) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(dataset, datasets.IterableDataset)


def _decoder(image_mode: str) -> Any:
    """Robust decoding (corrupt or truncated files become None, counted in the log by hf_dino.data)."""

    def decode(value: Any) -> Any:
        from hf_dino.data import decode_image

        image, reason = decode_image(value, image_mode=image_mode)
        if image is None:
            logger.warning("skipped an image that cannot be used (%s)", reason)
        return image

    return decode


def _has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(child, nn.modules.batchnorm._BatchNorm) for child in module.modules())


def _strip_prefix(state_dict: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    """`MultiCropNetwork` state dict keys (`model.x`) -> `DinoModel` keys (`x`)."""
    if state_dict is None:
        return None
    return {key.removeprefix("model."): value for key, value in state_dict.items()}


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics lines of steps up to `step` (a resumed run rewrites the ones after)."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the crash
    checkpointing_text = "\n".join(kept) + ("\n" if kept else "")
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(checkpointing_text)
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------------- data loading


def load_training_images(arguments: DinoTrainingArguments) -> tuple[Any, str | None]:
    """The images to train on as a map-style dataset, and the column that holds them."""
    from hf_dino import data

    if arguments.dataset in (None, "", "embedded", data.EMBEDDED_DATASET):
        dataset = data.load_embedded_dataset(arguments.dataset_split)
    else:
        # Local files are read as a map-style dataset (random access: exact data order and resume); Hub ids
        # and remote files are streamed.
        local = Path(arguments.dataset).expanduser().exists() or arguments.dataset == data.FULL_FASHION_MNIST
        dataset = data.load_image_dataset(
            arguments.dataset,
            split=arguments.dataset_split,
            streaming=not local,
            image_column=arguments.image_column,
        )
    image_column = arguments.image_column
    if image_column is None and hasattr(dataset, "column_names"):
        from hf_dino.evaluation.features import detect_image_column

        image_column = detect_image_column(dataset)
    return dataset, image_column


def train(arguments: DinoTrainingArguments, **trainer_kwargs: Any) -> dict[str, Any]:
    """Build a `DinoTrainer` for the recipe and run it. Returns the run's summary."""
    trainer = DinoTrainer(arguments, **trainer_kwargs)
    trainer.setup()
    return trainer.train()
