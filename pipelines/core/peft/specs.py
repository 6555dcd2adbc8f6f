"""Adapter specifications: one frozen dataclass per method, usable from Python and from YAML recipes.

Each spec carries a `method` literal, so a recipe schema can put them in a pydantic discriminated union,
and `extra="forbid"`, so a misspelt option in a recipe is an error rather than a silent default.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

# pydantic reads this (a plain dict is a valid ConfigDict); the module itself does not need pydantic.
_FORBID = {"extra": "forbid"}

_FEED_FORWARD_OUTPUT = r"re:.*(mlp\.down_proj|(^|\.)fc2|(?<!attention\.)output\.dense)"
BOTTLENECK_PRESETS = {
    # After the attention output projection and after the feed-forward output (Houlsby et al. 2019).
    "houlsby": [
        r"re:.*(self_attn\.o_proj|self_attn\.out_proj|attn\.proj|attention\.output\.dense)",
        _FEED_FORWARD_OUTPUT,
    ],
    # After the feed-forward output only (Pfeiffer et al. 2021).
    "pfeiffer": [_FEED_FORWARD_OUTPUT],
}


@dataclass(frozen=True)
class LoRA:
    """Low-rank update W + (alpha / r) * B A on Linear, Embedding, Conv1d/2d/3d and ConvTranspose1d layers.

    `use_rslora` scales by alpha / sqrt(r); `use_dora` (Linear only) learns a per-output magnitude;
    `init="gaussian"` draws A from N(0, 1/r) instead of Kaiming-uniform; B starts at zero either way.
    `"pissa"` (Meng et al. 2024; `"pissa_niter_K"`: K-iteration randomised SVD) and `"olora"` (Buyukakyuz
    2024; QR) start B A at the base weight's principal part and subtract it from the base (Linear only, as
    HF peft; see lora_init.py).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=list)
    use_dora: bool = False
    use_rslora: bool = False
    init: str = "default"
    method: Literal["lora"] = "lora"
    __pydantic_config__ = _FORBID

    def __post_init__(self) -> None:
        if not re.fullmatch(r"default|gaussian|pissa|olora|pissa_niter_[1-9][0-9]*", str(self.init)):
            raise ValueError(f"The lora init must be 'default', 'gaussian', 'pissa', 'pissa_niter_K' "
                             f"(K a positive integer) or 'olora', not {self.init!r}.")  # fmt: skip
        if self.use_dora and self.init.startswith(("pissa", "olora")):
            raise ValueError(
                f"The lora init {self.init!r} cannot be combined with use_dora; drop one of them."
            )

    @property
    def scaling(self) -> float:
        return self.alpha / (self.r**0.5 if self.use_rslora else self.r)


@dataclass(frozen=True)
class Bottleneck:
    """A down-projection, activation and zero-initialised up-projection added to a module's output.

    `placement="serial"` feeds the module's output through the adapter (Houlsby, Pfeiffer);
    `"parallel"` feeds the module's input (AdaptFormer). `hidden` overrides `channels // reduction`.
    `preset` ("houlsby" or "pfeiffer") adds the usual targets of common transformer families.
    `channels` lets it wrap a whole block (a ViT's MLP, for AdaptFormer) whose input and output are
    (batch, tokens, channels) tensors of that width.
    """

    targets: list[str] = field(default_factory=list)
    hidden: int | None = None
    reduction: int = 16
    placement: Literal["serial", "parallel"] = "serial"
    activation: Literal["gelu", "relu", "silu", "tanh"] = "gelu"
    scale: float = 1.0
    preset: Literal["houlsby", "pfeiffer"] | None = None
    channels: int | None = None
    method: Literal["bottleneck"] = "bottleneck"
    __pydantic_config__ = _FORBID


@dataclass(frozen=True)
class IA3:
    """A learned per-channel rescaling of a layer's output, initialised to one (Liu et al. 2022)."""

    targets: list[str] = field(default_factory=list)
    method: Literal["ia3"] = "ia3"
    __pydantic_config__ = _FORBID


