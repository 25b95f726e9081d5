"""Every error the Python API raises for bad input is an AnysizeError (a ValueError), exported from timm_anysize,
with a message that says what to do; where the argument is of the wrong kind it is a TypeError too."""

from __future__ import annotations

import pytest
import timm
import torch

import timm_anysize


def test_run_time_features_on_a_model_they_do_not_support():
    with pytest.raises(timm_anysize.UnsupportedModelError, match="enable_dynamic: Linear is not supported") as e:
        timm_anysize.enable_dynamic(torch.nn.Linear(2, 2))
    assert isinstance(e.value, TypeError) and isinstance(e.value, timm_anysize.AnysizeError)
    with pytest.raises(timm_anysize.UnsupportedModelError, match="has no patch size"):
        timm_anysize.get_patch_size(torch.nn.Linear(2, 2))


def test_run_time_features_asked_of_a_model_not_set_up_for_them():
    plain = timm.create_model("test_vit")
    with pytest.raises(timm_anysize.AnysizeError, match="is not dynamic; call enable_dynamic"):
        timm_anysize.dynamic_cache_info(plain)
    with pytest.raises(timm_anysize.AnysizeError, match="patch_sizes is empty"):
        timm_anysize.enable_flexi(plain, [])


def test_an_unknown_variant_name():
    with pytest.raises(timm_anysize.RegistrationError, match="'nosuch_variant_x' is not a timm-anysize variant"):
        timm_anysize.get_variant("nosuch_variant_x")
