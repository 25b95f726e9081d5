"""Safetensors one tensor at a time: a lazy reader and a streaming, atomic writer.

Both keep at most one tensor in memory (the reader's tensors in memory of their own, 64-byte aligned: see
:func:`owned_aligned`), so converting a checkpoint larger than the machine's memory peaks at a few
of its largest tensors. The format (https://huggingface.co/docs/safetensors) is an 8-byte little-endian header
length, a JSON header naming each tensor's dtype, shape and byte range, then the data: a writer that knows every
tensor's dtype and shape up front writes the header first and streams the data after it. Files written here are
read by ``safetensors.torch.load_file`` and are identical in layout to what it writes.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
from safetensors import safe_open

from timm_anysize.core.errors import AdaptationError, WeightsError

__all__ = [
    "LazySafetensors",
    "read_metadata",
    "write_safetensors",
    "read_safetensors",
    "owned_aligned",
    "SAFETENSORS_DTYPES",
    "ALIGNMENT",
]

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.complex64: "C64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e8m0fnu: "F8_E8M0",
}
_TORCH_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}

# torch's CPU allocator aligns every block to 64 bytes. A tensor memory-mapped from a safetensors file is only
# 8-byte aligned (its data starts wherever the header ends), and on that memory BLAS kernels take other code paths
# (with one thread, PyTorch runs 1x1 convolutions through im2col + sgemm): the same weights then give outputs that
# differ in the last bits from a model holding them in its own memory.
ALIGNMENT = 64


def owned_aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself where its data is 64-byte aligned, else a copy in fresh (aligned) memory.

    Example:
        >>> t = torch.arange(10.0)
        >>> owned_aligned(t) is t, owned_aligned(t[1:]).data_ptr() % ALIGNMENT
        (True, 0)
    """
    if tensor.device.type != "cpu" or tensor.data_ptr() % ALIGNMENT == 0:
        return tensor
    return tensor.clone(memory_format=torch.preserve_format)


