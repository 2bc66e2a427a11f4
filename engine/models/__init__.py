"""Model code: checkpoint config, the shared decoder, and the safetensors loader."""

from engine.models.config import ModelConfig, load_model_config
from engine.models.loader import load_model, resolve_dtype
from engine.models.transformer import CausalLM, ForwardContext

__all__ = ["CausalLM", "ForwardContext", "ModelConfig", "load_model", "load_model_config", "resolve_dtype"]
