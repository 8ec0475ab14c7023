"""Devices, dtypes and raw views shared by kvfs.gpu's modules."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvfs.errors import InvalidInput

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
# same-size integer types: the store moves KV as raw integers (numpy has no native bf16/fp8)
RAW_TORCH = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
RAW_NUMPY = {1: np.uint8, 2: np.uint16, 4: np.uint32}


def as_device(device: Any) -> torch.device:
    """A torch device, checked: CUDA must be available for a CUDA device."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInput(f"device {device!r}: CUDA is not available in this process; use device='cpu'")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise InvalidInput(f"device {device!r}: kvfs.gpu loads into 'cpu' or 'cuda[:N]' memory")
    return dev


def torch_dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[name]


def raw_numpy(t: torch.Tensor) -> np.ndarray:
    """A raw-integer numpy view of a CPU tensor (shares memory: what the store reads into)."""
    assert t.device.type == "cpu"
    return t.view(RAW_TORCH[t.element_size()]).numpy().view(RAW_NUMPY[t.element_size()])


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a 1-D uint8 tensor (shares memory; device tensors too)."""
    if not t.is_contiguous():
        raise ValueError("byte_view needs a contiguous tensor")
    return t.reshape(-1).view(torch.uint8)


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty``; on CPU, large buffers come from huge-page-advised anonymous maps (kvfs._buffers):
    a fresh buffer then faults in 2 MiB at a time instead of 4 KiB, which matters for per-request buffers."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    from kvfs._buffers import empty as np_empty

    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = np_empty(shape, RAW_NUMPY[itemsize])
    return torch.from_numpy(raw.view(RAW_NUMPY[itemsize])).view(RAW_TORCH[itemsize]).view(dtype)