def read_metadata(path: Union[str, os.PathLike]) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (its header only: no tensor is read), ``{}`` where there is none
    or the file is not a readable safetensors file (the weights' read reports that, naming the file).

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> p = tempfile.mkdtemp() + "/w.safetensors"
        >>> save_file({"a": torch.zeros(2)}, p, metadata={"format": "pt"})
        >>> read_metadata(p), read_metadata(p + ".missing")
        ({'format': 'pt'}, {})
    """
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > os.fstat(f.fileno()).st_size - 8:
                return {}
            metadata = json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, ValueError, struct.error, AttributeError):
        return {}
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


class LazySafetensors(Mapping):
    """A safetensors file as a read-only mapping whose tensors are read from disk when asked for, one at a time.

    Every dtype the format defines is read (``safetensors.safe_open`` checks the header once). Nothing is cached: each
    lookup
    returns that tensor in memory of its own (64-byte aligned, like any tensor torch allocates, see
    :func:`owned_aligned`), and the file's pages it was copied from are page cache, not the process's: converting
    or loading a file larger than memory holds one tensor at a time.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> p = tempfile.mkdtemp() + "/w.safetensors"
        >>> save_file({"a": torch.arange(4.0), "b": torch.ones(2, 2, dtype=torch.bfloat16)}, p)
        >>> sd = LazySafetensors(p)
        >>> sorted(sd), sd.shape("b"), sd["a"].tolist()
        (['a', 'b'], (2, 2), [0.0, 1.0, 2.0, 3.0])
    """

    def __init__(self, path: Union[str, os.PathLike]) -> None:
        self.path = Path(path)
        try:
            with self.path.open("rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > os.fstat(f.fileno()).st_size - 8:
                    raise ValueError(f"the header claims {n} bytes, more than the file holds")
                header = json.loads(f.read(n))
            # safetensors' own check of the header: every tensor's byte range inside the file, the data covered
            with safe_open(str(self.path), framework="pt", device="cpu"):
                pass
        except Exception as e:  # OSError, ValueError, struct.error, safetensors' SafetensorError
            raise WeightsError(f"{self.path}: not a readable safetensors file ({e}); re-save it") from e
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries: dict[str, dict] = header
        self._data_start = 8 + n

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of a tensor, from the header (nothing read)."""
        return tuple(self._entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        """The dtype of a tensor, from the header (nothing read)."""
        name = self._entries[key]["dtype"]
        if name not in _TORCH_DTYPES:
            raise WeightsError(
                f"{self.path}: tensor {key!r} has dtype {name}, which this PyTorch cannot hold; re-save it as "
                f"one of {', '.join(sorted(_TORCH_DTYPES))}"
            )
        return _TORCH_DTYPES[name]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._entries:
            raise KeyError(key)
        dtype = self.dtype(key)  # an unknown dtype is refused by name
        entry = self._entries[key]
        begin, end = entry["data_offsets"]
        # Read into a tensor of our own (torch allocates it 64-byte aligned) with plain reads: the file's pages stay
        # page cache, never mapped into this process (safe_open's tensors view a mapping, resident while they live).
        out = torch.empty(entry["shape"], dtype=dtype)
        data = out.reshape(-1).view(torch.uint8)
        if data.numel() != end - begin:
            raise WeightsError(f"{self.path}: tensor {key!r} holds {end - begin} bytes, not its shape's; re-save it")
        if data.numel():
            with self.path.open("rb") as f:
                f.seek(self._data_start + begin)
                view = memoryview(data.numpy())  # type: ignore[arg-type]  # numpy types its buffer for Python >= 3.12 only
                if f.readinto(view) != data.numel():
                    raise WeightsError(f"{self.path}: truncated at tensor {key!r}; re-download or re-save the file")
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def read_safetensors(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, each in memory of its own (see :class:`LazySafetensors`).

    Unlike ``safetensors.torch.load_file``, whose tensors view the file's mapping at 8-byte aligned offsets, a model
    that takes these tensors (``load_state_dict(assign=True)``) computes bit for bit what it computes with weights
    copied into its own parameters.

    Raises:
        WeightsError: The file is not a readable safetensors file, or holds a dtype PyTorch cannot hold.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> p = tempfile.mkdtemp() + "/w.safetensors"
        >>> save_file({"a": torch.arange(3.0), "b": torch.zeros(2, dtype=torch.uint16)}, p)
        >>> sd = read_safetensors(p)
        >>> sd["a"].tolist(), sd["b"].dtype, all(t.data_ptr() % ALIGNMENT == 0 for t in sd.values())
        ([0.0, 1.0, 2.0], torch.uint16, True)
    """
    lazy = LazySafetensors(path)
    return {key: lazy[key] for key in lazy}


def write_safetensors(
    path: Union[str, os.PathLike],
    entries: Sequence[tuple[str, torch.dtype, Sequence[int]]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: Optional[dict[str, str]] = None,
) -> Path:
    """Write a safetensors file tensor by tensor, atomically.

    The header is written from ``entries`` first; each tensor of ``tensors`` (in the same order, with the declared
    dtype and shape) is then written and can be freed by its producer before the next is made. The file is written
    under a temporary name beside ``path`` and renamed into place only when every tensor is written: on any error
    (including one raised by the producer of ``tensors``) nothing is left behind and an existing ``path`` is kept.

    Args:
        path: The output file.
        entries: ``(name, dtype, shape)`` of every tensor, in the order they will come.
        tensors: ``(name, tensor)`` pairs, lazily produced.
        metadata: String metadata for the header's ``__metadata__`` (``{"format": "pt"}`` by default).

    Returns:
        The written path.

    Raises:
        AdaptationError: A tensor comes out of order or with another dtype or shape than declared, or some are missing.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import load_file
        >>> p = tempfile.mkdtemp() + "/out.safetensors"
        >>> t = {"w": torch.randn(3, 2), "n": torch.tensor([1, 2])}
        >>> _ = write_safetensors(p, [(k, v.dtype, v.shape) for k, v in t.items()], iter(t.items()))
        >>> all(torch.equal(load_file(p)[k], v) for k, v in t.items())
        True
    """
    final = Path(path)
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    expected: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
    for name, dtype, shape in entries:
        nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        expected.append((name, dtype, tuple(shape), nbytes))
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            it = iter(tensors)
            for name, dtype, shape, nbytes in expected:
                got = next(it, None)
                if got is None:
                    raise AdaptationError(f"{final}: tensor {name!r} was declared but never came")
                key, tensor = got
                if key != name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
                    raise AdaptationError(
                        f"{final}: expected {name!r} {dtype} {list(shape)}, got {key!r} {tensor.dtype} "
                        f"{list(tensor.shape)}"
                    )
                if nbytes:
                    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                    f.write(memoryview(data.numpy()))  # type: ignore[arg-type]  # numpy: buffer typed for 3.12+ only
                del got, tensor
            if next(it, None) is not None:
                raise AdaptationError(f"{final}: more tensors than declared")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
