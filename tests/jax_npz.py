"""Test helper: write a timm VisionTransformer's weights as a Google JAX ViT ``.npz`` (the layout timm's
``vision_transformer._load_weights`` reads), so the npz path is tested without downloading real checkpoints."""

from __future__ import annotations

import numpy as np
import torch.nn as nn


def save_vit_as_jax_npz(model: nn.Module, path: str) -> None:
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    dim = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    hd = dim // heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            w[mha + f"{n}/kernel"] = qkv_w[j * dim : (j + 1) * dim].T.reshape(dim, heads, hd)
            w[mha + f"{n}/bias"] = qkv_b[j * dim : (j + 1) * dim].reshape(heads, hd)
        w[mha + "out/kernel"] = sd[b + "attn.proj.weight"].reshape(dim, heads, hd).transpose(1, 2, 0)
        w[mha + "out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **w)
