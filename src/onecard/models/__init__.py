"""Model folders, architecture configs and onecard's own Llama-family forward."""

from onecard.models.arch import arch_config, builtin_archs, scale_config
from onecard.models.config import SUPPORTED_ARCHITECTURES, ModelArgs
from onecard.models.folder import ModelFolder, open_model_folder

__all__ = ["SUPPORTED_ARCHITECTURES", "ModelArgs", "ModelFolder", "arch_config", "builtin_archs", "open_model_folder",
           "scale_config"]
