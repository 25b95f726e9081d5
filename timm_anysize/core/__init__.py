"""The core: errors, spec types, the Family row, resampling, caches, reports, meta builds, atomic writes, the
``forward_intermediates`` loop the families configure and the one module that touches timm's private APIs. It
imports nothing of timm-anysize above it."""
