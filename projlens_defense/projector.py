"""Format-independent view of a vision-language projector.

Every reader turns its checkpoint layout into a :class:`Projector` (a chain of Linear layers with
an activation between them, optionally preceded by the Qwen2-VL merger's norm + patch merge), so
detectors and mitigations never see key names or dtypes. The view remembers the original key
names and dtypes so the writer can put repaired weights back exactly where they came from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from projlens_defense.errors import CheckpointError

__all__ = ["ACTIVATIONS", "LinearLayer", "Projector", "ProjectorModule"]


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "none": lambda x: x,
}
"""Activations applied between Linear layers, by the names HF configs use (`projector_hidden_act`)."""

NORM_TYPES = ("layernorm", "rmsnorm")

DtypePair = tuple[torch.dtype | None, torch.dtype | None]
KeyPair = tuple[str | None, str | None]


@dataclass(eq=False)  # tensors have no truth value; compare with torch.equal
class LinearLayer:
    """One Linear layer: ``weight`` is (out, in), ``bias`` is (out,) or None; float32 copies for math."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite. A float32 sum is finite only if every term is (a NaN or inf
    propagates), so the common case costs one reduction; a non-finite sum (or an overflow) is settled
    element-wise."""
    if not t.is_floating_point():
        return True
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


@dataclass(eq=False)
class Projector:
    """A projector as math: ``[norm -> merge ->] Linear (-> act -> Linear)*``.

    ``keys[i]`` / ``dtypes[i]`` hold the checkpoint key names and original dtypes of layer i's
    weight and bias (None where there is none); ``pre_norm_keys`` / ``pre_norm_dtypes`` do the
    same for the merger norm. ``format`` is the checkpoint format name it was read from and
    ``source`` the path, used in error messages.
    """

    layers: list[LinearLayer]
    activation: str = "gelu"
    pre_norm: tuple[torch.Tensor, torch.Tensor | None] | None = None
    pre_norm_type: str = "layernorm"
    pre_norm_eps: float = 1e-6
    merge_size: int = 1
    keys: list[KeyPair] = field(default_factory=list)
    dtypes: list[DtypePair] = field(default_factory=list)
    pre_norm_keys: KeyPair | None = None
    pre_norm_dtypes: DtypePair | None = None
    format: str = "bare-projector"
    source: str | None = None

    # ------------------------------------------------------------------ dims
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def in_dim(self) -> int:
        """Width of one input vision feature (before the merger's patch merge, if any)."""
        return self.layers[0].in_features // (self.merge_size**2)

    @property
    def hidden_dim(self) -> int:
        """Output width of the first layer (equals ``out_dim`` for a single Linear)."""
        return self.layers[0].out_features

    @property
    def out_dim(self) -> int:
        return self.layers[-1].out_features

    # ---------------------------------------------------------------- naming
    def _where(self) -> str:
        return f"{self.source}: " if self.source else ""

    def layer_name(self, i: int) -> str:
        """Human name of layer ``i``: its checkpoint weight key when known, else ``layer i``."""
        if i < len(self.keys) and self.keys[i][0]:
            return str(self.keys[i][0]).removesuffix(".weight")
        return f"layer {i}"

    # ------------------------------------------------------------------ math
    def _act(self) -> Callable[[torch.Tensor], torch.Tensor]:
        try:
            return ACTIVATIONS[self.activation]
        except KeyError:
            raise CheckpointError(
                f"{self._where()}unsupported projector activation {self.activation!r} "
                f"(known: {', '.join(sorted(ACTIVATIONS))})"
            ) from None

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        assert self.pre_norm is not None
        weight, bias = self.pre_norm
        weight = weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
        if self.pre_norm_type == "rmsnorm":
            x32 = x.to(torch.float32)
            x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.pre_norm_eps)
            out = weight * x32.to(x.dtype)
            return out if bias is None else out + bias
        return F.layer_norm(x, (x.shape[-1],), weight, bias, self.pre_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project vision features ``x`` of shape [..., in_dim].

        Plain projectors keep the leading dims. The Qwen2-VL merger normalises each feature,
        then merges ``merge_size**2`` consecutive features into one row exactly as HF's
        ``PatchMerger`` does (``view(-1, in_dim * merge_size**2)``), so it returns [N, out_dim].
        """
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"expected input features of width {self.in_dim}, got {tuple(x.shape)}")
        group = self.merge_size**2
        if group > 1 and (x.numel() // self.in_dim) % group:
            raise ValueError(
                f"the merger needs the number of features to be a multiple of {group}, got {tuple(x.shape)}"
            )
        h = x
        if self.pre_norm is not None:
            h = self._norm(h)
        if self.merge_size > 1 or self.pre_norm is not None:
            h = h.reshape(-1, self.layers[0].in_features)
        act = self._act()
        for i, layer in enumerate(self.layers):
            if i:
                h = act(h)
            h = F.linear(h, layer.weight.to(h.dtype), None if layer.bias is None else layer.bias.to(h.dtype))
        return h

    __call__ = forward

    def delta(self, reference: Projector) -> list[torch.Tensor]:
        """dW = W_self - W_reference per layer (float32); the update a fine-tune made."""
        if reference.num_layers != self.num_layers:
            raise CheckpointError(
                f"{self._where()}cannot compare with reference {reference.source or '<projector>'}: "
                f"{self.num_layers} layers vs {reference.num_layers}"
            )
        out = []
        for i, (mine, ref) in enumerate(zip(self.layers, reference.layers, strict=True)):
            if mine.weight.shape != ref.weight.shape:
                raise CheckpointError(
                    f"{self._where()}cannot compare with reference {reference.source or '<projector>'}: "
                    f"{self.layer_name(i)} has shape {tuple(mine.weight.shape)}, "
                    f"reference has {tuple(ref.weight.shape)}"
                )
            out.append(mine.weight.float() - ref.weight.float())
        return out

    def with_weights(
        self, weights: list[torch.Tensor], biases: list[torch.Tensor | None] | None = None
    ) -> Projector:
        """A new Projector with these layer weights (and biases); keys, dtypes, format, norm kept.

        ``biases=None`` keeps the current biases. Shapes must match the current layers and a
        bias can be neither added nor dropped, since the checkpoint has a fixed set of keys;
        violations raise ValueError (a programming error, not a bad file).
        """
        if len(weights) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} weight matrices, got {len(weights)}")
        if biases is None:
            biases = [layer.bias for layer in self.layers]
        if len(biases) != self.num_layers:
            raise ValueError(f"expected {self.num_layers} biases, got {len(biases)}")
        layers = []
        for i, (layer, w, b) in enumerate(zip(self.layers, weights, biases, strict=True)):
            if tuple(w.shape) != tuple(layer.weight.shape):
                raise ValueError(
                    f"{self.layer_name(i)}: new weight shape {tuple(w.shape)} != {tuple(layer.weight.shape)}"
                )
            if (b is None) != (layer.bias is None):
                raise ValueError(f"{self.layer_name(i)}: cannot add or drop a bias")
            if b is not None and layer.bias is not None and tuple(b.shape) != tuple(layer.bias.shape):
                raise ValueError(
                    f"{self.layer_name(i)}: new bias shape {tuple(b.shape)} != {tuple(layer.bias.shape)}"
                )
            layers.append(
                LinearLayer(
                    w.detach().to(torch.float32, copy=True).cpu(),
                    None if b is None else b.detach().to(torch.float32, copy=True).cpu(),
                )
            )
        return replace(self, layers=layers, keys=list(self.keys), dtypes=list(self.dtypes))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The projector's tensors under their original checkpoint keys, in their original dtypes."""
        if len(self.keys) != self.num_layers:
            raise ValueError("this Projector has no checkpoint key names (was it built by hand?)")
        out: dict[str, torch.Tensor] = {}

        def put(key: str | None, tensor: torch.Tensor | None, dtype: torch.dtype | None) -> None:
            if key is None or tensor is None:
                return
            out[key] = tensor.detach().to(dtype or torch.float32).contiguous().clone()

        if self.pre_norm is not None and self.pre_norm_keys is not None:
            nd = self.pre_norm_dtypes or (None, None)
            put(self.pre_norm_keys[0], self.pre_norm[0], nd[0])
            put(self.pre_norm_keys[1], self.pre_norm[1], nd[1])
        for i, layer in enumerate(self.layers):
            wd, bd = self.dtypes[i] if i < len(self.dtypes) else (None, None)
            put(self.keys[i][0], layer.weight, wd)
            put(self.keys[i][1], layer.bias, bd)
        return out

    def validate(self) -> Projector:
        """Check shapes chain layer to layer and all values are finite; return self.

        Raises CheckpointError naming the offending layer, so a corrupt or mis-assembled
        checkpoint is refused before any detector does math on it.
        """
        where = self._where()
        if not self.layers:
            raise CheckpointError(f"{where}projector has no layers")
        self._act()
        if self.merge_size < 1:
            raise CheckpointError(f"{where}invalid merge size {self.merge_size}")
        for i, layer in enumerate(self.layers):
            name = self.layer_name(i)
            if layer.weight.ndim != 2:
                raise CheckpointError(
                    f"{where}{name}: weight must be 2-D, got shape {tuple(layer.weight.shape)}"
                )
            if layer.bias is not None and tuple(layer.bias.shape) != (layer.out_features,):
                raise CheckpointError(
                    f"{where}{name}: bias shape {tuple(layer.bias.shape)} does not match weight "
                    f"shape {tuple(layer.weight.shape)}"
                )
            if i and self.layers[i - 1].out_features != layer.in_features:
                raise CheckpointError(
                    f"{where}shapes do not chain: {self.layer_name(i - 1)} outputs "
                    f"{self.layers[i - 1].out_features} features but {name} expects {layer.in_features}"
                )
            for what, t in (("weight", layer.weight), ("bias", layer.bias)):
                if t is not None and not all_finite(t):
                    bad = int((~torch.isfinite(t)).sum())
                    raise CheckpointError(f"{where}{name}: {what} has {bad} NaN/inf value(s)")
        if self.pre_norm is not None:
            if self.pre_norm_type not in NORM_TYPES:
                raise CheckpointError(f"{where}unknown pre-norm type {self.pre_norm_type!r}")
            weight, bias = self.pre_norm
            dim = self.layers[0].in_features
            if weight.ndim != 1 or weight.shape[0] * self.merge_size**2 != dim:
                raise CheckpointError(
                    f"{where}shapes do not chain: norm width {tuple(weight.shape)} x merge "
                    f"{self.merge_size}^2 != {self.layer_name(0)} input width {dim}"
                )
            if bias is not None and bias.shape != weight.shape:
                raise CheckpointError(
                    f"{where}norm bias shape {tuple(bias.shape)} != weight shape {tuple(weight.shape)}"
                )
            for what, t in (("norm weight", weight), ("norm bias", bias)):
                if t is not None and not all_finite(t):
                    raise CheckpointError(f"{where}{what} has NaN/inf values")
        elif self.merge_size != 1:
            raise CheckpointError(f"{where}merge size {self.merge_size} without a merger norm")
        return self

    @staticmethod
    def infer_merge_size(norm_dim: int, in_features: int) -> int | None:
        """The spatial merge size m with norm_dim * m^2 == in_features, or None."""
        if norm_dim <= 0 or in_features % norm_dim:
            return None
        m = math.isqrt(in_features // norm_dim)
        return m if m * m * norm_dim == in_features else None


class ProjectorModule(nn.Module):
    """An ``nn.Module`` of a :class:`Projector` with its weights as float32 parameters (same math; the merger
    norm stays fixed).

    Runs in place of a model's own projector (``LlavaRuntime.answer(..., projector=module)``: analysis curves,
    evaluations, repairs) and trains with :func:`~projlens_defense.training.train_projector`;
    :meth:`to_projector` gives the weights back with the source's keys and dtypes.
    """

    def __init__(self, projector: Projector) -> None:
        super().__init__()
        self.template = projector
        self.weights = nn.ParameterList([nn.Parameter(layer.weight.detach().float().clone()) for layer in projector.layers])
        self.biases = nn.ParameterList(
            [nn.Parameter(layer.bias.detach().float().clone()) for layer in projector.layers if layer.bias is not None]
        )
        self._has_bias = [layer.bias is not None for layer in projector.layers]

    def _layers(self) -> list[LinearLayer]:
        it = iter(self.biases)
        return [LinearLayer(w, next(it) if hb else None) for w, hb in zip(self.weights, self._has_bias, strict=True)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return replace(self.template, layers=self._layers()).forward(x)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Input of the last layer (after the activation): the channels pruning and guards act on."""
        layers = self._layers()
        proj = replace(self.template, layers=layers[:-1])
        return proj._act()(proj.forward(x)) if len(layers) > 1 else x

    def to_projector(self) -> Projector:
        """The current weights as a Projector with the template's keys, dtypes and format."""
        layers = self._layers()
        return self.template.with_weights([layer.weight.detach() for layer in layers],
                                          [None if layer.bias is None else layer.bias.detach() for layer in layers])
