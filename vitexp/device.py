"""The training device and its number format: every choice that asks what the hardware can do.

Kept apart from the loop so that the few calls into CUDA-only APIs sit in one place, each with a CPU
answer that runs (and is tested) on any machine.
"""

from __future__ import annotations

import contextlib

import torch

from vitexp.config import ConfigError


def select_device(name: str) -> torch.device:
    """`trainer.device`: auto picks CUDA when there is one; asking for CUDA without one is a config error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name} is not allowed: no CUDA device is available (use auto or cpu)")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32: bf16 where the GPU has it, else fp16; CPU runs fp32 by default."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("trainer.precision=fp16 is not allowed on CPU: use fp32 or bf16")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision for a forward pass, or nothing in fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
