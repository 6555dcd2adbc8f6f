from __future__ import annotations

import importlib.util

import pytest
import torch

from pipelines.imaging.backbones import load_backbone


def test_tiny_timm_vit_features_targets_and_grey_input(tiny_vit):
    backbone = load_backbone("timm:vit_tiny_patch16_224", **tiny_vit)
    assert (backbone.family, backbone.num_features, backbone.in_channels) == ("vit", 32, 3)
    assert backbone.targets["lora"] == ["qkv"] and backbone.provenance["weights"] == "random initialisation"
    grey = torch.rand(2, 1, 32, 32)
    backbone.module.eval()
    assert torch.equal(backbone.module(grey), backbone.module(grey.expand(-1, 3, -1, -1)))
    assert backbone.module(grey).shape == (2, 32)


def test_bare_timm_name_and_unknown_name():
    assert load_backbone("resnet18", pretrained=False).family == "cnn"
    with pytest.raises(ValueError, match="unknown backbone 'no_such_net'"):
        load_backbone("no_such_net")
    with pytest.raises(ValueError, match="unknown MONAI network 'UNet'"):
        load_backbone("monai:UNet")


def test_monai_densenet_2d_and_resnet_3d(tiny_densenet):
    dense = load_backbone("monai:DenseNet", **tiny_densenet)
    assert dense.family == "cnn" and dense.targets["lora"] == ["type:Conv2d"]
    assert dense.module(torch.rand(2, 1, 32, 32)).shape == (2, dense.num_features)
    volume = load_backbone(
        "monai:resnet10", pretrained=False, spatial_dims=3, model_kwargs={"widen_factor": 0.25}
    )
    assert volume.targets["lora"] == ["type:Conv3d"] and volume.spatial_dims == 3
    assert volume.module(torch.rand(2, 1, 16, 16, 16)).shape == (2, volume.num_features)


def test_monai_weights_file_round_trip(tmp_path, tiny_densenet):
    from safetensors.torch import save_file

    first = load_backbone("monai:DenseNet", **tiny_densenet)
    save_file(first.module.net.state_dict(), str(tmp_path / "w.safetensors"))
    second = load_backbone("monai:DenseNet", weights=str(tmp_path / "w.safetensors"), **tiny_densenet)
    assert second.provenance["weights"]["file"].endswith("w.safetensors")
    x = torch.rand(2, 1, 32, 32)
    first.module.eval(), second.module.eval()
    assert torch.equal(first.module(x), second.module(x))
    with pytest.raises(FileNotFoundError, match="does not exist; fix `backbone.options.weights`"):
        load_backbone("monai:DenseNet", weights=str(tmp_path / "absent.pt"), **tiny_densenet)


def test_transformers_vit_from_local_directory(tmp_path):
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)  # fmt: skip
    ViTModel(config).save_pretrained(tmp_path / "vit")
    backbone = load_backbone(f"hf:{tmp_path / 'vit'}", pooling="cls+mean")
    assert backbone.num_features == 64 and backbone.targets["lora"] in (
        ["q_proj", "v_proj"],
        ["query", "value"],
    )
    assert set(backbone.provenance["weights"]["files"]) == {"model.safetensors"}
    assert backbone.module(torch.rand(2, 1, 48, 48)).shape == (2, 64)  # position embeddings interpolated


@pytest.mark.skipif(
    importlib.util.find_spec("einops") is None, reason="MONAI's ViT needs einops (not installed)"
)
def test_monai_vit_3d():
    vit = load_backbone("monai:ViT", pretrained=False, spatial_dims=3, img_size=16,
                        model_kwargs={"patch_size": 8, "hidden_size": 32, "mlp_dim": 64, "num_layers": 2,
                                      "num_heads": 2})  # fmt: skip
    assert vit.family == "vit" and vit.targets["lora"] == ["qkv"]
    assert vit.module(torch.rand(2, 1, 16, 16, 16)).shape == (2, 32)


@pytest.mark.parametrize("method", ["vera", "loha", "lokr", "adalora"])
def test_the_lora_family_with_no_targets_adapts_what_lora_adapts(tiny_vit, tiny_densenet, method):
    from pipelines.core.peft import AdaLoRA, LoHa, LoKr, LoRA, VeRA
    from pipelines.imaging.methods import build_classifier, resolve_targets

    spec = {
        "vera": VeRA(r=2),
        "loha": LoHa(r=2),
        "lokr": LoKr(r=2),
        "adalora": AdaLoRA(init_r=2, target_r=1),
    }[method]
    for name, options in (("timm:vit_tiny_patch16_224", tiny_vit), ("monai:DenseNet", tiny_densenet)):
        if method in ("vera", "adalora") and name.startswith("monai"):
            continue  # Linear layers only: a CNN has no default for them
        backbone = load_backbone(name, **options)
        model = build_classifier(backbone, "linear_probe", None, 2, "binary", "task", 0.0, False)[0]
        lora = resolve_targets(model, LoRA(r=2), backbone).targets
        assert resolve_targets(model, spec, backbone).targets == lora and len(lora) >= 2
