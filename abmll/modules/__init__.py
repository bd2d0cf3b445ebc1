from abmll.modules.gaussian_lora import (
    DEFAULT_C,
    DEFAULT_SAMPLING,
    GaussianLoRALinear,
    PAIRS,
    PHI_PAIRS,
    THETA_PAIRS,
    gaussian_lora_modules,
    gaussian_mode,
    set_c_from_base_weights,
    set_gaussian_mode,
)

__all__ = [
    "DEFAULT_C",
    "DEFAULT_SAMPLING",
    "GaussianLoRALinear",
    "PAIRS",
    "PHI_PAIRS",
    "THETA_PAIRS",
    "gaussian_lora_modules",
    "gaussian_mode",
    "set_c_from_base_weights",
    "set_gaussian_mode",
]
