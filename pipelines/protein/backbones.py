"""ESM-2 backbones: fair-esm checkpoints, transformers ``EsmModel`` checkpoints and random architectures.

Every loader returns ``(backbone, provenance)``. A backbone is an ``nn.Module`` with ``forward(tokens)``
returning the last hidden states (batch, tokens, hidden), ``masked_lm_logits(tokens)``, a ``vocabulary``,
``hidden_size``, ``num_layers``, ``max_residues`` and ``target_patterns(roles, layers)`` for LoRA.
``provenance`` says plainly where the weights came from: a file and its sha256, a hub id, or
``"random initialisation"``.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipelines.core.data import sha256_file

__all__ = [
    "BackboneError",
    "Vocabulary",
    "EsmBackbone",
    "HfEsmBackbone",
    "RANDOM_PRESETS",
    "FAIR_ESM_MODELS",
    "load_backbone",
    "random_esm2",
    "load_fair_esm_file",
    "load_transformers_esm",
    "expand_targets",
    "ROLE_ALIASES",
]

STANDARD_RESIDUES = "ACDEFGHIKLMNPQRSTVWY"
# ESM's alphabet also has X (unknown), B/Z (ambiguous), U (selenocysteine), O (pyrrolysine).
ALLOWED_RESIDUES = STANDARD_RESIDUES + "XBZUO"

# name -> (layers, embedding size, attention heads) of the published ESM-2 models.
FAIR_ESM_MODELS: dict[str, tuple[int, int, int]] = {
    "esm2_t6_8M_UR50D": (6, 320, 20),
    "esm2_t12_35M_UR50D": (12, 480, 20),
    "esm2_t30_150M_UR50D": (30, 640, 20),
    "esm2_t33_650M_UR50D": (33, 1280, 20),
    "esm2_t36_3B_UR50D": (36, 2560, 40),
    "esm2_t48_15B_UR50D": (48, 5120, 40),
}
FAIR_ESM_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt"
# Randomly initialised ESM-2 architectures for offline runs and tests (no weights exist offline).
RANDOM_PRESETS: dict[str, dict[str, int]] = {
    "esm2_tiny_random": {"num_layers": 2, "embed_dim": 32, "attention_heads": 4},
    "esm2_small_random": {"num_layers": 2, "embed_dim": 64, "attention_heads": 4},
}
# ESM-2 was trained on crops of 1022 residues (+ BOS and EOS = 1024 tokens).
DEFAULT_MAX_RESIDUES = 1022

# Names users write for the adapted layers -> canonical roles.
ROLE_ALIASES: dict[str, list[str]] = {
    "q": ["q"], "query": ["q"], "q_proj": ["q"],
    "k": ["k"], "key": ["k"], "k_proj": ["k"],
    "v": ["v"], "value": ["v"], "v_proj": ["v"],
    "out": ["out"], "out_proj": ["out"], "o": ["out"],
    "fc1": ["fc1"], "fc2": ["fc2"],
    # HF peft's "dense" suffix matches the attention output and both feed-forward layers of EsmLayer.
    "dense": ["out", "fc1", "fc2"],
    "attention": ["q", "k", "v", "out"],
    "feed_forward": ["fc1", "fc2"],
    "all": ["q", "k", "v", "out", "fc1", "fc2"],
}  # fmt: skip


class BackboneError(ValueError):
    """A backbone name, file or option that cannot be loaded."""


@dataclass(frozen=True)
class Vocabulary:
    """Token indices of an ESM alphabet and the residue letters it can encode."""

    token_to_index: dict[str, int] = field(repr=False)
    padding_index: int
    mask_index: int
    cls_index: int
    eos_index: int

    @classmethod
    def from_fair_esm(cls, alphabet: Any) -> Vocabulary:
        """Build from a fair-esm ``Alphabet``."""
        return cls(
            dict(alphabet.tok_to_idx),
            alphabet.padding_idx,
            alphabet.mask_idx,
            alphabet.cls_idx,
            alphabet.eos_idx,
        )

    @property
    def size(self) -> int:
        return max(self.token_to_index.values()) + 1

    def residue_indices(self) -> list[int]:
        """Indices of the 20 standard residues (for random replacement in masked-LM training)."""
        return [self.token_to_index[r] for r in STANDARD_RESIDUES]

    def encode(self, sequence: str) -> list[int]:
        """Return ``[CLS] residues [EOS]`` as indices; a letter outside the alphabet is a KeyError."""
        return [self.cls_index, *(self.token_to_index[r] for r in sequence), self.eos_index]


def _layer_regex(prefix: str, layers: list[int], paths: list[str]) -> str:
    layer_part = "|".join(str(i) for i in layers)
    path_part = "|".join(re.escape(p) for p in paths)
    return rf"re:(?:^|.*\.){re.escape(prefix)}\.(?:{layer_part})\.(?:{path_part})$"


class EsmBackbone(nn.Module):
    """A fair-esm ``ESM2`` (as ``self.model``) returning last-layer hidden states."""

    family = "fair-esm"
    role_paths = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "out": "self_attn.out_proj",
        "fc1": "fc1",
        "fc2": "fc2",
    }

    def __init__(self, model: nn.Module, vocabulary: Vocabulary, max_residues: int = DEFAULT_MAX_RESIDUES):
        super().__init__()
        self.model = model
        self.vocabulary = vocabulary
        self.max_residues = max_residues
        self.num_layers = len(model.layers)
        self.hidden_size = model.embed_dim
        self.layer_prefix = "model.layers"

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, repr_layers=[self.num_layers])["representations"][self.num_layers]

    def masked_lm_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)["logits"]

    def target_patterns(self, roles: list[str], layers: list[int]) -> list[str]:
        """Regex targets (``re:...``) for the given roles in the given layers."""
        return [_layer_regex(self.layer_prefix, layers, [self.role_paths[r] for r in roles])]


class HfEsmBackbone(nn.Module):
    """A transformers ``EsmForMaskedLM`` or ``EsmModel`` (as ``self.model``)."""

    family = "transformers"
    role_paths = {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "out": "attention.output.dense",
        "fc1": "intermediate.dense",
        "fc2": "output.dense",
    }

    def __init__(self, model: nn.Module, vocabulary: Vocabulary, max_residues: int = DEFAULT_MAX_RESIDUES):
        super().__init__()
        self.model = model
        self.vocabulary = vocabulary
        self.max_residues = max_residues
        self.has_lm_head = hasattr(model, "lm_head")
        encoder = model.esm if self.has_lm_head else model
        self.num_layers = len(encoder.encoder.layer)
        self.hidden_size = encoder.config.hidden_size
        self.layer_prefix = "model.esm.encoder.layer" if self.has_lm_head else "model.encoder.layer"

    def _encoder(self) -> nn.Module:
        return self.model.esm if self.has_lm_head else self.model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = tokens.ne(self.vocabulary.padding_index).long()
        return self._encoder()(input_ids=tokens, attention_mask=mask).last_hidden_state

    def masked_lm_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.has_lm_head:
            raise BackboneError(
                "this transformers checkpoint is an EsmModel without a language-model head, so masked-LM "
                "adaptation cannot run; use an EsmForMaskedLM checkpoint (e.g. facebook/esm2_t6_8M_UR50D)"
            )
        return self.model(input_ids=tokens, attention_mask=tokens.ne(self.vocabulary.padding_index)).logits

    def target_patterns(self, roles: list[str], layers: list[int]) -> list[str]:
        """Regex targets (``re:...``) for the given roles in the given layers."""
        return [_layer_regex(self.layer_prefix, layers, [self.role_paths[r] for r in roles])]


def expand_targets(backbone: nn.Module, targets: list[str], last_n_layers: int | None = None) -> list[str]:
    """Translate role names (``q``, ``key``, ``dense``, ``fc1``...) into module patterns of ``backbone``.

    Other targets (module suffixes, ``re:`` patterns) pass through unchanged; ``last_n_layers`` limits
    the role names to the last N transformer layers.

    Returns:
        The target list for ``pipelines.core.peft`` specs.
    """
    n = backbone.num_layers
    if last_n_layers is not None and not 1 <= last_n_layers <= n:
        raise BackboneError(f"last_n_layers={last_n_layers} is outside 1..{n} for this {n}-layer backbone")
    layers = list(range(n - (last_n_layers or n), n))
    roles: list[str] = []
    passthrough: list[str] = []
    for target in targets:
        if target in ROLE_ALIASES:
            roles += [r for r in ROLE_ALIASES[target] if r not in roles]
        else:
            passthrough.append(target)
    if last_n_layers is not None and passthrough:
        raise BackboneError(
            f"last_n_layers applies to role names ({', '.join(sorted(ROLE_ALIASES))}) only; the targets "
            f"{passthrough} are module patterns: write role names, or restrict the layers in a re: pattern"
        )
    ordered = [r for r in ("q", "k", "v", "out", "fc1", "fc2") if r in roles]
    return (backbone.target_patterns(ordered, layers) if ordered else []) + passthrough


def random_esm2(
    num_layers: int = 2,
    embed_dim: int = 64,
    attention_heads: int = 4,
    seed: int = 0,
    max_residues: int = DEFAULT_MAX_RESIDUES,
) -> tuple[EsmBackbone, dict]:
    """Build a randomly initialised fair-esm ESM-2 (seeded); provenance says so plainly."""
    import esm

    if embed_dim % attention_heads:
        raise BackboneError(f"embed_dim={embed_dim} must be a multiple of attention_heads={attention_heads}")
    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = esm.model.esm2.ESM2(num_layers, embed_dim, attention_heads, alphabet, token_dropout=True)
    finally:
        torch.random.set_rng_state(generator_state)
    backbone = EsmBackbone(model, Vocabulary.from_fair_esm(alphabet), max_residues)
    arch = {"num_layers": num_layers, "embed_dim": embed_dim, "attention_heads": attention_heads}
    return backbone, {
        "source": "fair-esm ESM2 class (architecture only)",
        "weights": "random initialisation",
        "pretrained": False,
        "init_seed": seed,
        "architecture": arch,
    }


def _read_pickle_checkpoint(path: Path) -> dict:
    # fair-esm's own loader calls torch.load without weights_only; the checkpoint's config is an
    # argparse.Namespace, which is the one non-tensor class allowed here.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError) as error:
        first = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise BackboneError(
            f"checkpoint {path} cannot be read with torch.load(weights_only=True) ({first}); this package "
            "never unpickles arbitrary objects: re-save it as a plain state dict or use the official file"
        ) from error


def load_fair_esm_file(
    path: str | Path, max_residues: int = DEFAULT_MAX_RESIDUES
) -> tuple[EsmBackbone, dict]:
    """Load a fair-esm ``.pt`` checkpoint (ESM-2 or ESM-1b) with ``weights_only=True``.

    The contact-regression file ``<name>-contact-regression.pt`` is read when it lies beside the model;
    it only matters for contact prediction, which no pipeline here uses.
    """
    import esm

    path = Path(path).expanduser()
    if not path.is_file():
        raise BackboneError(f"fair-esm checkpoint {path} does not exist; pass the path of an esm2_*.pt file")
    data = _read_pickle_checkpoint(path)
    if not isinstance(data, dict) or "model" not in data or not ({"cfg", "args"} & set(data)):
        raise BackboneError(
            f"{path} is not a fair-esm checkpoint (expected keys 'model' and 'cfg' or 'args')"
        )
    regression_path = path.with_name(path.stem + "-contact-regression.pt")
    regression = _read_pickle_checkpoint(regression_path) if regression_path.is_file() else None
    # fair-esm picks the ESM-2 builder by file name; decide from the content instead.
    model_name = "esm2" if "cfg" in data else "esm1"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Regression weights not found")
        model, alphabet = esm.pretrained.load_model_and_alphabet_core(model_name, data, regression)
    backbone = EsmBackbone(model, Vocabulary.from_fair_esm(alphabet), max_residues)
    return backbone, {
        "source": "fair-esm checkpoint file",
        "weights": {"file": str(path), "sha256": sha256_file(path)},
        "pretrained": True,
        "architecture": {
            "num_layers": backbone.num_layers,
            "embed_dim": backbone.hidden_size,
            "attention_heads": getattr(model, "attention_heads", None),
        },
    }


def _fair_esm_by_name(name: str, checkpoint_dir: str | None, max_residues: int) -> tuple[EsmBackbone, dict]:
    folder = (
        Path(checkpoint_dir).expanduser() if checkpoint_dir else Path(torch.hub.get_dir()) / "checkpoints"
    )
    path = folder / f"{name}.pt"
    if not path.is_file():
        offline = os.environ.get("PEFT_PIPELINES_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")
        if offline:
            raise BackboneError(
                f"backbone '{name}' needs {path}, which is missing, and $PEFT_PIPELINES_OFFLINE is set; "
                f"copy the file there (from {FAIR_ESM_URL.format(name=name)}) or use the offline default "
                "esm2_small_random"
            )
        folder.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(FAIR_ESM_URL.format(name=name), str(path), progress=False)
        except OSError as error:
            raise BackboneError(
                f"backbone '{name}' is not in {folder} and downloading it failed ({error}); copy {name}.pt "
                "there, pass its path as the backbone name, or use the offline default esm2_small_random"
            ) from error
    backbone, provenance = load_fair_esm_file(path, max_residues)
    provenance["hub_name"] = name
    return backbone, provenance


def load_transformers_esm(
    name_or_path: str, max_residues: int = DEFAULT_MAX_RESIDUES
) -> tuple[HfEsmBackbone, dict]:
    """Load a transformers ESM checkpoint: a local folder or a hub id (``facebook/esm2_t6_8M_UR50D``)."""
    from transformers import AutoConfig, EsmForMaskedLM, EsmModel, EsmTokenizer

    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as error:
        raise BackboneError(
            f"transformers checkpoint '{name_or_path}' cannot be found ({error}); pass a folder with "
            "config.json, or a hub id while online"
        ) from error
    if config.model_type != "esm":
        raise BackboneError(f"'{name_or_path}' is a {config.model_type} model, not ESM (model_type 'esm')")
    with_head = any("MaskedLM" in a for a in (config.architectures or []))
    model = (EsmForMaskedLM if with_head else EsmModel).from_pretrained(name_or_path, dtype=torch.float32)
    tokenizer = EsmTokenizer.from_pretrained(name_or_path)
    vocabulary = Vocabulary(
        dict(tokenizer.get_vocab()),
        tokenizer.pad_token_id,
        tokenizer.mask_token_id,
        tokenizer.cls_token_id,
        tokenizer.eos_token_id,
    )
    backbone = HfEsmBackbone(model, vocabulary, max_residues)
    local = Path(name_or_path).expanduser().is_dir()
    if local:
        files = sorted(Path(name_or_path).expanduser().glob("*.safetensors")) or sorted(
            Path(name_or_path).expanduser().glob("*.bin")
        )
        weights: Any = {"files": [{"file": str(f), "sha256": sha256_file(f)} for f in files]}
    else:
        weights = {"hub_id": name_or_path, "revision": getattr(config, "_commit_hash", None)}
    return backbone, {
        "source": "transformers checkpoint",
        "weights": weights,
        "pretrained": True,
        "architecture": {
            "num_layers": backbone.num_layers,
            "embed_dim": backbone.hidden_size,
            "attention_heads": config.num_attention_heads,
            "class": type(model).__name__,
        },
    }


def load_backbone(name: str, **options: Any) -> tuple[nn.Module, dict]:
    """Load a backbone by name.

    Args:
        name: ``esm2_small_random`` / ``esm2_tiny_random`` / ``esm2_random`` (random ESM-2, sizes in
            options), a fair-esm name (``esm2_t33_650M_UR50D``; looked up in ``options["checkpoint_dir"]``
            or torch hub's cache, downloaded when online), a path to a ``.pt`` file, a transformers
            folder, or a transformers hub id (``facebook/esm2_t6_8M_UR50D``).
        **options: ``max_residues``, ``checkpoint_dir``, ``seed`` and the random sizes
            (``num_layers``, ``embed_dim``, ``attention_heads``).

    Returns:
        ``(backbone, provenance)``; provenance has ``name``, ``source``, ``weights`` and ``pretrained``.
    """
    known = {"max_residues", "checkpoint_dir", "seed", "num_layers", "embed_dim", "attention_heads"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise BackboneError(f"unknown backbone option(s) {unknown}; known: {sorted(known)}")
    max_residues = int(options.get("max_residues", DEFAULT_MAX_RESIDUES))
    sizes = {k: options[k] for k in ("num_layers", "embed_dim", "attention_heads") if k in options}
    if name in RANDOM_PRESETS or name == "esm2_random":
        arch = {**RANDOM_PRESETS.get(name, RANDOM_PRESETS["esm2_small_random"]), **sizes}
        backbone, provenance = random_esm2(
            **arch, seed=int(options.get("seed", 0)), max_residues=max_residues
        )
    elif sizes:
        raise BackboneError(f"options {sorted(sizes)} only apply to random backbones, not to '{name}'")
    elif name in FAIR_ESM_MODELS:
        backbone, provenance = _fair_esm_by_name(name, options.get("checkpoint_dir"), max_residues)
    elif name.endswith(".pt"):
        backbone, provenance = load_fair_esm_file(name, max_residues)
    elif Path(name).expanduser().is_dir() or "/" in name:
        backbone, provenance = load_transformers_esm(name, max_residues)
    else:
        raise BackboneError(
            f"unknown protein backbone '{name}'; use esm2_small_random (offline), a fair-esm name "
            f"({', '.join(FAIR_ESM_MODELS)}), a path to a .pt file, or a transformers folder / hub id"
        )
    provenance = {"name": name, **provenance}
    provenance["parameters"] = sum(p.numel() for p in backbone.parameters())
    return backbone, provenance
