"""DINO attention maps: a Gradio Space showing what a self-supervised ViT looks at.

Upload an image (or pick an example), choose a checkpoint and a resolution, and see the last block's CLS
self-attention of every head, their mean, the masks keeping 60% of each head's attention mass (paper §4.2.1)
and, optionally, the first three principal components of the patch features.

Run locally:   python spaces/app.py            (http://127.0.0.1:7860)
Checkpoints:   HF_DINO_MODELS="facebook/dino-vits8,you/your-dino-model,/path/to/folder" python spaces/app.py

The rendering code is `hf_dino.attention`: imported from hf_dino when it is installed, otherwise from the copy
of that file placed next to this one by `spaces/build_space.py` (see README.md).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

try:
    from hf_dino import attention
except ImportError:  # on the Hub: the copy uploaded beside app.py
    import attention  # type: ignore[no-redef]

logger = logging.getLogger("hf_dino.space")

# The released DINO ViTs, stock transformers checkpoints (no remote code needed). ViT-S first: fast on a CPU.
DEFAULT_MODELS = (
    "facebook/dino-vits8",
    "facebook/dino-vits16",
    "facebook/dino-vitb8",
    "facebook/dino-vitb16",
)
# Short side of the model input. The paper's figures use 480, but the cost grows with the square of the
# token count: on 2 CPU cores ViT-S/8 takes a few seconds at 224 and about ten times as long at 480.
RESOLUTIONS = (224, 320, 480)
DEFAULT_RESOLUTION = 224
# Tiles of the pictures shown in the page (the download holds them at the model's input size).
DISPLAY_TILE_SIDE = 320
# Requests computed at once; the rest wait in the queue (each forward already uses every CPU core).
CONCURRENCY_LIMIT = 2
QUEUE_SIZE = 32
MAX_UPLOAD_SIZE = "25mb"
# Downloads older than this are deleted as new ones are written.
DOWNLOAD_LIFETIME_SECONDS = 3600

TITLE = "DINO attention maps"
DESCRIPTION = """\
Self-supervised vision transformers trained with **DINO** learn to separate objects from the background
without a single label (Caron et al., *Emerging Properties in Self-Supervised Vision Transformers*,
ICCV 2021). This Space shows the **last layer's self-attention of the CLS token** for every head, the mean
over heads, the **masks that keep 60% of each head's attention mass** (paper Fig. 3) and the first three
principal components of the patch features as colours.
"""

CSS = """
.gradio-container { max-width: 1280px !important; margin: auto; }
#header h1 { margin-bottom: 0.2em; }
#timing { min-height: 2.5em; }
.figure-caption p { margin: 0.6em 0 -0.4em 0; }
"""


def configured_models() -> list[str]:
    """Checkpoints offered: `HF_DINO_MODELS` (comma-separated repo ids or local paths), else the defaults."""
    value = os.environ.get("HF_DINO_MODELS", "")
    models = [entry.strip() for entry in value.split(",") if entry.strip()]
    return models or list(DEFAULT_MODELS)


def _model_label(name: str) -> str:
    path = Path(name)
    return f"{path.name} (local)" if path.is_dir() else name


class ModelCache:
    """Checkpoints loaded on first use and kept; concurrent first requests for one model load it once."""

    def __init__(self, allowed: list[str]) -> None:
        self.allowed = list(allowed)
        self._models: dict[str, attention.AttentionModel] = {}
        self._locks = {name: threading.Lock() for name in self.allowed}

    def get(self, name: str) -> tuple[attention.AttentionModel, float]:
        """The model and the seconds spent loading it now (0 when it was cached)."""
        if name not in self._locks:
            # Only configured checkpoints: loading arbitrary repos would run arbitrary remote code.
            raise gr.Error(f"Unknown checkpoint {name!r}; pick one from the list.", print_exception=False)
        with self._locks[name]:
            if name in self._models:
                return self._models[name], 0.0
            start = time.perf_counter()
            try:
                model = attention.load_attention_model(name)
            except ValueError as error:
                raise gr.Error(f"{name} cannot show attention maps: {error}") from None
            except Exception as error:  # network, missing files, incompatible weights, ...
                logger.exception("loading %s failed", name)
                raise gr.Error(f"Could not load the checkpoint {name}: {error}") from None
            self._models[name] = model
            return model, time.perf_counter() - start


def with_clear_upload_errors(image: gr.Image) -> gr.Image:
    """Make an image input report unreadable uploads (not an image, corrupt, too large) as clear messages.

    `gr.Image` opens the upload with Pillow before the event function runs; a failure there would show as a
    bare "Error". Wrapping this one component's `preprocess` turns it into a `gr.Error` saying what is wrong,
    and the server keeps serving. (A `gr.Image` subclass would do the same, but Gradio writes a `.pyi` stub
    next to the source file of every component subclass.)
    """
    original_preprocess = image.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return original_preprocess(payload)
        except gr.Error:
            raise
        except Exception as error:
            name = getattr(payload, "orig_name", None) or "The file"
            message = None
            try:  # hf_dino's loader says what is wrong the way it does for every other input
                attention.load_image(payload.path, name=name)
            except attention.ImageLoadError as load_error:
                message = str(load_error)
            except Exception:
                pass
            raise gr.Error(
                message or f"{name} could not be read as an image ({error}).", print_exception=False
            ) from None

    image.preprocess = preprocess  # type: ignore[method-assign]
    return image


def _prune_downloads(folder: Path) -> None:
    cutoff = time.time() - DOWNLOAD_LIFETIME_SECONDS
    for path in folder.glob("*.zip"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:
            pass


def _write_download(
    folder: Path,
    stem: str,
    analysis: attention.AttentionAnalysis,
    figures: dict[str, Any],
    info: dict[str, Any],
) -> Path:
    """Zip the full-size pictures, the raw maps (.npy) and the settings (JSON) for the download button."""
    _prune_downloads(folder)
    target = Path(tempfile.mkstemp(prefix=f"{stem}_attention_", suffix=".zip", dir=folder)[1])
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for kind, figure in figures.items():
            archive.writestr(f"{stem}_{kind}.png", _png_bytes(figure))
        archive.writestr(f"{stem}_input.png", _png_bytes(analysis.image))
        archive.writestr(f"{stem}_attention_maps.npy", _npy_bytes(analysis.attention_maps))
        archive.writestr(f"{stem}_masks.npy", _npy_bytes(analysis.masks))
        archive.writestr(f"{stem}_info.json", json.dumps(info, indent=2))
    return target


def _png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _summary(info: dict[str, Any], notes: list[str]) -> str:
    """The line above the pictures: time taken, checkpoint, grid, and what was done to the input."""
    height, width = info["patch_grid"]
    timing = f"model {info['seconds_model']:.2f} s, drawing {info['seconds_drawing']:.2f} s"
    if info["seconds_loading"]:
        timing += f", loading the checkpoint {info['seconds_loading']:.1f} s"
    lines = [
        f"**{info['seconds_total']:.2f} s** ({timing}) · {_model_label(info['model'])} · "
        f"{info['heads']} heads · "
        f"input {info['input_size'][0]}×{info['input_size'][1]} px = {width}×{height} patches of "
        f"{info['patch_size']} px"
    ]
    if notes:
        lines.append("Input: " + "; ".join(notes) + ".")
    return "\n\n".join(lines)


def _figure(caption: str, element_id: str) -> gr.Image:
    """An output picture under a caption (kept off the image, whose tiles carry their own labels)."""
    gr.Markdown(f"**{caption}**", elem_classes=["figure-caption"])
    return gr.Image(
        show_label=False,
        type="pil",
        format="png",
        interactive=False,
        buttons=["download", "fullscreen"],
        elem_id=element_id,
    )


def build_demo(
    models: list[str] | None = None, *, download_dir: str | os.PathLike | None = None
) -> gr.Blocks:
    """Build the page.

    Args:
        models: checkpoints to offer (repo ids or local folders); default `configured_models()`.
        download_dir: where download zips are written (default: a fresh temporary folder).

    Returns:
        the `gr.Blocks` app (call `.launch()`).
    """
    models = list(models) if models else configured_models()
    cache = ModelCache(models)
    downloads = Path(download_dir) if download_dir else Path(tempfile.mkdtemp(prefix="hf_dino_space_"))
    downloads.mkdir(parents=True, exist_ok=True)

    def compute(
        image_path: str | None, model_name: str, resolution: int, mass_percent: float, show_pca: bool
    ) -> tuple[Any, Any, Any, Any, Any, str | None, str]:
        if not image_path:
            raise gr.Error("Upload an image or pick one of the examples first.", print_exception=False)
        if int(resolution) not in RESOLUTIONS:
            raise gr.Error(
                f"Resolution must be one of {', '.join(map(str, RESOLUTIONS))}.", print_exception=False
            )
        if not 10 <= float(mass_percent) <= 95:
            raise gr.Error("The mask mass must be between 10% and 95%.", print_exception=False)
        start = time.perf_counter()
        model, seconds_loading = cache.get(model_name)
        try:
            analysis = attention.analyze_image(
                model,
                image_path,
                resolution=int(resolution),
                mass=float(mass_percent) / 100,
                with_pca=show_pca,
            )
        except attention.ImageLoadError as error:
            raise gr.Error(str(error), print_exception=False) from None
        except (RuntimeError, MemoryError) as error:  # e.g. out of memory
            logger.exception("analysis failed")
            raise gr.Error(f"The model could not process this image: {error}") from None
        drawing_start = time.perf_counter()
        shown = attention.render_figures(analysis, tile_long_side=DISPLAY_TILE_SIDE)
        full_size = attention.render_figures(analysis)
        seconds_drawing = time.perf_counter() - drawing_start
        input_width, input_height = analysis.image.size
        info = {
            "model": model_name,
            "heads": int(analysis.attention_maps.shape[0]),
            "patch_size": analysis.patch_size,
            "patch_grid": list(analysis.grid_hw),
            "input_size": [input_width, input_height],
            "resolution": int(resolution),
            "mass": analysis.mass,
            "notes": analysis.notes,
            "seconds_loading": round(seconds_loading, 3),
            "seconds_model": round(analysis.seconds, 3),
            "seconds_drawing": round(seconds_drawing, 3),
            "seconds_total": round(time.perf_counter() - start, 3),
        }
        stem = "".join(character if character.isalnum() else "_" for character in Path(image_path).stem)[:40]
        download = _write_download(downloads, stem or "image", analysis, full_size, info)
        if any(note.startswith("small image") for note in analysis.notes):
            gr.Warning("The image is small: it was upscaled, so the maps may be coarse.")
        return (
            shown["heads"],
            shown["mean"],
            shown["masks"],
            shown.get("pca"),
            gr.Column(visible=show_pca),
            str(download),
            _summary(info, analysis.notes),
        )

    examples = [str(path) for path in attention.example_images()]
    with gr.Blocks(title=TITLE, delete_cache=(1800, 3600)) as demo:
        gr.Markdown(f"# {TITLE}\n{DESCRIPTION}", elem_id="header")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                image_input = gr.Image(
                    label="Image",
                    type="filepath",
                    image_mode=None,  # keep the file as uploaded: hf_dino converts every mode itself
                    sources=["upload", "clipboard"],
                    height=300,
                    elem_id="input-image",
                )
                with_clear_upload_errors(image_input)
                model_input = gr.Dropdown(
                    choices=[(_model_label(name), name) for name in models],
                    value=models[0],
                    label="Checkpoint",
                    info="Loaded on first use, then cached.",
                )
                resolution_input = gr.Radio(
                    choices=list(RESOLUTIONS),
                    value=DEFAULT_RESOLUTION,
                    label="Resolution (short side, px)",
                    info="Higher shows finer maps but is slower on a CPU (480 takes ~10x as long as 224); "
                    "the paper uses 480.",
                )
                with gr.Accordion("Options", open=False):
                    mass_input = gr.Slider(
                        10,
                        95,
                        value=attention.DEFAULT_MASS * 100,
                        step=5,
                        label="Mask: attention mass kept (%)",
                    )
                    pca_input = gr.Checkbox(value=True, label="Patch-feature PCA (first 3 components as RGB)")
                run_button = gr.Button("Show attention", variant="primary", elem_id="run-button")
                if examples:
                    gr.Examples(
                        examples=examples, inputs=[image_input], label="Examples", examples_per_page=6
                    )
            with gr.Column(scale=2, min_width=480):
                timing = gr.Markdown("Upload an image and press **Show attention**.", elem_id="timing")
                heads_output = _figure("Attention of each head (last layer, CLS query)", "heads-output")
                masks_output = _figure("Masks keeping the top attention mass of each head", "masks-output")
                with gr.Row(equal_height=True):
                    with gr.Column(min_width=200):
                        mean_output = _figure("Mean attention over heads", "mean-output")
                    with gr.Column(min_width=200) as pca_column:
                        pca_output = _figure(
                            "Patch features: first 3 principal components as RGB", "pca-output"
                        )
                download_output = gr.File(label="Download: full-size PNGs, maps as .npy, settings")
        gr.Markdown(
            "Maps are the softmax attention of the CLS query over the patches in the last block, "
            "min-max scaled per head and upsampled by patch (nearest), as in the paper's figures. "
            "Built with hf_dino on Hugging Face transformers."
        )

        run_button.click(
            compute,
            inputs=[image_input, model_input, resolution_input, mass_input, pca_input],
            outputs=[
                heads_output,
                mean_output,
                masks_output,
                pca_output,
                pca_column,
                download_output,
                timing,
            ],
            api_name="attention",
            concurrency_limit=CONCURRENCY_LIMIT,
        )
    demo.queue(max_size=QUEUE_SIZE)
    return demo


def launch_options() -> dict[str, Any]:
    """Settings passed to `launch()` (Gradio 6 takes the theme and CSS here, not in `gr.Blocks`)."""
    return {
        "theme": gr.themes.Soft(primary_hue="indigo", secondary_hue="violet"),
        "css": CSS,
        "max_file_size": MAX_UPLOAD_SIZE,
    }


demo = build_demo()

if __name__ == "__main__":
    demo.launch(**launch_options())
