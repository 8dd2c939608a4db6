"""Feature maps for linear attention, behind one registry.

Every map is a small ``nn.Module`` that takes queries and keys *together* (``[B, H, N, d]`` each, after
the projections and the head split) and returns their non-negative features. Q and K go through the
same parameters and the same statistics; that is what keeps MirrorLA's reflections inner-product
preserving. ``attend`` runs the one linear-attention core of :mod:`mirrorla.ops` on the features; a
map with several streams (polarity) overrides it and still calls the same core.

    >>> fmap = create_feature_map("mirror", num_heads=3, head_dim=64)
    >>> phi_q, phi_k = fmap(q, k)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .ops import (
    DELTA_FORMS,
    PAIRINGS,
    block_reflect,
    block_variance,
    check_delta_form,
    check_pairing,
    cross_head_reflect,
    folded_mirror_map,
    folded_variance,
    linear_attention,
    linear_attention_reference,
    mapped_linear_attention,
    pair_channels,
    reflect_projection_rows,
    rotate_relu,
    rotate_relu_reference,
    token_sums,
)
from .ops._checks import check_eps
from .ops.linear_attention import _mirror_linear_attention

__all__ = [
    "DELTA_FORMS",
    "ELUFeatureMap",
    "FeatureMap",
    "FocusedFeatureMap",
    "MirrorFeatureMap",
    "PolarityFeatureMap",
    "ReLUFeatureMap",
    "check_feature_map_options",
    "create_feature_map",
    "list_feature_maps",
    "register_feature_map",
]

_REGISTRY: dict[str, type[FeatureMap]] = {}

VARIANCE_SCOPES = ("sample", "running", "token")  # what MirrorLA's σ² is computed over (MirrorFeatureMap)


def register_feature_map(name: str) -> Callable[[type[FeatureMap]], type[FeatureMap]]:
    """Class decorator: make a :class:`FeatureMap` subclass available to :func:`create_feature_map`."""

    def wrap(cls: type[FeatureMap]) -> type[FeatureMap]:
        if name in _REGISTRY:
            raise ValueError(f"feature map {name!r} is already registered ({_REGISTRY[name].__name__})")
        cls.map_name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_feature_maps() -> list[str]:
    """Names accepted by :func:`create_feature_map`, sorted."""
    return sorted(_REGISTRY)


# annotation names (the module uses postponed annotations) → the Python values each accepts
_OPTION_TYPES: dict[str, Callable[[Any], bool]] = {
    "bool": lambda v: isinstance(v, bool),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
}


def check_feature_map_options(name: str, options: dict[str, Any]) -> None:
    """Raise a one-line ``ValueError`` for an unknown map, an unknown option or an option of the wrong type.

    Options are the keyword-only arguments of the map's ``__init__``; their annotations (``bool``, ``float``,
    ``str | float`` …) are the accepted JSON types: a boolean must be a JSON boolean, never ``"no"`` or ``0``.
    Value ranges are checked by the map's constructor.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown feature map {name!r}; known feature maps: {', '.join(list_feature_maps())}")
    params = {p.name: p for p in inspect.signature(_REGISTRY[name].__init__).parameters.values()
              if p.kind is inspect.Parameter.KEYWORD_ONLY}
    if not isinstance(options, dict):
        raise ValueError(f"options of feature map {name!r} must be a dict (JSON object), got {options!r}")
    for key, value in options.items():
        if key not in params:
            known = ", ".join(sorted(params)) or "none"
            raise ValueError(f"unknown option {key!r} for feature map {name!r}; known options: {known}")
        allowed = [t.strip() for t in str(params[key].annotation).split("|")]
        if not any(_OPTION_TYPES.get(t, lambda v: True)(value) for t in allowed):
            raise ValueError(f"option {key!r} of feature map {name!r} must be {' or '.join(allowed)}, "
                             f"got {value!r} ({type(value).__name__})")