@dataclass(frozen=True)
class SSF:
    """Scale and shift of a layer's output features, initialised to identity (Lian et al. 2022)."""

    targets: list[str] = field(default_factory=list)
    method: Literal["ssf"] = "ssf"
    __pydantic_config__ = _FORBID


@dataclass(frozen=True)
class BitFit:
    """Trains a zero-initialised offset to each targeted layer's bias; no targets means every bias."""

    targets: list[str] = field(default_factory=list)
    method: Literal["bitfit"] = "bitfit"
    __pydantic_config__ = _FORBID


@dataclass(frozen=True)
class NormTuning:
    """Trains offsets to norm layers' affine parameters; BatchNorm keeps its own running statistics.

    No targets means every BatchNorm, LayerNorm, GroupNorm and RMSNorm layer.
    """

    targets: list[str] = field(default_factory=list)
    method: Literal["norm"] = "norm"
    __pydantic_config__ = _FORBID


@dataclass(frozen=True)
class PromptTuning:
    """Learned prompt tokens inserted into a (batch, tokens, channels) output at position `insert_at`.

    Target the token embedding of a language model, or a module after the position embedding of a ViT
    (visual prompt tuning, `insert_at=1` to keep the class token first). The caller extends any
    attention mask by `num_tokens` (see `extend_attention_mask`). `channels` is needed only when the
    target is not a Linear, Embedding, convolution or norm layer (e.g. a ViT's position dropout).
    """

    num_tokens: int = 10
    targets: list[str] = field(default_factory=list)
    insert_at: int = 0
    channels: int | None = None
    method: Literal["prompt"] = "prompt"
    __pydantic_config__ = _FORBID


def _check_rank(method: str, r: int) -> None:
    if r < 1:
        raise ValueError(f"The {method} rank r must be a positive integer, not {r}; set r: 8, say.")


@dataclass(frozen=True)
class LoHa:
    """Hadamard product of two low-rank updates, (alpha / r) (W1a W1b) * (W2a W2b), on Linear and Conv1d/2d.

    As HF peft's LoHaConfig (FedPara, Hyeon-Woo et al. 2022; LyCORIS): W2b starts at zero.
    `use_effective_conv2d` factors a k x k kernel through an (r, r, k, k) core (FedPara's Proposition 3).
    """

    r: int = 8
    alpha: float = 8.0
    targets: list[str] = field(default_factory=list)
    use_effective_conv2d: bool = False
    method: Literal["loha"] = "loha"
    __pydantic_config__ = _FORBID

    def __post_init__(self) -> None:
        _check_rank("loha", self.r)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass(frozen=True)
class LoKr:
    """Kronecker product of a small and a low-rank factor, (alpha / r) W1 kron W2a W2b, on Linear and Conv2d.

    As HF peft's LoKrConfig (LyCORIS): W1 starts at zero. Each weight dimension splits into two factors
    near its square root, or near `decompose_factor` when that is positive; `decompose_both` makes W1
    low-rank too. A factor with r at least half its larger side stays full, as in peft.
    """

    r: int = 8
    alpha: float = 8.0
    targets: list[str] = field(default_factory=list)
    decompose_both: bool = False
    decompose_factor: int = -1
    use_effective_conv2d: bool = False
    method: Literal["lokr"] = "lokr"
    __pydantic_config__ = _FORBID

    def __post_init__(self) -> None:
        _check_rank("lokr", self.r)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


@dataclass(frozen=True)
class VeRA:
    """Shared frozen random projections with trainable vectors, b * (B (d * (A x))), on Linear layers.

    As HF peft's VeraConfig (Kopiczko et al. 2024): one A (r x widest input) and B (widest output x r),
    drawn from `projection_prng_key` and sliced by every adapted layer; d starts at `d_initial` and b at
    zero. `save_projection` writes A and B into adapter files (otherwise loading redraws them).
    """

    r: int = 256
    targets: list[str] = field(default_factory=list)
    projection_prng_key: int = 0
    d_initial: float = 0.1
    save_projection: bool = True
    dropout: float = 0.0
    method: Literal["vera"] = "vera"
    __pydantic_config__ = _FORBID

    def __post_init__(self) -> None:
        _check_rank("vera", self.r)


