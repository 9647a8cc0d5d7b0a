"""nanochat, native to the Hugging Face ecosystem."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_nanochat import NanoChatConfig
from .modeling_nanochat import NanoChatForCausalLM, NanoChatModel, NanoChatPreTrainedModel

# `save_pretrained` then writes `auto_map` and copies the two code files, so a saved folder loads anywhere with
# `trust_remote_code=True`; the local registration lets this package load it without that flag.
NanoChatConfig.register_for_auto_class()
NanoChatModel.register_for_auto_class("AutoModel")
NanoChatForCausalLM.register_for_auto_class("AutoModelForCausalLM")
AutoConfig.register(NanoChatConfig.model_type, NanoChatConfig, exist_ok=True)
AutoModel.register(NanoChatConfig, NanoChatModel, exist_ok=True)
AutoModelForCausalLM.register(NanoChatConfig, NanoChatForCausalLM, exist_ok=True)

__all__ = ["NanoChatConfig", "NanoChatForCausalLM", "NanoChatModel", "NanoChatPreTrainedModel"]
__version__ = "0.1.0"
