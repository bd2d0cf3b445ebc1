from abmll.modules.gaussian_lora import (
    GaussianLoRALinear,
    PAIRS,
    PHI_PAIRS,
    THETA_PAIRS,
    gaussian_lora_modules,
    set_gaussian_mode,
)

__all__ = [
    "GaussianLoRALinear",
    "PAIRS",
    "PHI_PAIRS",
    "THETA_PAIRS",
    "gaussian_lora_modules",
    "set_gaussian_mode",
]
