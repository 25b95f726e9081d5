"""The memory model: what a model at one geometry costs (:func:`estimate_cost`, from its meta-device build: every
parameter and buffer plus the largest attention of one image), the budget it must fit (:func:`memory_budget`: the
smaller of the machine's memory and its container's limit, or ``TIMM_ANYSIZE_MAX_BYTES``), and the two refusals made
before anything is allocated: a geometry that fits in no dtype (:func:`check_geometry_memory`, at validation) and a
build in a dtype that does not fit (:func:`check_build_memory`, at ``create_model``).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence, Union

import torch
import torch.nn as nn

from timm_anysize.core.errors import SpecError
from timm_anysize.core.family import Family, tensor_layouts
from timm_anysize.core.geometry import Geometry
from timm_anysize.core.spec import Size2, VariantSpec

__all__ = [
    "MEMORY_BUDGET_ENV",
    "CGROUP_MEMORY_FILES",
    "CostEstimate",
    "PlannedBuild",
    "format_bytes",
    "physical_memory",
    "cgroup_memory_limit",
    "memory_budget",
    "estimate_cost",
    "check_geometry_memory",
    "check_build_memory",
]

MEMORY_BUDGET_ENV = "TIMM_ANYSIZE_MAX_BYTES"
# Without TIMM_ANYSIZE_MAX_BYTES: this share of the memory the process may use, the smaller of the machine's physical
# memory and its container's limit (64 GiB where neither can be read).
MEMORY_BUDGET_SHARE = 0.75
FALLBACK_MEMORY_BUDGET = 64 * 2**30
# A container's memory limit: cgroup v2's memory.max (``max``: none), else cgroup v1's memory.limit_in_bytes (no limit
# reads as a huge number, 2**63 rounded down to a page). The first file that exists says.
CGROUP_MEMORY_FILES: tuple[str, ...] = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
NO_CGROUP_LIMIT = 2**60  # a limit of an exbibyte or more is cgroup v1's "no limit"

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(n: float) -> str:
    """A byte count for people: ``1.5 GiB``, ``512 B``.

    Example:
        >>> format_bytes(3 * 2**29), format_bytes(512)
        ('1.5 GiB', '512 B')
    """
    unit = 0
    while abs(n) >= 1024 and unit < len(_UNITS) - 1:
        n, unit = n / 1024, unit + 1
    return f"{n:,.0f} B" if unit == 0 else f"{n:,.1f} {_UNITS[unit]}"


def physical_memory() -> Optional[int]:
    """The machine's physical memory in bytes, or None where the OS does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def cgroup_memory_limit(files: Optional[Sequence[Union[str, os.PathLike]]] = None) -> Optional[int]:
    """The memory limit of this process's container in bytes (cgroup v2 ``memory.max``, else v1
    ``memory.limit_in_bytes``), or None where there is none.

    Args:
        files: The cgroup files to read, the first that exists; None: :data:`CGROUP_MEMORY_FILES`.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile("w", suffix="memory.max") as f:
        ...     _ = f.write("4294967296\\n"), f.flush()
        ...     cgroup_memory_limit([f.name])
        4294967296
        >>> cgroup_memory_limit(["/nonexistent/memory.max"]) is None
        True
    """
    for path in CGROUP_MEMORY_FILES if files is None else files:
        try:
            raw = Path(path).read_text().strip()
        except OSError:  # not this cgroup version (or not a Linux container)
            continue
        try:
            limit = int(raw)
        except ValueError:  # "max": no limit
            return None
        return limit if 0 < limit < NO_CGROUP_LIMIT else None
    return None


