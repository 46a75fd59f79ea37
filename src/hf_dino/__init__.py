"""hf_dino: DINO self-supervised pretraining, native to the Hugging Face stack.

Importing the package registers `DinoConfig` / `DinoModel` with transformers' Auto classes, and marks them to
save their code next to checkpoints so that `AutoModel.from_pretrained(..., trust_remote_code=True)` works
where hf_dino is not installed.
"""

__version__ = "0.1.0"

from transformers import AutoConfig, AutoModel

from hf_dino.configuration_dino import DinoConfig
from hf_dino.modeling_dino import DinoHead, DinoModel, DinoModelOutput

AutoConfig.register(DinoConfig.model_type, DinoConfig, exist_ok=True)
AutoModel.register(DinoConfig, DinoModel, exist_ok=True)
DinoConfig.register_for_auto_class()
DinoModel.register_for_auto_class("AutoModel")

__all__ = ["DinoConfig", "DinoHead", "DinoModel", "DinoModelOutput", "__version__"]