@dataclass(frozen=True)
class AdaLoRA:
    """SVD-form LoRA, alpha / init_r * B diag(E) A, whose ranks are pruned in training (Zhang et al. 2023).

    As HF peft's AdaLoraConfig, on Linear and Conv2d; E starts at zero. After `tinit` steps the total rank
    falls cubically to `target_r` per layer by `total_step - tfinal` (None: the run's steps), every `delta_t`
    steps, by smoothed importance (`beta1`) times uncertainty (`beta2`); `orth_reg_weight` weighs the
    orthogonality penalty added to the loss (adalora_schedule.py). `rank_pattern`: path -> kept of init_r.
    """

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=list)
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] = field(default_factory=dict)
    method: Literal["adalora"] = "adalora"
    __pydantic_config__ = _FORBID

    def __post_init__(self) -> None:
        if not 0 <= self.target_r <= self.init_r or self.init_r < 1:
            raise ValueError(f"The adalora init_r must be positive and target_r in [0, "
                             f"init_r={self.init_r}], not {self.target_r}.")  # fmt: skip
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError(
                f"The adalora beta1 and beta2 must be in (0, 1), not {self.beta1}, {self.beta2}."
            )
        if self.orth_reg_weight < 0 or self.delta_t < 1 or self.tinit < 0 or self.tfinal < 0:
            raise ValueError(
                "The adalora orth_reg_weight, tinit and tfinal must be non-negative, delta_t positive."
            )
        if self.total_step is not None:
            self.check_schedule(self.total_step)

    @property
    def scaling(self) -> float:
        return self.alpha if self.alpha > 0 else float(self.init_r)

    def check_schedule(self, total_step: int) -> None:
        """Refuses a schedule with no rank-budgeting step in `total_step` steps, as HF peft does."""
        if self.tinit >= total_step - self.tfinal:
            raise ValueError(f"The adalora tinit ({self.tinit}) and tfinal ({self.tfinal}) leave no "
                             f"rank-budgeting steps in {total_step} training steps; lower them or train "
                             "longer.")  # fmt: skip


_TOKEN_EMBEDDING = r"re:(.*\.)?(embed_tokens|word_embeddings)"


def _check_tokens(method: str, num_tokens: int) -> None:
    if num_tokens < 1:
        raise ValueError(
            f"The {method} num_tokens must be a positive integer, not {num_tokens}; set 20, say."
        )


@dataclass(frozen=True)
class PTuning:
    """P-tuning (Liu et al. 2021): a prompt encoder's output, `num_tokens` vectors before the token embeds.

    As HF peft's PromptEncoderConfig: `encoder="mlp"` maps learned embeddings through three Linear layers
    (ReLU between), `"lstm"` through a bidirectional LSTM of `encoder_num_layers` and two Linear layers;
    `encoder_hidden_size` defaults to the embedding width. `"none"` trains the encoded prompt itself, which is
    what HF peft files hold (loading one gives it). Targets the token embedding of a LlamaForCausalLM,
    LlamaModel, BertModel or EsmModel (see ptuning.py for how the model's call changes).
    """

    num_tokens: int = 20
    encoder: Literal["mlp", "lstm", "none"] = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: [_TOKEN_EMBEDDING])
    method: Literal["ptuning"] = "ptuning"
    __pydantic_config__ = _FORBID

    def __post_init__(self) -> None:
        _check_tokens("ptuning", self.num_tokens)


