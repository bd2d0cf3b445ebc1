from abmll.models._gaussian import DEFAULT_LORA_ATTN_MODULES, add_gaussian_lora
from abmll.models.llama3 import (
    gaussian_lora_llama3_1_8b,
    gaussian_lora_llama3_2_1b,
    gaussian_lora_llama3_2_3b,
    gaussian_lora_llama3_8b,
    gaussian_lora_qwen2_7b,
)
from abmll.models.smollm2 import (
    SmolLM2Checkpointer,
    SmolLM2Tokenizer,
    gaussian_lora_smollm2_135m,
    lora_smollm2_135m,
    smollm2_135m,
    smollm2_tokenizer,
)
from abmll.models.tiny import (
    TinyByteTokenizer,
    gaussian_lora_tiny_llama,
    gaussian_lora_tiny_qwen2,
    lora_tiny_llama,
    lora_tiny_qwen2,
    tiny_llama,
    tiny_qwen2,
    tiny_tokenizer,
)

__all__ = [
    "SmolLM2Checkpointer",
    "SmolLM2Tokenizer",
    "gaussian_lora_smollm2_135m",
    "lora_smollm2_135m",
    "smollm2_135m",
    "smollm2_tokenizer",
    "DEFAULT_LORA_ATTN_MODULES",
    "TinyByteTokenizer",
    "add_gaussian_lora",
    "gaussian_lora_llama3_1_8b",
    "gaussian_lora_llama3_2_1b",
    "gaussian_lora_llama3_2_3b",
    "gaussian_lora_llama3_8b",
    "gaussian_lora_qwen2_7b",
    "gaussian_lora_tiny_llama",
    "gaussian_lora_tiny_qwen2",
    "lora_tiny_llama",
    "lora_tiny_qwen2",
    "tiny_llama",
    "tiny_qwen2",
    "tiny_tokenizer",
]
