"""hf_vlm: vision-language models with a Mamba language model, trained with the HF Trainer."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .configuration_mamba_vlm import MambaVLMConfig
from .modeling_mamba_vlm import MambaVLMForConditionalGeneration
from .processing_mamba_vlm import MambaVLMProcessor, register_processor

__version__ = "0.1.0"

AutoConfig.register(MambaVLMConfig.model_type, MambaVLMConfig, exist_ok=True)
AutoModel.register(MambaVLMConfig, MambaVLMForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(MambaVLMConfig, MambaVLMForConditionalGeneration, exist_ok=True)
register_processor(MambaVLMConfig)

__all__ = ["MambaVLMConfig", "MambaVLMForConditionalGeneration", "MambaVLMProcessor", "__version__"]
