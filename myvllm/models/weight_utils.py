"""The weight-loading helpers that the loader and the layers' `weight_loader`s share.

A checkpoint tensor reaches a weight loader as a `CheckpointTensor`, which reads from its
safetensors file only what is asked for (a tensor-parallel rank narrows it to its shard
first), or as a plain torch tensor. The checks here raise ValueError naming the shapes;
the loader adds the tensor's name.

This module imports nothing from `myvllm.layers` or the rest of `myvllm.models`, so that
both can import it.
"""

from __future__ import annotations

import torch
from safetensors import SafetensorError

# safetensors dtype names -> torch dtypes (the ones checkpoints of this engine's models use)
SAFETENSORS_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BF16": torch.bfloat16,
                      "F16": torch.float16, "F32": torch.float32, "F64": torch.float64, "I8": torch.int8,
                      "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
                      "BOOL": torch.bool}


class CheckpointTensor:
    """One tensor of an open safetensors file, read lazily: `narrow` reads one slice of it,
    `read` all of it. Valid while its file is open (during the loader's iteration)."""

    def __init__(self, file, name: str, path: str) -> None:
        self._file = file
        self._name = name
        self._path = path
        self._slice = file.get_slice(name)
        self.shape = torch.Size(self._slice.get_shape())
        self.dtype = SAFETENSORS_DTYPES.get(self._slice.get_dtype())  # None: a dtype not in the table

    @property
    def path(self) -> str:
        """The safetensors file it is in."""
        return self._path

    def __repr__(self) -> str:
        return f"CheckpointTensor({self._name!r}, shape={tuple(self.shape)})"

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        """Like torch.Tensor.narrow, reading only the slice from the file."""
        if not 0 <= dim < len(self.shape) or start < 0 or length < 0 or start + length > self.shape[dim]:
            raise ValueError(f"slice [{start}, {start + length}) of dim {dim} is outside the checkpoint "
                             f"tensor of shape {tuple(self.shape)}")
        index = (slice(None),) * dim + (slice(start, start + length),)
        return self._checked(lambda: self._slice[index])

    def read(self) -> torch.Tensor:
        return self._checked(lambda: self._file.get_tensor(self._name))

    def _checked(self, read) -> torch.Tensor:
        try:
            return read()
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read safetensors file {self._path!r} (truncated or corrupt?): {e}") from e


Loaded = torch.Tensor | CheckpointTensor


def as_tensor(loaded: Loaded) -> torch.Tensor:
    """A checkpoint tensor read whole (a torch tensor is returned as it is)."""
    return loaded if isinstance(loaded, torch.Tensor) else loaded.read()


def check_shape(expected, loaded: Loaded) -> None:
    if tuple(expected) != tuple(loaded.shape):
        raise ValueError(
            f"shape mismatch: checkpoint has {tuple(loaded.shape)}, the model expects {tuple(expected)}"
        )


def copy_checked(param: torch.Tensor, loaded: Loaded) -> None:
    """param <- loaded, after checking that the shapes are equal."""
    check_shape(param.shape, loaded)
    param.data.copy_(as_tensor(loaded))


def shard(loaded: Loaded, dim: int, full_size: int, rank: int, size: int) -> Loaded:
    """Part `rank` (of length size) of loaded along dim, after checking that dim has full_size."""
    if loaded.shape[dim] != full_size:
        expected = list(loaded.shape)
        expected[dim] = full_size
        check_shape(expected, loaded)
    return loaded.narrow(dim, rank * size, size)