def create_feature_map(name: str, num_heads: int, head_dim: int, **kwargs) -> FeatureMap:
    """Build a registered feature map for ``num_heads`` heads of width ``head_dim`` (options checked by
    :func:`check_feature_map_options`)."""
    check_feature_map_options(name, kwargs)
    return _REGISTRY[name](num_heads, head_dim, **kwargs)


class FeatureMap(nn.Module):
    """Base class. Subclasses implement :meth:`forward` ``(q, k) -> (φ(q), φ(k))``.

    Class attributes a subclass may set:
        output_gate: the attention module multiplies its output by a linear gate of the input (PolaFormer).
        no_weight_decay_params: names of parameters that must not be weight-decayed (angles, scales).
    """

    map_name: str = "base"
    output_gate: bool = False
    no_weight_decay_params: tuple[str, ...] = ()

    @property
    def foldable(self) -> bool:
        """Whether part of the map is a fixed linear map that :meth:`fold_projection` can move into the q/k
        projection weights (then call the map with ``folded=True``)."""
        return False

    def fold_projection(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """Fold the map's static linear part into a q or k projection ``weight [C, C_in]``, ``bias [C]``."""
        raise NotImplementedError(f"feature map {self.map_name!r} has nothing to fold")

    def fold_leading_rows(self, weight: torch.Tensor, bias: torch.Tensor | None, groups: int,
                          out_dtype: torch.dtype | None = None):
        """:meth:`fold_projection` on each of the first ``groups`` blocks of C rows of ``weight [R, C_in]`` (and
        ``bias [R]``); the other rows pass unchanged (a fused qkv projection folds its q and k rows, not v).
        ``out_dtype``: the results' dtype (default: the inputs'), e.g. autocast's for the projection that uses them."""
        c = self.num_heads * self.head_dim
        w, b = self.fold_projection(weight[:groups * c].view(groups, c, -1),
                                    None if bias is None else bias[:groups * c].view(groups, c))
        weight_out = torch.cat([w.reshape(groups * c, -1), weight[groups * c:]], 0)
        bias_out = None if bias is None else torch.cat([b.reshape(groups * c), bias[groups * c:]], 0)
        if out_dtype is not None:
            weight_out = weight_out.to(out_dtype)
            bias_out = None if bias_out is None else bias_out.to(out_dtype)
        return weight_out, bias_out

    def __init__(self, num_heads: int, head_dim: int) -> None:
        super().__init__()
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        self.num_heads = num_heads
        self.head_dim = head_dim

    def _check(self, q: torch.Tensor, k: torch.Tensor) -> None:
        for name, t in (("q", q), ("k", k)):
            if t.dim() != 4 or t.shape[1] != self.num_heads or t.shape[3] != self.head_dim:
                raise ValueError(
                    f"{name} must have shape [B, H={self.num_heads}, N, d={self.head_dim}], got {tuple(t.shape)}"
                )
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
        if q.shape[2] == 0 or k.shape[2] == 0:
            raise ValueError(f"q and k need at least one token (N >= 1), got q {tuple(q.shape)} and k {tuple(k.shape)}")

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        eps: float = 1e-6,
        return_attn: bool = False,
        **map_kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Linear attention with this map: q, k ``[B, H, N, d]``, v ``[B, H, N, dv]`` → ``[B, H, N, dv]``.

        With ``return_attn`` the explicit N×N path is used and the attention matrices are returned too, one
        ``[B, H, Nq, N]`` per stream (one stream for every map but polarity). ``map_kwargs`` go to
        :meth:`forward` (e.g. ``folded=True``).
        """
        fq, fk = self(q, k, **map_kwargs)
        if return_attn:
            out, attn = linear_attention_reference(fq, fk, v, eps=eps, return_attn=True)
            return out, [attn]
        return linear_attention(fq, fk, v, eps=eps)

    def elementwise_flops_per_token(self) -> int:
        """Analytic element-wise FLOPs per token of this map on q and k together (matmuls excluded)."""
        return 2 * self.num_heads * self.head_dim  # one max per coordinate of q and of k

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"


@register_feature_map("relu")
class ReLUFeatureMap(FeatureMap):
    """φ(x) = ReLU(x): plain linear attention (Katharopoulos et al. 2020 style)."""

    def forward(self, q, k):
        self._check(q, k)
        return F.relu(q), F.relu(k)

    def attend(self, q, k, v, *, eps=1e-6, return_attn=False):
        if return_attn:
            return super().attend(q, k, v, eps=eps, return_attn=True)
        self._check(q, k)
        return mapped_linear_attention(q, k, v, feature="relu", eps=eps)  # the ReLU runs inside the fused kernels


@register_feature_map("elu")
class ELUFeatureMap(FeatureMap):
    """φ(x) = ELU(x) + 1 (Linear Transformer, MLLA)."""

    def forward(self, q, k):
        self._check(q, k)
        return F.elu(q) + 1.0, F.elu(k) + 1.0

    def elementwise_flops_per_token(self) -> int:
        return 2 * self.num_heads * self.head_dim * 3  # exp, compare/select, +1


class _LearnedScale(nn.Module):
    """Divides by softplus(s), s per channel [H, d], zero-init (FLatten / PolaFormer temperature)."""

    def __init__(self, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(num_heads, 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / F.softplus(self.scale)


@register_feature_map("focused")
class FocusedFeatureMap(FeatureMap):
    """FLatten's focused map (ICCV'23): ``x = (ReLU(x) + 1e-6) / softplus(s)``, then
    ``f_p(x) = (‖x‖ / ‖x^p‖) · x^p`` element-wise power p. As in FLatten the norms run over all C
    channels of a token (every head), so the map sharpens direction and keeps the token's norm.
    Computed in fp32: ``x³`` of activations overflows fp16.
    """

    no_weight_decay_params = ("scale.scale",)

    def __init__(self, num_heads: int, head_dim: int, *, power: float = 3.0) -> None:
        super().__init__(num_heads, head_dim)
        if power <= 0:
            raise ValueError(f"power must be positive, got {power}")
        self.power = float(power)
        self.scale = _LearnedScale(num_heads, head_dim)

    def _focus(self, x: torch.Tensor) -> torch.Tensor:
        x = self.scale(F.relu(x.float()) + 1e-6)
        norm = x.pow(2).sum(dim=(1, 3), keepdim=True).sqrt()
        xp = x.pow(self.power)
        return xp * (norm / xp.pow(2).sum(dim=(1, 3), keepdim=True).sqrt())

    def forward(self, q, k):
        self._check(q, k)
        return self._focus(q).to(q.dtype), self._focus(k).to(k.dtype)

    def elementwise_flops_per_token(self) -> int:
        return 2 * self.num_heads * self.head_dim * 9


@register_feature_map("polarity")
class PolarityFeatureMap(FeatureMap):
    """PolaFormer's polarity-aware map (ICLR'25).

    ``x⁺ = ReLU(x)^π``, ``x⁻ = ReLU(−x)^π`` with a learnable per-(head, channel) power
    ``π = 1 + α·sigmoid(w)`` (w zero-init, so π starts at 1 + α/2), shared by q and k, after PolaFormer's
    softplus temperature. Same-sign stream: ``([q⁺, q⁻], [k⁺, k⁻], v₁)``; opposite-sign stream:
    ``([q⁻, q⁺], [k⁺, k⁻], v₂)`` with v split in halves along channels; outputs are concatenated. The
    attention module adds PolaFormer's linear output gate (``output_gate``).
    """

    output_gate = True
    no_weight_decay_params = ("power", "scale.scale")

    def __init__(self, num_heads: int, head_dim: int, *, alpha: float = 4.0) -> None:
        super().__init__(num_heads, head_dim)
        if head_dim % 2:
            raise ValueError(f"polarity splits v in two halves per head: head_dim must be even, got {head_dim}")
        self.alpha = float(alpha)
        self.power = nn.Parameter(torch.zeros(num_heads, 1, head_dim))
        self.scale = _LearnedScale(num_heads, head_dim)

    def _signed_powers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p = 1.0 + self.alpha * torch.sigmoid(self.power)
        x = self.scale(x.float())
        return F.relu(x).pow(p), F.relu(-x).pow(p)

    def forward(self, q, k):
        """Returns the same-sign features ``([q⁺, q⁻], [k⁺, k⁻])`` (``[B, H, N, 2d]`` each)."""
        self._check(q, k)
        qp, qn = self._signed_powers(q)
        kp, kn = self._signed_powers(k)
        return torch.cat([qp, qn], -1).to(q.dtype), torch.cat([kp, kn], -1).to(k.dtype)

    def attend(self, q, k, v, *, eps=1e-6, return_attn=False):
        self._check(q, k)
        qp, qn = self._signed_powers(q)
        kp, kn = self._signed_powers(k)
        phi_k = torch.cat([kp, kn], -1)
        streams = ((torch.cat([qp, qn], -1), v[..., : v.shape[-1] // 2]),
                   (torch.cat([qn, qp], -1), v[..., v.shape[-1] // 2:]))
        outs, attns = [], []
        for phi_q, v_half in streams:
            if return_attn:
                o, a = linear_attention_reference(phi_q, phi_k, v_half, eps=eps, return_attn=True)
                attns.append(a)
            else:
                o = linear_attention(phi_q, phi_k, v_half, eps=eps)
            outs.append(o)
        out = torch.cat(outs, -1)
        return (out, attns) if return_attn else out

    def elementwise_flops_per_token(self) -> int:
        return 2 * self.num_heads * self.head_dim * 8


@register_feature_map("mirror")
class MirrorFeatureMap(FeatureMap):
    """MirrorLA (docs/method.md §2): ``φ(z) = ReLU(H_blk(Θ) · split_heads(H_cross · z))`` for z = q, k.

    Args:
        num_heads, head_dim: head layout of q and k; ``head_dim`` must be even when ``block`` is on.
        block: block-wise 2×2 reflections with learnable angles θ ``[H, d/2]``.
        variance: modulate the angles, ``Θ = θ + Δα(σ²)``, with σ² the per-(sample, head, block) variance
            of the keys after the cross-head reflection, over tokens and the block's two channels; the
            same Θ reflects that sample's queries, so ``qᵀk`` is preserved. Needs ``block``.
        cross_head: one Householder reflection ``I − 2uuᵀ/‖u‖²`` over all C = H·d channels, applied first.
        pairing: ``"adjacent"`` channel pairs ``(2i, 2i+1)`` (default, the paper's figure) or ``"half"``.
        delta_form: the form of Δα, a key of :data:`DELTA_FORMS` (default ``"tanh_log"``); γ
            ``[H, d/2]`` is zero-initialised so a model starts as plain block reflection.
        theta_init: ``"uniform"`` (U[0, π), default), ``"zero"`` or a float (every angle that value).
        gamma_init: the initial value of every γ (default 0: a new model starts as plain block reflection).
        u_init: ``"normal"`` (default, N(0, 1) entries) or ``"ones"`` (an even mix of all channels).
        eps: ε inside Δα.
        variance_scope: what σ² is computed over (docs/method.md §2.3). ``"sample"`` (default): per sample,
            head and pair, over its tokens and the pair's two channels. ``"running"``: a BatchNorm-style running
            estimate of that per-pair variance, a buffer updated with ``running_momentum`` in training mode and
            used as it stands in training and evaluation alike (one Θ for every sample). ``"token"``: per token,
            over the pair's two channels only; queries and keys then get different angles, so ``qᵀk`` is *not*
            preserved before the ReLU (an ablation of the paper's choice, not a faithful variant). The fused
            kernels serve ``"sample"`` (and ``"running"`` for the rotation); ``"token"`` runs the reference.
        running_momentum: the update weight of the running estimate (``"running"`` only).

    With every component off the map is exactly ReLU, so the ablation
    ReLU → +block → +variance → +cross-head is configuration only.
    """

    no_weight_decay_params = ("theta", "gamma", "u")

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        *,
        block: bool = True,
        variance: bool = True,
        cross_head: bool = True,
        pairing: str = "adjacent",
        delta_form: str = "tanh_log",
        theta_init: str | float = "uniform",
        gamma_init: float = 0.0,
        u_init: str = "normal",
        eps: float = 1e-6,
        variance_scope: str = "sample",
        running_momentum: float = 0.1,
    ) -> None:
        super().__init__(num_heads, head_dim)
        if variance and not block:
            raise ValueError("variance=True modulates the block angles and needs block=True")
        if block and head_dim % 2:
            raise ValueError(f"block reflection pairs channels: head_dim must be even, got {head_dim}")
        check_pairing(pairing)
        check_delta_form(delta_form)
        if u_init not in ("normal", "ones"):
            raise ValueError(f"u_init must be 'normal' or 'ones', got {u_init!r}")
        if variance_scope not in VARIANCE_SCOPES:
            raise ValueError(f"variance_scope must be one of {VARIANCE_SCOPES}, got {variance_scope!r}")
        if not 0.0 < running_momentum <= 1.0:
            raise ValueError(f"running_momentum must be in (0, 1], got {running_momentum}")
        self.variance_scope, self.running_momentum = variance_scope, float(running_momentum)
        self.gamma_init = float(gamma_init)
        self.block, self.variance, self.cross_head = bool(block), bool(variance), bool(cross_head)
        self.pairing, self.delta_form, self.eps = pairing, delta_form, check_eps("eps", eps, positive=True)
        self.theta_init, self.u_init = theta_init, u_init
        blocks = head_dim // 2
        self.theta = nn.Parameter(torch.empty(num_heads, blocks)) if block else None
        self.gamma = nn.Parameter(torch.zeros(num_heads, blocks)) if variance else None
        self.u = nn.Parameter(torch.empty(num_heads * head_dim)) if cross_head else None
        if variance and variance_scope == "running":
            self.register_buffer("running_var", torch.ones(num_heads, blocks))
        else:
            self.running_var = None
        # The options that change the map's function without changing its parameters' shapes travel with the
        # weights, so loading a state dict saved with another pairing or Δα form is an error, not a silent
        # change of outputs (see _check_loaded_config).
        self.register_buffer("map_config", self._config_code(), persistent=True)
        # the signs of H(0) = diag(−1, 1) per pair, made once: the fold runs every training forward
        sign = torch.ones(head_dim)
        if pairing == "adjacent":
            sign[0::2] = -1.0
        else:
            sign[: head_dim // 2] = -1.0
        self.register_buffer("pair_signs", sign, persistent=False)
        self._register_load_state_dict_pre_hook(self._check_loaded_config)
        self.reset_parameters()

    _CONFIG_FIELDS = ("pairing", "delta_form", "block", "variance", "cross_head", "variance_scope")

    def _config_code(self) -> torch.Tensor:
        return torch.tensor([PAIRINGS.index(self.pairing), sorted(DELTA_FORMS).index(self.delta_form),
                             int(self.block), int(self.variance), int(self.cross_head),
                             VARIANCE_SCOPES.index(self.variance_scope)], dtype=torch.int64)

    def _decode_config(self, code: torch.Tensor) -> dict[str, Any]:
        values = [int(v) for v in code.tolist()]
        if len(values) == len(self._CONFIG_FIELDS) - 1:  # saved before variance_scope existed: always "sample"
            values.append(0)
        if len(values) != len(self._CONFIG_FIELDS):
            return {"map_config": values}

        def name(choices, i):
            return choices[i] if 0 <= i < len(choices) else i

        return {"pairing": name(PAIRINGS, values[0]), "delta_form": name(sorted(DELTA_FORMS), values[1]),
                "block": bool(values[2]), "variance": bool(values[3]), "cross_head": bool(values[4]),
                "variance_scope": name(VARIANCE_SCOPES, values[5])}

    def _check_loaded_config(self, state_dict, prefix, *_args) -> None:
        key = prefix + "map_config"
        if key not in state_dict:  # a state dict from before the config was stored: nothing to compare
            state_dict[key] = self.map_config.clone()
            return
        saved, mine = self._decode_config(state_dict[key]), self._decode_config(self.map_config)
        diff = {k: (saved.get(k), v) for k, v in mine.items() if saved.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}={a!r} in the state dict but {b!r} here" for k, (a, b) in diff.items())
            raise ValueError(f"{prefix or 'mirror feature map'}: the state dict was saved with another MirrorLA "
                             f"configuration: {detail}")
        state_dict[key] = self.map_config.clone()  # same configuration; an older, shorter code is brought up to date

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.theta is not None:
                if self.theta_init == "uniform":
                    self.theta.uniform_(0.0, math.pi)
                elif self.theta_init == "zero":
                    self.theta.zero_()
                elif isinstance(self.theta_init, (int, float)):
                    self.theta.fill_(float(self.theta_init))
                else:
                    raise ValueError(f"theta_init must be 'uniform', 'zero' or a float, got {self.theta_init!r}")
            if self.gamma is not None:
                self.gamma.fill_(self.gamma_init)
            if self.running_var is not None:
                self.running_var.fill_(1.0)
            if self.u is not None:
                if self.u_init == "normal":
                    self.u.normal_()
                else:
                    self.u.fill_(1.0)

    def _running(self, sample_var: torch.Tensor) -> torch.Tensor:
        """The running σ² ``[1, H, d/2]``: updated from this batch's mean per-sample σ² in training mode, then used
        as it stands (a constant to autograd, like BatchNorm's running statistics)."""
        if self.training:
            with torch.no_grad():
                batch = sample_var.detach().mean(0).to(self.running_var.dtype)
                self.running_var.lerp_(batch, self.running_momentum)
        return self.running_var.to(sample_var.dtype).unsqueeze(0)

    def block_variance(self, x_cross: torch.Tensor, *, folded: bool = False) -> torch.Tensor:
        """σ² of ``x`` ``[B, H, N, d]`` (after the cross-head reflection; with ``folded`` also after ``H(0)``, which
        negated the first channel of each pair) for this map's ``variance_scope``: ``[B, H, d/2]`` (sample),
        ``[1, H, d/2]`` (running) or ``[B, H, N, d/2]`` (token), fp32."""
        if self.variance_scope == "token":
            pairs = pair_channels(x_cross.to(torch.promote_types(x_cross.dtype, torch.float32)), self.pairing)
            # the variance of two numbers a, b is ((a − b)/2)²; H(0) turned a into −a
            half_gap = (pairs[..., 0] + pairs[..., 1] if folded else pairs[..., 0] - pairs[..., 1]) * 0.5
            return half_gap.square()
        if folded:
            var = folded_variance(token_sums(x_cross), x_cross.shape[2], pairing=self.pairing)
        else:
            var = block_variance(x_cross, pairing=self.pairing, dim=2)
        return self._running(var) if self.variance_scope == "running" else var

    def delta_alpha(self, k_cross: torch.Tensor) -> torch.Tensor:
        """Δα(σ²) (fp32) from keys after the cross-head reflection ``[B, H, N, d]``: ``[B, H, d/2]`` per sample
        (``[1, H, d/2]`` running, ``[B, H, N, d/2]`` per token, see ``variance_scope``)."""
        return self._delta(self.block_variance(k_cross))

    def _delta(self, var: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma.to(var.dtype)
        return DELTA_FORMS[self.delta_form](var, gamma[:, None] if var.dim() == 4 else gamma, self.eps)

    def variance_offsets(self, k: torch.Tensor) -> torch.Tensor:
        """Δα ``[B, H, d/2]`` (fp32) of plain projected keys ``[B, H, N, d]``: the map's own order (the cross-head
        reflection first, then the block statistic), for analysis tools."""
        if not self.variance:
            raise ValueError("variance_offsets needs variance=True")
        return self.delta_alpha(cross_head_reflect(k, self.u) if self.cross_head else k)

    def angles(self, k_cross: torch.Tensor) -> torch.Tensor:
        """Θ (fp32) for keys (or, per token, any features) after the cross-head reflection: ``[B or 1, H, 1, d/2]``,
        or ``[B, H, N, d/2]`` with ``variance_scope="token"``."""
        theta = self.theta.to(torch.promote_types(self.theta.dtype, torch.float32))  # [H, d/2]
        if not self.variance:
            return theta[None, :, None]
        delta = self.delta_alpha(k_cross)
        if self.variance_scope == "token":
            return theta[None, :, None] + delta
        return (theta[None] + delta).unsqueeze(2)

    def reflect(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The map before the ReLU: an orthogonal map per sample, shared by q and k (``[B, H, N, d]``).

        It preserves the inner product of every query-key pair of a sample over all C = H·d channels; the
        per-head products change when ``cross_head`` mixes channels across heads.
        """
        self._check(q, k)
        if self.cross_head:
            q, k = cross_head_reflect(q, self.u), cross_head_reflect(k, self.u)
        if self.block:
            theta = self.angles(k)
            theta_q = self.angles(q) if self.variance and self.variance_scope == "token" else theta
            q = block_reflect(q, theta_q, pairing=self.pairing)
            k = block_reflect(k, theta, pairing=self.pairing)
        return q, k

    @property
    def foldable(self) -> bool:
        return self.cross_head or self.block

    def fold_projection(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """``(T·W, T·b)`` for the static part ``T = H_blk(θ or 0) · H_cross`` of the map.

        ``weight`` ``[C, C_in]`` or ``[G, C, C_in]`` (G projections folded together, e.g. q and k; output channels
        head-major, as the heads are split), ``bias`` ``[C]`` / ``[G, C]`` or None. Costs O(C·C_in) per call,
        nothing next to the N·C·C_in of the projection itself; a handful of small ops for q and k together.
        """
        c = self.num_heads * self.head_dim
        grouped = weight.dim() == 3
        if weight.dim() not in (2, 3) or weight.shape[-2] != c or (
                bias is not None and bias.shape != weight.shape[:-1]):
            raise ValueError(f"weight must be [C={c}, C_in] or [G, C={c}, C_in] and bias [C] or [G, C], got "
                             f"{tuple(weight.shape)} and {None if bias is None else tuple(bias.shape)}")
        weight = weight if grouped else weight[None]
        rows = weight.transpose(-1, -2)  # [G, C_in, C]: the input channels act as tokens
        if bias is not None:
            rows = torch.cat([rows, (bias if grouped else bias[None])[:, None]], 1)
        groups, m = rows.shape[0], rows.shape[1]
        x = rows.reshape(groups, m, self.num_heads, self.head_dim).transpose(1, 2)  # [G, H, M, d]
        if self.cross_head:
            x = cross_head_reflect(x, self.u)
        # With the variance modulation the per-sample part stays per token: H(0) is folded and the tokens only need
        # the rotation R(2Θ) (H(Θ) = R(2Θ)·H(0)). Without it the whole H(θ) is static.
        if self.block and self.variance:
            x = x * self.pair_signs.to(x.dtype)  # H(0) = diag(−1, 1) per pair
        elif self.block:
            x = block_reflect(x, self.theta[None, :, None, :].to(x.dtype), pairing=self.pairing)
        rows = x.transpose(1, 2).reshape(groups, m, c)
        w, b = (rows[:, :-1], rows[:, -1]) if bias is not None else (rows, None)
        w = w.transpose(-1, -2)
        if not grouped:
            return w[0], None if b is None else b[0]
        return w, b

    def fold_leading_rows(self, weight: torch.Tensor, bias: torch.Tensor | None, groups: int,
                          out_dtype: torch.dtype | None = None):
        # The common configurations (cross-head reflection, with the H(0) signs of the variance-modulated blocks or
        # without blocks) are one reflection and a sign flip: a single autograd node with a closed-form backward,
        # which keeps a training step's host time and kernel count near ReLU's. Static block angles take the
        # general path.
        if self.cross_head and (self.variance or not self.block):
            return reflect_projection_rows(weight, bias, self.u, self.pair_signs if self.block else None,
                                           groups=groups, out_dtype=out_dtype)
        return super().fold_leading_rows(weight, bias, groups, out_dtype)

    def forward(self, q, k, *, folded: bool = False):
        """``(φ(q), φ(k))``. With ``folded=True`` q and k come from projections folded by
        :meth:`fold_projection`, and only the per-sample part of the map runs here
        (:func:`~mirrorla.ops.folded_mirror_map`: σ², the rotation by 2Θ and the ReLU), outputs in fp32."""
        if not folded:
            q, k = self.reflect(q, k)
            return F.relu(q), F.relu(k)
        self._check(q, k)
        if not (self.block and self.variance):
            return F.relu(q), F.relu(k)
        if self.variance_scope == "sample":
            return folded_mirror_map(q, k, self.theta, self.gamma, eps=self.eps, delta_form=self.delta_form,
                                     pairing=self.pairing)
        angle_k = self._folded_angle(k)
        angle_q = self._folded_angle(q) if self.variance_scope == "token" else angle_k
        return self._rotate_relu(q, angle_q), self._rotate_relu(k, angle_k)

    def _folded_angle(self, x: torch.Tensor) -> torch.Tensor:
        """2Θ for folded features: ``[1, H, d/2]`` (running) or ``[B, H, N, d/2]`` (token)."""
        var = self.block_variance(x, folded=True)
        theta = self.theta.to(var.dtype)
        return 2.0 * ((theta[:, None] if var.dim() == 4 else theta) + self._delta(var))

    def _rotate_relu(self, x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
        if angle.dim() == 4:  # per-token angles: only the reference takes them
            return rotate_relu_reference(x, angle, pairing=self.pairing)
        return rotate_relu(x, angle, pairing=self.pairing)

    def attend(self, q, k, v, *, eps=1e-6, return_attn=False, folded=False):
        """Linear attention with this map. With ``folded=True`` and the Triton backend, σ² comes from one pass
        over k and the rotation and ReLU run inside the attention kernels (φ(q), φ(k) never reach memory)."""
        if return_attn or not folded:
            return super().attend(q, k, v, eps=eps, return_attn=return_attn, folded=folded)
        self._check(q, k)
        if not (self.block and self.variance):  # the whole map is static and folded: what remains is ReLU
            return mapped_linear_attention(q, k, v, feature="relu", eps=eps)
        if self.variance_scope == "running":  # one Θ for every sample: the rotation runs inside the fused core
            return mapped_linear_attention(q, k, v, feature="rotate_relu", angle=self._folded_angle(k),
                                           pairing=self.pairing, eps=eps)
        if self.variance_scope == "token":  # per-token angles: only the reference takes them
            return super().attend(q, k, v, eps=eps, folded=True)
        # q, k checked above, the map's own θ, γ, pairing, form and ε at construction: the op's dispatch alone
        return _mirror_linear_attention(q, k, v, self.theta, self.gamma, self.pairing, self.delta_form, self.eps,
                                        check_eps("eps", eps))

    def elementwise_flops_per_token(self) -> int:
        c = self.num_heads * self.head_dim
        flops = 2 * c  # ReLU on q and k
        if self.cross_head:
            flops += 2 * 4 * c  # uᵀz (mul+add) and z − 2su (mul+sub), for q and k
        if self.block:
            flops += 2 * 3 * c  # per output coordinate: two products and one add, q and k
        if self.variance:
            flops += 3 * c  # sum and sum of squares of k
        return flops

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, block={self.block}, variance={self.variance}, "
            f"cross_head={self.cross_head}, pairing={self.pairing!r}, delta_form={self.delta_form!r}"
        )
