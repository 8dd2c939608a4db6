"""``LinearAttention``: the one multi-head attention module for every feature map, and softmax."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .feature_maps import FeatureMap, create_feature_map, list_feature_maps
from .ops._checks import check_eps

__all__ = ["LinearAttention", "check_attention", "list_attentions"]

SOFTMAX = "softmax"

# Keyword arguments timm's blocks pass to ``attn_layer`` that this module accepts and ignores.
_TIMM_IGNORED_KWARGS = frozenset({"scale_norm", "depth", "attn_head_dim", "rope", "fused_attn"})


def list_attentions() -> list[str]:
    """Every value accepted by ``LinearAttention(attn=...)``: ``"softmax"`` and the feature maps."""
    return [SOFTMAX, *list_feature_maps()]


def check_attention(attn: str) -> str:
    """``attn`` if it names an attention of :func:`list_attentions`, else a one-line ``ValueError`` listing them."""
    if attn not in list_attentions():
        raise ValueError(f"unknown attention {attn!r}; known: {', '.join(list_attentions())}")
    return attn


def _square_grid(n: int) -> tuple[int, int] | None:
    side = math.isqrt(n)
    return (side, side) if side * side == n and n > 0 else None


class LinearAttention(nn.Module):
    """Multi-head attention ``[B, N, C] → [B, N, C]`` with a pluggable feature map.

    ``attn`` names a feature map of :func:`mirrorla.feature_maps.list_feature_maps` (linear, O(N)) or
    ``"softmax"`` (``scaled_dot_product_attention``, O(N²)). The signature is a superset of timm's
    ``Attention``, so ``functools.partial(LinearAttention, attn="mirror")`` is a valid ``attn_layer`` of
    timm's ``VisionTransformer``.

    Args:
        dim: channels C; must be divisible by ``num_heads``.
        num_heads: heads H; head width d = C / H.
        attn: ``"mirror"`` (default), ``"relu"``, ``"elu"``, ``"focused"``, ``"polarity"`` or ``"softmax"``.
        attn_kwargs: options of the feature map (e.g. ``{"variance": False}`` for the mirror ablation).
        qkv_bias, proj_bias: biases of the projections.
        qk_norm: normalise q and k per head with ``norm_layer`` (before the feature map).
        attn_drop: dropout on the attention weights (softmax only: linear attention forms no weights).
        proj_drop: dropout after the output projection.
        norm_layer: the layer for ``qk_norm`` (default ``nn.LayerNorm``).
        local_kernel: kernel of the depthwise convolution of V over the token grid added to the output
            (the anchors' local term). ``None`` (default) means 5 for linear maps and off for softmax;
            ``0`` turns it off.
        num_prefix_tokens: tokens before the grid (class/register tokens), left out of the local term.
            ``None`` infers 0 or 1 from N when no grid is given.
        grid_size: ``(height, width)`` of the token grid; may also be set later (``attn.grid_size = ...``)
            or passed to :meth:`forward`. Without it a square grid is inferred from N.
        sr_ratio: PVT's spatial reduction: keys and values come from the grid downsampled by a strided
            ``sr_ratio``×``sr_ratio`` convolution and a LayerNorm (1 = off). Needs a grid without prefix
            tokens; excludes the local term.
        eps: added to the linear-attention normaliser.
        dim_out: accepted for timm's signature; must be None or ``dim``.
        gated: multiply the output by ``sigmoid(W_g x)`` before the projection (timm's gated attention). The
            polarity map's own gate (PolaFormer) is linear, ``W_g x``, and is added by the map, not by this flag.
        attn_head_dim: accepted from timm's blocks; must be None or ``dim / num_heads``.
        fold_feature_map: move the static part of the feature map (MirrorLA's cross-head reflection and
            fixed block reflections) into the q/k projection weights once per forward instead of applying
            it to every token (exact; needs ``qk_norm=False``). On by default where possible.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        attn: str = "mirror",
        attn_kwargs: dict | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        local_kernel: int | None = None,
        num_prefix_tokens: int | None = None,
        grid_size: tuple[int, int] | None = None,
        sr_ratio: int = 1,
        eps: float = 1e-6,
        fold_feature_map: bool = True,
        dim_out: int | None = None,
        gated: bool = False,
        device=None,
        dtype=None,
        **timm_kwargs,
    ) -> None:
        super().__init__()
        unknown = set(timm_kwargs) - _TIMM_IGNORED_KWARGS
        if unknown:
            raise TypeError(f"LinearAttention got unexpected keyword arguments: {sorted(unknown)}")
        if timm_kwargs.get("scale_norm"):
            raise ValueError("scale_norm=True is not supported by LinearAttention")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        check_attention(attn)
        if dim_out not in (None, dim):
            raise ValueError(f"dim_out must equal dim ({dim}) for LinearAttention, got {dim_out}")
        head_dim = timm_kwargs.get("attn_head_dim")
        if head_dim is not None and head_dim != dim // num_heads:
            raise ValueError(f"attn_head_dim must be None or dim / num_heads = {dim // num_heads} for "
                             f"LinearAttention, got {head_dim}")
        dd = {"device": device, "dtype": dtype}
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.attn_name = attn
        self.attn_kwargs = dict(attn_kwargs or {})
        self.eps = check_eps("eps", eps)
        self.num_prefix_tokens = num_prefix_tokens
        self.grid_size = grid_size
        self.attn_drop = float(attn_drop)

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        norm_layer = norm_layer or nn.LayerNorm
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        if attn == SOFTMAX:
            if self.attn_kwargs:
                raise ValueError(f"attn='softmax' takes no attn_kwargs, got {sorted(self.attn_kwargs)}")
            self.feature_map: FeatureMap | None = None
        else:
            self.feature_map = create_feature_map(attn, self.num_heads, self.head_dim, **self.attn_kwargs)
        if local_kernel is None:
            local_kernel = 0 if attn == SOFTMAX else 5
        if local_kernel < 0 or (local_kernel and local_kernel % 2 == 0):
            raise ValueError(f"local_kernel must be 0 (off) or a positive odd int, got {local_kernel}")
        if not isinstance(sr_ratio, int) or sr_ratio < 1:
            raise ValueError(f"sr_ratio must be a positive int, got {sr_ratio!r}")
        if sr_ratio > 1 and local_kernel:
            raise ValueError("sr_ratio > 1 reduces V to a coarser grid: set local_kernel=0 with it")
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio, **dd)
            self.sr_norm = nn.LayerNorm(dim, **dd)
        else:
            self.sr, self.sr_norm = None, None
        self.local_kernel = local_kernel
        self.local = (
            nn.Conv2d(dim, dim, local_kernel, padding=local_kernel // 2, groups=dim, **dd) if local_kernel else None
        )
        self.fold_feature_map = bool(
            fold_feature_map and self.feature_map is not None and self.feature_map.foldable and not qk_norm
        )
        # two kinds of output gate: timm's gated attention, o·sigmoid(Wx), and PolaFormer's linear o·(Wx)
        self.gated = bool(gated)
        wants_gate = self.gated or (self.feature_map is not None and self.feature_map.output_gate)
        self.gate = nn.Linear(dim, dim, bias=qkv_bias, **dd) if wants_gate else None
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def configure(cls, **defaults) -> type[LinearAttention]:
        """A subclass with other defaults, for places that need a class (timm's ``attn_layer``).

        ``timm.create_model("vit_tiny_patch16_224", attn_layer=LinearAttention.configure(attn="relu"))``
        (timm checks ``issubclass``, so ``functools.partial`` is refused there).
        """
        if "attn" in defaults:
            check_attention(defaults["attn"])
        parent = cls

        def __init__(self, dim: int, num_heads: int = 8, **kwargs) -> None:
            parent.__init__(self, dim, num_heads, **{**defaults, **kwargs})
            # The subclass only carries defaults into __init__; once built, the layer is a plain instance of
            # the parent, so pickle, torch.save(model) and copy.deepcopy find its class by name.
            self.__class__ = parent

        name = f"{cls.__name__}_{defaults.get('attn', 'mirror')}"
        return type(name, (cls,), {"__init__": __init__, "__module__": cls.__module__, "__qualname__": name})

    @property
    def map_kwargs(self) -> dict[str, bool]:
        """What the feature map's ``attend`` gets from this layer: ``folded=True`` when the static part of the map
        sits in the projection weights (the one place that decides it, see ``fold_feature_map``)."""
        return {"folded": True} if self.fold_feature_map else {}

    @property
    def is_linear(self) -> bool:
        return self.feature_map is not None

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of the feature map's angles, vectors and scales."""
        if self.feature_map is None:
            return set()
        keep = set(self.feature_map.no_weight_decay_params)
        return {f"feature_map.{name}" for name, _ in self.feature_map.named_parameters() if name in keep}

    def resolve_grid(self, n: int, grid_size: tuple[int, int] | None = None) -> tuple[int, tuple[int, int]]:
        """``(num_prefix_tokens, (height, width))`` of a sequence of ``n`` tokens."""
        grid = grid_size or self.grid_size
        prefix = self.num_prefix_tokens
        if grid is not None:
            gh, gw = int(grid[0]), int(grid[1])
            if prefix is None:
                prefix = n - gh * gw
                if prefix not in (0, 1):  # more tokens than a class token: a wrong grid, not prefix tokens
                    raise ValueError(
                        f"grid_size {(gh, gw)} does not fit N = {n} tokens (expected N = height·width, or one "
                        "more with a class token; set num_prefix_tokens for more prefix tokens)"
                    )
            if prefix < 0 or prefix + gh * gw != n:
                raise ValueError(
                    f"grid_size {(gh, gw)} with {prefix} prefix tokens does not match N = {n} tokens "
                    f"(expected N = num_prefix_tokens + height·width)"
                )
            return prefix, (gh, gw)
        for p in ((prefix,) if prefix is not None else (0, 1)):
            square = _square_grid(n - p)
            if square is not None:
                return p, square
        raise ValueError(
            f"cannot infer the token grid of N = {n} tokens (not a square after {prefix or '0 or 1'} prefix "
            "tokens): pass grid_size=(height, width) to LinearAttention or its forward"
        )

    @staticmethod
    def _local_grid(v: torch.Tensor, prefix: int, grid: tuple[int, int]) -> torch.Tensor:
        """The grid tokens of v ``[B, H, N, d]`` as an image ``[B, C, height, width]`` in channels-last order (the
        channels innermost): a view of v where its heads and channels are adjacent in memory, as in the qkv
        projection's output. On CUDA a channels-last depthwise convolution runs in cuDNN in every dtype, where an
        NCHW one in bf16 or fp32 runs in PyTorch's own depthwise kernels (``torch._C._select_conv_backend``)."""
        b, h, _, d = v.shape
        return v[:, :, prefix:].permute(0, 2, 1, 3).reshape(b, grid[0], grid[1], h * d).permute(0, 3, 1, 2)

    def _local_term(self, v: torch.Tensor, grid_size: tuple[int, int] | None) -> torch.Tensor:
        """Depthwise convolution of V over the grid, ``[B, H, N, d] → [B, N, C]``, zero on prefix tokens."""
        b, h, n, d = v.shape
        prefix, (gh, gw) = self.resolve_grid(n, grid_size)
        local = self.local(self._local_grid(v, prefix, (gh, gw)))  # channels last in, channels last out
        local = local.permute(0, 2, 3, 1).reshape(b, gh * gw, h * d)  # [B, gh·gw, C]: a view of that output
        return F.pad(local, (0, 0, prefix, 0)) if prefix else local

    def _qkv_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The qkv projection, with the feature map's static part folded into its q and k rows.

        Where no gradient is needed (evaluation, serving) the folded weights are cached until a parameter changes
        (its storage or version counter), so inference pays the fold once, not once per forward."""
        # under autocast the fold hands the projection its weights in autocast's dtype: F.linear would cast them
        # to it anyway (the same values), and a non-leaf weight's cast is not cached, so this saves a cast kernel
        # forward and one backward per layer and training step (and, cached, one per inference forward). Autocast
        # leaves float64 alone, and so does this.
        weight = self.qkv.weight
        device_type = weight.device.type
        out_dtype = (torch.get_autocast_dtype(device_type)
                     if weight.dtype != torch.float64 and torch.is_autocast_enabled(device_type) else None)
        cacheable = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        if cacheable:
            params = [self.qkv.weight, *([self.qkv.bias] if self.qkv.bias is not None else []),
                      *self.feature_map.parameters()]
            key = (out_dtype, *((p.data_ptr(), p._version, p.dtype, p.device) for p in params))
            cached = self.__dict__.get("_fold_cache")
            if cached is not None and cached[0] == key:
                return cached[1]
        folded = self._fold_qkv_weight(out_dtype)
        if cacheable:
            self.__dict__["_fold_cache"] = (key, folded)
        return folded

    def _fold_qkv_weight(self, out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        # the q and k rows folded together (two groups of C rows); the v rows pass unchanged
        return self.feature_map.fold_leading_rows(self.qkv.weight, self.qkv.bias, groups=2, out_dtype=out_dtype)

    def _spatially_reduced_qkv(self, x: torch.Tensor, grid_size: tuple[int, int] | None, weight: torch.Tensor,
                               bias: torch.Tensor | None):
        """q from every token, k and v from the grid reduced by ``sr_ratio`` (PVT v1)."""
        b, n, c = x.shape
        prefix, (gh, gw) = self.resolve_grid(n, grid_size)
        if prefix:
            raise ValueError(f"sr_ratio > 1 needs a grid without prefix tokens, got {prefix} prefix tokens")
        reduced = self.sr(x.transpose(1, 2).reshape(b, c, gh, gw)).flatten(2).transpose(1, 2)
        reduced = self.sr_norm(reduced)
        w_q, w_kv = weight.split([c, 2 * c])
        b_q, b_kv = bias.split([c, 2 * c]) if bias is not None else (None, None)
        q = nn.functional.linear(x, w_q, b_q).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        kv = nn.functional.linear(reduced, w_kv, b_kv).view(b, -1, 2, self.num_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def project(
        self, x: torch.Tensor, grid_size: tuple[int, int] | None = None, *, fold: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v ``[B, H, N(or reduced), d]`` of ``x`` ``[B, N, C]``, after the q/k norms.

        ``fold`` (default: the module's ``fold_feature_map``) returns q and k with the feature map's static
        part already applied; ``fold=False`` returns the plain projections (what analysis tools inspect).
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [B, N, C={self.dim}], got {tuple(x.shape)}")
        b, n, _ = x.shape
        fold = self.fold_feature_map if fold is None else fold and self.fold_feature_map
        weight, bias = self._qkv_weight() if fold else (self.qkv.weight, self.qkv.bias)
        if self.sr is None:
            qkv = F.linear(x, weight, bias)
            q, k, v = qkv.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = self._spatially_reduced_qkv(x, grid_size, weight, bias)
        return self.q_norm(q), self.k_norm(k), v

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        grid_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """x ``[B, N, C]`` → ``[B, N, C]``. ``attn_mask``/``is_causal`` are honoured by softmax only."""
        q, k, v = self.project(x, grid_size)
        b, n, c = x.shape
        if self.feature_map is None:
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                dropout_p=self.attn_drop if self.training else 0.0,
            )
        else:
            if attn_mask is not None or is_causal:
                raise ValueError(
                    f"attn_mask/is_causal are not supported by non-causal linear attention ({self.attn_name!r})"
                )
            o = self.feature_map.attend(q, k, v, eps=self.eps, **self.map_kwargs)
        o = o.transpose(1, 2).reshape(b, n, c)
        if self.local is not None:
            o = o + self._local_term(v, grid_size)
        if self.gate is not None:
            gate = self.gate(x)
            o = o * (gate.sigmoid() if self.gated else gate)
        return self.proj_drop(self.proj(o))

    def extra_repr(self) -> str:
        sr = f", sr_ratio={self.sr_ratio}" if self.sr_ratio > 1 else ""
        return (f"dim={self.dim}, num_heads={self.num_heads}, attn={self.attn_name!r}, "
                f"local_kernel={self.local_kernel}{sr}")