def memory_budget(cgroup_files: Optional[Sequence[Union[str, os.PathLike]]] = None) -> tuple[int, str]:
    """The bytes a variant's geometry may cost, and where that figure comes from: ``TIMM_ANYSIZE_MAX_BYTES``, else
    75 % of the memory this process may use: the machine's physical memory, or its container's limit where that is
    smaller (:func:`cgroup_memory_limit`); 64 GiB where neither says.

    Args:
        cgroup_files: The cgroup files that say the container's limit; None: :data:`CGROUP_MEMORY_FILES`.

    Raises:
        SpecError: ``TIMM_ANYSIZE_MAX_BYTES`` is not a whole number of bytes.

    Example:
        >>> import os
        >>> os.environ["TIMM_ANYSIZE_MAX_BYTES"] = str(2**30)
        >>> memory_budget()
        (1073741824, 'TIMM_ANYSIZE_MAX_BYTES')
        >>> del os.environ["TIMM_ANYSIZE_MAX_BYTES"]
    """
    raw = os.environ.get(MEMORY_BUDGET_ENV, "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            value = -1
        if value <= 0:
            raise SpecError(
                f"{MEMORY_BUDGET_ENV}={raw!r}: not a positive whole number of bytes; set it to e.g. "
                f"{16 * 2**30} (16 GiB), or unset it for 75% of this machine's memory"
            )
        return value, MEMORY_BUDGET_ENV
    total, container = physical_memory(), cgroup_memory_limit(cgroup_files)
    if container is not None and (total is None or container < total):
        return (
            int(container * MEMORY_BUDGET_SHARE),
            f"75% of this container's {format_bytes(container)} memory limit (cgroup); {MEMORY_BUDGET_ENV} sets it",
        )
    if total is None:
        return FALLBACK_MEMORY_BUDGET, f"the default; this OS does not say its memory; {MEMORY_BUDGET_ENV} sets it"
    return int(total * MEMORY_BUDGET_SHARE), f"75% of this machine's {format_bytes(total)}; {MEMORY_BUDGET_ENV} sets it"


@dataclass(frozen=True)
class CostEstimate:
    """What a model at one geometry costs in memory, from its meta-device build: every parameter and every buffer
    (persistent or not, each at its own dtype) plus the largest attention of one image: its map, times the maps alive
    at once (``attention_maps``: 1 for timm's fused attention, 4 where the scores are materialised: scores, a bias or
    mask of their size, the softmax and a temporary; measured on BEiT and CaiT at 12,545 tokens, 3.1 and 3.0), and
    what the family holds per token besides (``Family.token_bytes``), counted in ``attention_bytes``.

    ``largest`` names the biggest tensors, as (what, bytes), biggest first; ``scaling`` splits the total into the
    bytes that stay, grow with the tokens and grow with their square: what :meth:`at_tokens` scales by.
    """

    params_bytes: int
    buffers_bytes: int
    attention_bytes: int
    tokens: int
    heads: int
    largest: tuple[tuple[str, int], ...] = ()
    scaling: tuple[int, int, int] = (0, 0, 0)
    # (floating-point entries, their bytes): the part a model built in another dtype scales (integer indices stay).
    floating: tuple[int, int] = (0, 0)
    attention_maps: int = 1  # attention_bytes is this many maps

    @property
    def total(self) -> int:
        """Parameters, buffers and the attention map, in bytes."""
        return self.params_bytes + self.buffers_bytes + self.attention_bytes

    def total_in(self, dtype: torch.dtype) -> int:
        """The total for the model built in ``dtype`` (``timm.create_model(..., dtype=...)``): its floating-point
        tensors and the attention map at that dtype's size, integer buffers as they are."""
        entries, size = self.floating
        return self.total - size + entries * dtype.itemsize

    def at_tokens(self, tokens: int) -> float:
        """The estimate at another token count, every tensor scaled by how it grows with the tokens."""
        r = tokens / max(self.tokens, 1)
        fixed, linear, square = self.scaling
        return fixed + linear * r + square * r * r

    def describe(self) -> str:
        """One line, e.g. ``~846 KiB at 17 tokens: weights 839 KiB, buffers 5.0 KiB, attention map 2.1 KiB (2 heads,
        one image); largest: ...``."""
        maps = f"{self.attention_maps} maps of " if self.attention_maps > 1 else ""
        attention = (
            f"attention map {format_bytes(self.attention_bytes)} ({maps}{self.heads} head{'s' if self.heads != 1 else ''}"
            f", one image)"
            if self.attention_bytes
            else "no attention map"
        )
        line = (
            f"~{format_bytes(self.total)} at {self.tokens:,} tokens: weights {format_bytes(self.params_bytes)}, "
            f"buffers {format_bytes(self.buffers_bytes)}, {attention}"
        )
        return line + (f"; largest: {self.largest[0][0]} = {format_bytes(self.largest[0][1])}" if self.largest else "")


def _shape_words(shape: tuple[int, ...]) -> str:
    """``50,177²`` for a square matrix, else ``[2, 3, 4]``."""
    if len(shape) == 2 and shape[0] == shape[1]:
        return f"{shape[0]:,}²"
    return "[" + ", ".join(f"{d:,}" for d in shape) + "]"


_TENSOR_WORDS = (
    ("relative_position_index", "relative-position index"),
    ("relative_position_bias_table", "relative-position table"),
    ("attention_bias_idxs", "attention-bias index"),
    ("attention_biases", "attention-bias grid"),
    ("rel_pos", "relative-position axis"),
    ("pos_embed", "position embedding"),
    ("attn_mask", "attention mask"),
)


def _what(name: str, t: torch.Tensor, buffer: bool, count: int) -> str:
    """``relative-position index `blocks.0.attn.relative_position_index` (50,177², int64, in 2 modules)``."""
    kind = next((w for k, w in _TENSOR_WORDS if k in name), "buffer" if buffer else "parameter")
    dtype = str(t.dtype).replace("torch.", "")
    each = f", {count} of them" if count > 1 else ""
    return f"{kind} `{name}` ({_shape_words(tuple(t.shape))} entries, {dtype}{each})"


def _token_power(shape: tuple[int, ...], grid_tokens: int, has_grid: bool) -> int:
    """How a tensor grows with the tokens (0, 1 or 2): how many of its dimensions are token-sized (between a 64th
    (no patch grid: stages at up to 8x the first stage's stride) or a quarter of the grid's tokens and 8x them), read
    only at 1,024 grid tokens or more, where no weight matrix's width is near the token count."""
    if grid_tokens < 1024:
        return 0
    low = grid_tokens / (64 if not has_grid else 4)
    return min(2, sum(1 for d in shape if low <= d <= 8 * grid_tokens))


_BIAS_ATTRS = ("relative_position_bias_table", "relative_position_index", "rel_pos_h", "attention_biases", "rel_pos")


def _maps_alive(module: nn.Module) -> int:
    """How many attention maps an attention module holds at once: 1 for timm's fused attention
    (``scaled_dot_product_attention`` without a mask), else 4 (scores, a bias of their size, softmax, a temporary)."""
    fused = getattr(module, "fused_attn", False) is True
    biased = any(getattr(module, a, None) is not None for a in _BIAS_ATTRS)
    return 1 if fused and not biased else 4


def _attention(
    model: nn.Module, tokens: int, grid_tokens: int, has_grid: bool, maps_alive: Optional[int] = None
) -> tuple[int, int, int, int]:
    """(bytes, heads, token power, maps) of the largest attention of one image, float32: tokens² x heads of the first
    global attention (the first stage sees the most tokens), tokens x window of the first windowed one, its own
    resolution's of one that keeps it (LeViT); tokens² of one head for a model with a patch grid whose attention
    names no heads; none without either. The bytes are ``maps`` maps: ``maps_alive`` (the family's
    ``attention_maps``), else :func:`_maps_alive`."""
    best, heads_seen, power, seen, maps = 0, 0, 0, set(), 1
    for module in model.modules():
        heads = getattr(module, "num_heads", getattr(module, "heads", None))
        if not isinstance(heads, int) or isinstance(heads, bool) or heads <= 0:
            continue
        window, resolution = getattr(module, "window_size", None), getattr(module, "resolution", None)
        if isinstance(resolution, (int, tuple, list)) and resolution:
            n = math.prod(resolution) if not isinstance(resolution, int) else resolution * resolution
            size, p = n * n * heads * 4, 2
        elif "window" in seen and "global" in seen:
            continue
        elif isinstance(window, (int, tuple, list)) and window:
            if "window" in seen:
                continue
            seen.add("window")
            keys = math.prod(window) if not isinstance(window, int) else window * window
            keys = tokens if keys >= grid_tokens else keys  # a window the size of the grid (BEiT): global
            size, p = tokens * keys * heads * 4, 1 if keys < tokens else 2
        elif "global" not in seen:
            seen.add("global")
            size, p = tokens * tokens * heads * 4, 2
        else:
            continue
        alive = maps_alive or _maps_alive(module)
        size *= alive
        if size > best:
            best, heads_seen, power, maps = size, heads, p, alive
    if not best and has_grid:
        return tokens * tokens * 4, 1, 2, 1
    return best, heads_seen, power, maps


def estimate_cost(model: nn.Module, geometry: Geometry, family: Optional[Family] = None) -> CostEstimate:
    """What a (meta-device) model at ``geometry`` costs: its parameters and all its buffers, persistent or not, at
    their own dtypes, plus the largest attention map of one image at its tokens (see :class:`CostEstimate`).

    ``family``: its geometry-dependent parameters (position embeddings, relative-position tables) are the ones that
    grow with the tokens; without it, only buffers may.

    Example:
        >>> import timm
        >>> from timm_anysize.core.meta import meta_device
        >>> with meta_device():
        ...     m = timm.create_model("test_vit", img_size=64, patch_size=16)
        >>> cost = estimate_cost(m, Geometry((64, 64), (16, 16), (4, 4), in_chans=3, num_classes=1000, num_prefix_tokens=1))
        >>> cost.tokens, cost.heads, cost.attention_bytes == 17 * 17 * 2 * 4
        (17, 2, True)
    """
    tokens = geometry.num_tokens
    grid_tokens = max(tokens - geometry.num_prefix_tokens, 1)
    has_grid = geometry.grid_size is not None
    layouts = tensor_layouts(family, [n for n, _ in model.named_parameters()]) if family is not None else {}
    scaling = [0, 0, 0]
    groups: dict[tuple[str, tuple[int, ...]], list[Any]] = {}  # the same tensor in every block: one entry
    sizes = {"params": 0, "buffers": 0}
    floating = [0, 0]
    for kind, named in (("params", model.named_parameters()), ("buffers", model.named_buffers())):
        for name, t in named:
            size = t.numel() * t.element_size()
            sizes[kind] += size
            if t.is_floating_point():
                floating[0] += t.numel()
                floating[1] += size
            grows = kind == "buffers" or name in layouts
            scaling[_token_power(tuple(t.shape), grid_tokens, has_grid) if grows else 0] += size
            group = groups.setdefault((re.sub(r"\.\d+\.", ".*.", name), tuple(t.shape)), [name, t, kind, 0, 0])
            group[3] += size
            group[4] += 1
    family_maps = family.attention_maps if family is not None else None
    attn, heads, power, maps = _attention(model, tokens, grid_tokens, has_grid, family_maps)
    scaling[power] += attn
    floating[0] += attn // 4
    floating[1] += attn
    per_token = family.token_bytes(model) if family is not None and family.token_bytes is not None else 0
    if per_token:  # activations the family holds per token besides the maps: counted with them, growing linearly
        attn += tokens * per_token
        scaling[1] += tokens * per_token
    entries = [(_what(name, t, kind == "buffers", count), size) for name, t, kind, size, count in groups.values()]
    if attn:
        times = f"{maps} maps alive at once, " if maps > 1 else ""
        what = "the attention and per-token activations" if per_token else "the attention"
        entries.append((f"{what} of one image ({tokens:,} tokens, {heads} heads, {times}float32)", attn))
    largest = tuple(sorted(entries, key=lambda e: -e[1])[:3])
    return CostEstimate(
        sizes["params"],
        sizes["buffers"],
        attn,
        tokens,
        heads,
        largest,
        (scaling[0], scaling[1], scaling[2]),
        (floating[0], floating[1]),
        maps,
    )


def _fitting_geometries(cost: CostEstimate, geometry: Geometry, budget: int) -> list[str]:
    """The nearest geometries whose estimate (scaled from ``cost`` by their tokens) fits ``budget``: the largest
    img_size at the same patch (same aspect), and the smallest larger patch that divides the img_size."""
    prefix = geometry.num_prefix_tokens
    (h, w), patch = geometry.img_size, geometry.patch_size
    step = patch or (32, 32)
    stride = patch or (4, 4)

    def fits(img: Size2, p: Size2) -> bool:
        return cost.at_tokens((img[0] // p[0]) * (img[1] // p[1]) + prefix) <= budget

    def scaled(rows: int) -> Size2:  # ``rows`` steps down the height, the width in the same aspect
        return (rows * step[0], max(1, round(rows * step[0] * w / h / step[1])) * step[1])

    out = []
    lo, hi = 0, h // step[0]  # the most rows that fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(scaled(mid), stride) else (lo, mid - 1)
    if lo and scaled(lo) != (h, w):
        out.append(f"img_size {list(scaled(lo))}")
    if patch is not None:
        for k in range(2, max(h // patch[0], w // patch[1]) + 1):
            p = (patch[0] * k, patch[1] * k)
            if h % p[0] == 0 and w % p[1] == 0 and fits((h, w), p):
                out.append(f"patch_size {p[0] if p[0] == p[1] else list(p)} at img_size {[h, w]}")
                break
    return out


def check_geometry_memory(
    spec: VariantSpec, model: nn.Module, geometry: Geometry, key: str, family: Family
) -> CostEstimate:
    """Reject a geometry whose estimate (:func:`estimate_cost`) exceeds the budget (:func:`memory_budget`) even in
    half precision, before anything is allocated, naming what makes it large and the nearest geometry that fits.

    The plan does not know the dtype the model will be built in: a geometry that fits in bfloat16 (a 7B ViT on a
    24 GB machine) is accepted here, and :func:`check_build_memory` refuses the build in a dtype that does not fit.

    Args:
        spec: The variant (named in the error).
        model: The variant's model at ``geometry``, on the meta device.
        geometry: Its geometry.
        key: The spec key that sets the geometry (``img_size``, ``pretrained.img_size``), named in the error.
        family: Its family row.

    Returns:
        The estimate.

    Raises:
        SpecError: The geometry does not fit the budget in bfloat16 either.

    Example:
        >>> import timm
        >>> from timm_anysize.core.meta import meta_device
        >>> from timm_anysize.core.spec import parse_variant
        >>> from timm_anysize.families import family_of
        >>> with meta_device():
        ...     m = timm.create_model("test_vit", img_size=64, patch_size=16)
        >>> geometry = Geometry((64, 64), (16, 16), (4, 4), in_chans=3, num_classes=1000, num_prefix_tokens=1)
        >>> check_geometry_memory(parse_variant("v", {"base": "test_vit"}), m, geometry, "img_size", family_of(m)).tokens
        17
    """
    budget, where = memory_budget()
    cost = estimate_cost(model, geometry, family)
    if cost.total > budget and cost.total_in(torch.bfloat16) > budget:
        big = "; ".join(f"{what} = {format_bytes(size)}" for what, size in cost.largest[:2])
        near = _fitting_geometries(cost, geometry, budget)
        fix = f"nearest that fit: {' or '.join(near)}; " if near else "no smaller geometry helps (the weights alone); "
        raise SpecError(
            f"{spec.where}.{key}: {geometry.describe()} needs an estimated {format_bytes(cost.total)} "
            f"(weights {format_bytes(cost.params_bytes)}, buffers {format_bytes(cost.buffers_bytes)}, the attention of "
            f"one image {format_bytes(cost.attention_bytes)} at {cost.tokens:,} tokens; "
            f"~{format_bytes(cost.total_in(torch.bfloat16))} in bfloat16), over the {format_bytes(budget)} "
            f"budget ({where}); what makes it large: {big}; {fix}or raise {MEMORY_BUDGET_ENV}"
        )
    return cost


class PlannedBuild(Protocol):
    """What :func:`check_build_memory` reads of a variant's plan (a
    :class:`~timm_anysize.core.variant_plan.VariantPlan`): the variant, its target geometry and its estimate."""

    @property
    def spec(self) -> VariantSpec: ...

    @property
    def target(self) -> Geometry: ...

    @property
    def cost(self) -> Optional[CostEstimate]: ...


def check_build_memory(plan: PlannedBuild, dtype: Optional[torch.dtype] = None) -> None:
    """Refuse to build a variant in a dtype whose estimate exceeds the budget (:func:`memory_budget`), before any
    tensor is allocated; the error says which dtype fits.

    Args:
        plan: The variant's plan (its ``cost``).
        dtype: The dtype the model will be built in (``timm.create_model``'s ``dtype``); None: torch's default.

    Raises:
        SpecError: The model in ``dtype`` would not fit.

    Example:
        >>> from timm_anysize.core.spec import parse_variant
        >>> from timm_anysize.plan import make_plan
        >>> check_build_memory(make_plan(parse_variant("v", {"base": "test_vit", "img_size": 64})), torch.float32)
    """
    if plan.cost is None:
        return
    dtype = dtype or torch.get_default_dtype()
    budget, where = memory_budget()
    need = plan.cost.total_in(dtype)
    if need <= budget:
        return
    half = plan.cost.total_in(torch.bfloat16)
    fix = (
        f"build it in half precision: timm.create_model({plan.spec.name!r}, dtype=torch.bfloat16) needs "
        f"~{format_bytes(half)}; "
        if dtype.itemsize > 2 and half <= budget
        else ""
    )
    raise SpecError(
        f"{plan.spec.where}: built in {str(dtype).replace('torch.', '')} at {plan.target.describe()} it needs an "
        f"estimated {format_bytes(need)}, over the {format_bytes(budget)} budget ({where}); {fix}"
        f"or raise {MEMORY_BUDGET_ENV}"
    )
