"""Weights taken from a file compute what the same weights compute in a model of their own, bit for bit, whatever
the thread count: the loader hands the model tensors in 64-byte aligned memory of their own, never views of a
file's mapping at the 8-byte offsets safetensors stores them at (with one thread PyTorch runs 1x1 convolutions
through im2col + sgemm, whose kernels take other paths on unaligned data)."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

import timm_anysize
from conftest import unique_name
from timm_anysize.core.safetensors_io import ALIGNMENT, LazySafetensors, read_safetensors


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_loaded_cnn_is_bit_identical_to_its_base_on_one_thread(make_checkpoint, one_thread, suffix):
    path, base = make_checkpoint("test_efficientnet", suffix)
    name = timm_anysize.register_variant(
        unique_name("aligned"), base="test_efficientnet", pretrained={"file": str(path), "img_size": 64}, img_size=64
    )
    model = timm.create_model(name, pretrained=True).eval()
    assert all(t.data_ptr() % ALIGNMENT == 0 for t in model.state_dict().values() if t.numel())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), base.eval()(x))


# Every dtype the safetensors format defines that PyTorch holds (U16/U32/U64, C64 and F8_E8M0 were refused before)
DTYPES = [torch.uint16, torch.uint32, torch.uint64, torch.complex64, torch.float8_e8m0fnu, torch.bfloat16, torch.bool]


def test_every_safetensors_dtype_reads_back_exactly(tmp_path):
    tensors = {str(d): torch.tensor([1.0, 2.0, 4.0]).to(d) for d in DTYPES}
    tensors["odd"] = torch.arange(5, dtype=torch.int8)  # shifts every later tensor off any alignment
    save_file(tensors, tmp_path / "w.safetensors")
    lazy = LazySafetensors(tmp_path / "w.safetensors")
    eager = read_safetensors(tmp_path / "w.safetensors")
    for key, t in tensors.items():
        assert lazy.dtype(key) == t.dtype and lazy.shape(key) == tuple(t.shape), key
        for got in (lazy[key], eager[key]):
            assert got.dtype == t.dtype and torch.equal(got.view(torch.uint8), t.view(torch.uint8)), key
            assert got.data_ptr() % ALIGNMENT == 0, key