@dataclass(frozen=True)
class PrefixTuning:
    """Prefix tuning (Li & Liang 2021): `num_tokens` trained keys and values before each attention layer's.

    As HF peft's PrefixTuningConfig: the prefixes are an embedding of shape (num_tokens, layers x 2 x
    key-value width), or with `prefix_projection` an embedding of the key-value width mapped by Linear, tanh,
    Linear (hidden `encoder_hidden_size`, default that width). For LlamaForCausalLM, LlamaModel and
    BertModel; its target is the model's token embedding, which holds the prefix encoder (see prefix.py).
    """

    num_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    targets: list[str] = field(default_factory=lambda: [_TOKEN_EMBEDDING])
    method: Literal["prefix"] = "prefix"
    __pydantic_config__ = _FORBID

    def __post_init__(self) -> None:
        _check_tokens("prefix", self.num_tokens)


@dataclass(frozen=True)
class SCT:
    """Salient channel tuning (Zhao et al. 2023): a K x K map added to K chosen output channels of a target.

    out[..., S] += scale * (W out[..., S] + b), with S the `top_k` channels (or `fraction` of them, 1/8 if
    neither is set) of largest activation L2 norm. `select_salient_channels` measures them on given batches
    and returns this spec with `selected` (layer path -> channel indices); without `selected`, the first
    `calibration_batches` training-mode forward passes measure them. W and b start at zero (the paper draws
    W from N(0, 0.02)), so the model starts as its base; `bias: false` drops b, so that the map merges into a
    layer without a bias (LLaMA's). `channels` is the output width when a target is a whole block rather
    than a Linear, Embedding, convolution or norm layer.
    """

    targets: list[str] = field(default_factory=list)
    top_k: int | None = None
    fraction: float | None = None
    scale: float = 1.0
    bias: bool = True
    selected: dict[str, list[int]] = field(default_factory=dict)
    calibration_batches: int = 8
    channels: int | None = None
    method: Literal["sct"] = "sct"
    __pydantic_config__ = _FORBID

    def __post_init__(self) -> None:
        if self.top_k is not None and self.fraction is not None:
            raise ValueError("SCT takes top_k or fraction, not both; drop one of them.")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"The sct top_k must be a positive integer, not {self.top_k}.")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"The sct fraction must be in (0, 1], not {self.fraction}.")
        if self.calibration_batches < 1:
            raise ValueError(f"The sct calibration_batches must be positive, not {self.calibration_batches}.")

    def count(self, width: int) -> int:
        """How many of a layer's `width` channels are tuned."""
        if self.top_k is not None:
            return self.top_k
        return max(1, round((self.fraction if self.fraction is not None else 0.125) * width))


AdapterSpec = (LoRA | Bottleneck | IA3 | SSF | BitFit | NormTuning | PromptTuning | LoHa | LoKr | VeRA
               | PTuning | PrefixTuning | SCT | AdaLoRA)  # fmt: skip
ADAPTER_METHODS: dict[str, type] = {
    cls.method: cls
    for cls in (LoRA, Bottleneck, IA3, SSF, BitFit, NormTuning, PromptTuning, LoHa, LoKr, VeRA, PTuning)
    + (PrefixTuning, SCT, AdaLoRA)
}


def spec_from_dict(data: dict[str, Any]) -> AdapterSpec:
    """Builds an adapter spec from a dict with a `method` key, checking every option name."""
    data = dict(data)
    method = data.pop("method", None)
    if method not in ADAPTER_METHODS:
        raise ValueError(f"Unknown adapter method {method!r}; choose one of {sorted(ADAPTER_METHODS)}.")
    cls = ADAPTER_METHODS[method]
    known = set(cls.__dataclass_fields__) - {"method"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"Adapter method {method!r} has no option {unknown[0]!r}; options: {sorted(known)}.")
    if "targets" in data:
        data["targets"] = list(data["targets"])
    return cls(**data)


def as_spec(adapter: AdapterSpec | dict[str, Any] | None) -> AdapterSpec | None:
    """A spec given as a spec, a dict with a `method` key (see `spec_from_dict`) or None, as a spec."""
    if adapter is None or hasattr(adapter, "method"):
        return adapter
    return spec_from_dict(dict(adapter))


def spec_to_dict(spec: AdapterSpec) -> dict[str, Any]:
    """The JSON-safe dict of a spec, `method` included."""
    return asdict(spec)
