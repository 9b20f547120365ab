"""hf_vlm: vision-language models with a Mamba language model, trained with the HF Trainer.

`import hf_vlm` registers the model with `AutoConfig`, `AutoModel`,
`AutoModelForImageTextToText` and `AutoProcessor`, so saved checkpoints load through the
Auto classes. Training pieces live in `hf_vlm.training`, data pieces in `hf_vlm.data`,
report metrics in `hf_vlm.metrics`, the pure-PyTorch selective scan in `hf_vlm.ops`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .configuration_mamba_vlm import MambaVLMConfig
from .data.collator import IGNORE_INDEX, DataCollatorForMambaVLM, PromptTooLongError
from .inference import generate_reports
from .modeling_mamba_vlm import MambaVLMForConditionalGeneration
from .processing_mamba_vlm import MambaVLMProcessor, register_processor

__version__ = "0.1.0"

AutoConfig.register(MambaVLMConfig.model_type, MambaVLMConfig, exist_ok=True)
AutoModel.register(MambaVLMConfig, MambaVLMForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(MambaVLMConfig, MambaVLMForConditionalGeneration, exist_ok=True)
register_processor(MambaVLMConfig)

__all__ = [
    "IGNORE_INDEX",
    "DataCollatorForMambaVLM",
    "MambaVLMConfig",
    "MambaVLMForConditionalGeneration",
    "MambaVLMProcessor",
    "PromptTooLongError",
    "__version__",
    "generate_reports",
]
