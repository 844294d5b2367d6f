"""Where tensors are computed: device names resolved once, and autocast precision on accelerators.

``resolve_device("auto")`` is CUDA when available, else Apple MPS when available, else the CPU, so on a CPU-only
machine every default is exactly today's CPU path. Precision is ``fp32`` (default: no autocast at all), or ``bf16``
/ ``fp16`` autocast on an accelerator; asking for a lower precision on the CPU is an error, never a silent fp32.
Results that leave a computation (features, merged states, fitted statistics) come back to the CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from mergelab.core.errors import ConfigError

DeviceLike = str | torch.device
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
PRECISIONS: Mapping[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_PRECISION = "fp32"
CPU = torch.device("cpu")


def cuda_available() -> bool:
    """Whether torch sees a CUDA device."""
    return bool(torch.cuda.is_available())


def mps_available() -> bool:
    """Whether torch sees an Apple MPS device."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _parse(device: DeviceLike) -> torch.device:
    if isinstance(device, torch.device):
        return device
    try:
        parsed = torch.device(str(device).strip().lower())
    except (RuntimeError, ValueError):
        parsed = torch.device("meta")  # any type refused below
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"unknown device '{device}'; use one of {', '.join(DEVICE_CHOICES)}")
    return parsed


def _check_cuda(parsed: torch.device, given: DeviceLike) -> torch.device:
    if not cuda_available():
        raise ConfigError(f"device '{given}' is not available here (torch.cuda.is_available() is False); "
                          "use --device cpu or auto")  # fmt: skip
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if parsed.index is None else parsed.index
    if index >= count:
        raise ConfigError(f"device '{given}' is not available here ({count} CUDA device(s): cuda:0..cuda:{count - 1}); "
                          "use --device cuda:0 or auto")  # fmt: skip
    return torch.device("cuda", index)


def resolve_device(device: DeviceLike | None = "auto") -> torch.device:
    """The ``torch.device`` of ``"auto"`` (None too), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` or a
    ``torch.device``; an unknown or unavailable device is a ConfigError naming the fix. ``cuda`` gets its index."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        if cuda_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if mps_available() else CPU
    parsed = _parse(device)
    if parsed.type == "cuda":
        return _check_cuda(parsed, device)
    if parsed.type == "mps" and not mps_available():
        raise ConfigError(f"device '{device}' is not available here (torch.backends.mps.is_available() is False); "
                          "use --device cpu or auto")  # fmt: skip
    return CPU if parsed.type == "cpu" else parsed


def autocast_dtype(precision: str) -> torch.dtype:
    """The dtype of ``"fp32"``, ``"bf16"`` or ``"fp16"``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


def check_precision(device: torch.device, precision: str) -> str:
    """``precision`` if ``device`` can run it: bf16 / fp16 autocast needs an accelerator (ConfigError on the CPU)."""
    autocast_dtype(precision)
    if precision != DEFAULT_PRECISION and device.type == "cpu":
        raise ConfigError(f"precision '{precision}' needs an accelerator but the device is cpu; "
                          "use --precision fp32 or a cuda device")  # fmt: skip
    return precision


@contextlib.contextmanager
def autocast(device: DeviceLike, precision: str = DEFAULT_PRECISION) -> Iterator[None]:
    """``torch.autocast`` to ``precision`` on an accelerator; nothing at all for fp32 or on the CPU."""
    dtype = autocast_dtype(precision)
    device_type = torch.device(device).type
    if precision == DEFAULT_PRECISION or device_type == "cpu":
        yield
        return
    with torch.autocast(device_type=device_type, dtype=dtype):
        yield


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch of keyword tensors on ``device`` (non-tensors kept; on the CPU every tensor is returned as is)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (or buffer); the CPU for a module without tensors."""
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else CPU


@contextlib.contextmanager
def placed(module: torch.nn.Module, device: torch.device | None) -> Iterator[torch.nn.Module]:
    """``module`` moved to ``device`` for the block and moved back where it was afterwards (None: left where it is;
    on the CPU ``.to`` is a no-op, so nothing moves)."""
    origin = module_device(module)
    if device is None or device == origin:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(origin)
