"""The per-domain cases of `pipeline_step.py`, each built by the domain's own model-building code.

A case gives the domain's model as its adapter stage starts (backbone frozen, head trainable, random
weights of the configured shape), one collated batch, the domain's loss, the LoRA adapters the pipeline
adds (targets resolved to exact module names), and `pipeline(config)`: the domain's own training entry
(the functions its pipeline and experiment hooks call), which runs the core training loop.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from pipelines.core.peft import LoRA
from pipelines.core.training import TrainConfig, train

SIZES = {
    "gpu": {
        "imaging": dict(model="vit_base_patch16_224", img=224, batch=64),
        "protein": dict(layers=33, width=1280, heads=20, batch=16, residues=510),
        "clinical": dict(
            hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000, batch=8, tokens=1024
        ),
        "speech": dict(hidden=128, encoder=3, duration=2, decoder=4, batch=32, tokens=12, frames_per_token=6),
        "speecht5": dict(small=False, batch=16, tokens=64, frames=300),
    },
    "cpu": {
        "imaging": dict(model="vit_tiny_patch16_224", img=32, batch=8),
        "protein": dict(layers=2, width=64, heads=4, batch=4, residues=62),
        "clinical": dict(
            hidden=64, intermediate=172, layers=2, heads=4, kv_heads=2, vocab=259, batch=2, tokens=64
        ),
        "speech": dict(hidden=64, encoder=2, duration=1, decoder=2, batch=4, tokens=16, frames_per_token=4),
        "speecht5": dict(small=True, batch=2, tokens=16, frames=32),
    },
}
DOMAINS = tuple(SIZES["gpu"])


@dataclass
class Case:
    """One domain at one size; see the module docstring."""

    domain: str
    shape: str
    samples: int
    tokens: int  # tokens (or mel frames) per sample, for throughput; 0 for images
    new_model: Callable[[], nn.Module]
    batch: Any
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    adapters: list[tuple[str, LoRA]]
    heads: list[str]
    input_module: Callable[[nn.Module], nn.Module]  # its output is the floor's leaf that needs a gradient
    pipeline: Callable[[TrainConfig], Any]
    adapter_root: Callable[[nn.Module], nn.Module] = field(default=lambda model: model)
    unit: str = "tokens"  # what `tokens` counts


class Repeated(Dataset):
    """`length` items that cycle through `items` (one epoch covers every step, no copies)."""

    def __init__(self, items: list, length: int) -> None:
        self.items, self.length = items, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.items[index % len(self.items)]


def imaging(size: dict, steps: int) -> Case:
    from pipelines.imaging.backbones import load_backbone
    from pipelines.imaging.data import collate
    from pipelines.imaging.methods import build_classifier, default_spec, resolve_targets
    from pipelines.imaging.model import HEAD, classification_loss

    torch.manual_seed(0)
    backbone = load_backbone(f"timm:{size['model']}", pretrained=False, img_size=size["img"])

    def new_model() -> nn.Module:  # what ImagingExperiment.new_model builds: a linear probe
        return build_classifier(backbone, "linear_probe", None, 2, "binary", "task")[0]

    spec = resolve_targets(new_model(), default_spec("lora", backbone), backbone)
    items = [{"image": torch.rand(3, size["img"], size["img"]), "label": i % 2} for i in range(size["batch"])]

    def pipeline(config: TrainConfig) -> Any:
        model = build_classifier(backbone, "adapter", spec, 2, "binary", "task")[0]
        return train(
            model,
            Repeated(items, size["batch"] * steps),
            classification_loss,
            config,
            collate_fn=collate,
            progress=False,
        )

    shape = f"timm {size['model']} (random), {size['img']} px, batch {size['batch']}, LoRA r=8 on qkv + head"
    return Case(
        "imaging",
        shape,
        size["batch"],
        0,
        new_model,
        collate(items),
        classification_loss,
        [("task", spec)],
        [HEAD],
        lambda m: m.backbone.net.patch_embed,
        pipeline,
    )


def protein(size: dict, steps: int) -> Case:
    from pipelines.protein.backbones import random_esm2
    from pipelines.protein.batching import TaskCollator
    from pipelines.protein.data import ProteinRecord
    from pipelines.protein.model import ProteinModel
    from pipelines.protein.pipeline import SequencePipeline

    generator = torch.Generator().manual_seed(0)
    residues = "ACDEFGHIKLMNPQRSTVWY"
    records = [
        ProteinRecord(
            f"p{i}",
            "".join(residues[j] for j in torch.randint(0, 20, (size["residues"],), generator=generator)),
            target=float(i),
        )
        for i in range(size["batch"])
    ]
    adapter = LoRA(r=8, alpha=16, targets=["q", "k", "v", "out"])  # the pipeline's default adapter

    def new_pipe() -> SequencePipeline:  # a fresh backbone each time: adapters go on the backbone module
        backbone, _ = random_esm2(size["layers"], size["width"], size["heads"])
        return SequencePipeline(backbone=backbone, task="regression", adapter=adapter)

    def new_model() -> ProteinModel:
        model = new_pipe().build_model(records)
        model.requires_grad_(False)
        model.head.requires_grad_(True)
        return model

    spec = new_pipe().resolve_spec(adapter, None)

    def pipeline(config: TrainConfig) -> Any:
        pipe = new_pipe()
        model = pipe.build_model(records)
        return pipe.train_task(model, spec, "task", config, records * steps, None)

    batch = TaskCollator(new_pipe().load_backbone().vocabulary, "regression")(records)
    shape = (
        f"fair-esm ESM-2 {size['layers']} layers x {size['width']} (random), batch {size['batch']} x "
        f"{size['residues'] + 2} tokens, LoRA r=8 on q,k,v,out + head, regression"
    )
    return Case(
        "protein",
        shape,
        size["batch"],
        size["residues"] + 2,
        new_model,
        batch,
        lambda m, b: m.loss(b),
        [("task", spec)],
        ["head"],
        lambda m: m.backbone.model.embed_tokens,
        pipeline,
    )


def clinical(size: dict, steps: int) -> Case:
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipelines.clinical.backbones import Backbone, byte_tokenizer
    from pipelines.clinical.pipeline import DEFAULT_DOMAIN_ADAPTER, DEFAULT_TASK_ADAPTER
    from pipelines.clinical.stages import HEAD, ClassificationLoss, build_model, lm_adapter
    from pipelines.clinical.tokens import ClassificationSet, PadCollate
    from pipelines.core.peft import as_spec

    config = LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        max_position_embeddings=size["tokens"],
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    torch.manual_seed(0)
    lm = LlamaForCausalLM(config).float().eval()  # as clinical.backbones.tiny_llama builds one, full size
    backbone = Backbone(lm, byte_tokenizer(), "llama-random", {"weights": "random initialisation"})

    def new_model() -> nn.Module:  # what ClinicalExperiment.new_model builds (frozen LM shared, new head)
        return build_model(backbone, "binary", 2, "last")

    probe = new_model()
    specs = [
        (name, lm_adapter(probe, as_spec(default), name))
        for name, default in (("domain", DEFAULT_DOMAIN_ADAPTER), ("task", DEFAULT_TASK_ADAPTER))
    ]
    generator = torch.Generator().manual_seed(0)
    tokens = [
        torch.randint(2, size["vocab"], (size["tokens"],), generator=generator).tolist()
        for _ in range(size["batch"])
    ]
    labels = torch.arange(size["batch"]) % 2
    collate = PadCollate(0)
    loss_fn = ClassificationLoss("binary", None)

    def pipeline(config: TrainConfig) -> Any:
        from pipelines.core.peft import add_adapter, set_trainable

        model = new_model()  # the task stage: the domain adapter under the task adapter, both trained
        for name, spec in specs:
            add_adapter(model, spec, name=name)
        set_trainable(model, [name for name, _ in specs], extra=[HEAD])
        data = ClassificationSet(tokens * steps, labels.repeat(steps).numpy())
        return train(model, data, loss_fn, config, collate_fn=collate, progress=False)

    batch = collate([{"input_ids": torch.tensor(t), "labels": labels[i]} for i, t in enumerate(tokens)])
    batch["labels"] = labels
    shape = (
        f"LLaMA {size['layers']} layers x {size['hidden']} (random), batch {size['batch']} x "
        f"{size['tokens']}, task stage: domain LoRA r=16 + task LoRA r=8 (dropout 0.1) on q,v + head"
    )
    return Case(
        "clinical",
        shape,
        size["batch"],
        size["tokens"],
        new_model,
        batch,
        loss_fn,
        specs,
        [HEAD],
        lambda m: m.lm.model.embed_tokens,
        pipeline,
    )


def speech(size: dict, steps: int) -> Case:
    from pipelines.speech.adaptation import adapt
    from pipelines.speech.backbones import acoustic_loss
    from pipelines.speech.data import Example, collate_examples
    from pipelines.speech.model import AcousticConfig, AcousticModel, adapter_targets

    torch.manual_seed(0)
    config = AcousticConfig(
        num_speakers=5,
        hidden=size["hidden"],
        encoder_layers=size["encoder"],
        duration_layers=size["duration"],
        decoder_layers=size["decoder"],
    )
    base = AcousticModel(config).eval().requires_grad_(False)
    tokens, per_token = size["tokens"], size["frames_per_token"]
    examples = [
        Example(
            torch.randint(1, config.vocab_size, (tokens,)),
            torch.full((tokens,), per_token),
            torch.randn(tokens * per_token, config.num_mels),
            0,
            None,
        )
        for _ in range(size["batch"])
    ]
    spec = LoRA(r=4, alpha=8, targets=adapter_targets())  # adapt(..., "lora") with its default rank

    def pipeline(train_config: TrainConfig) -> Any:
        return adapt(base, "lora", examples * steps, 0, train_config, lora_rank=4).result

    shape = (
        f"acoustic model hidden {size['hidden']}, {size['encoder']}/{size['duration']}/{size['decoder']}"
        f" blocks, batch {size['batch']} x {tokens} tokens ({tokens * per_token} frames), LoRA r=4 on proj"
    )
    return Case(
        "speech",
        shape,
        size["batch"],
        tokens * per_token,
        lambda: copy.deepcopy(base),
        collate_examples(examples),
        acoustic_loss,
        [("speaker", spec)],
        [],
        lambda m: m.embedding,
        pipeline,
        unit="frames",
    )


def speecht5(size: dict, steps: int) -> Case:
    import transformers as tf

    from pipelines.speech.hf_adaptation import adapt_hf, hf_loss
    from pipelines.speech.hf_features import HfExample, collate_hf
    from pipelines.speech.hf_tts import CharTokenizer, HfTts, hf_adapter_targets

    small = dict(
        vocab_size=40,
        hidden_size=64,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        speech_decoder_prenet_units=64,
        speech_decoder_postnet_units=64,
        speech_decoder_postnet_layers=2,
        speaker_embedding_dim=64,
    )
    torch.manual_seed(0)
    # Defaults: the published SpeechT5 size; no layer drop, so that every step runs every layer.
    sizes = small if size["small"] else {}
    config = tf.SpeechT5Config(**sizes, encoder_layerdrop=0.0, decoder_layerdrop=0.0)
    model = tf.SpeechT5ForTextToSpeech(config).eval()
    base = HfTts(
        "speecht5",
        model,
        CharTokenizer(config.vocab_size, end_token=False),
        None,
        torch.randn(config.speaker_embedding_dim),
    )
    base.requires_grad_(False)
    examples = [
        HfExample(
            torch.randint(4, config.vocab_size, (size["tokens"],)),
            torch.randn(size["frames"], config.num_mel_bins),
        )
        for _ in range(size["batch"])
    ]
    collate = functools.partial(collate_hf, reduction_factor=config.reduction_factor)
    spec = LoRA(r=4, alpha=8, targets=hf_adapter_targets("speecht5"))

    def pipeline(train_config: TrainConfig) -> Any:
        return adapt_hf(base, "lora", examples * steps, train_config, lora_rank=4).result

    shape = (
        f"SpeechT5 {config.encoder_layers}+{config.decoder_layers} layers x {config.hidden_size} (random), "
        f"batch {size['batch']} x {size['tokens']} tokens / {size['frames']} frames, LoRA r=4 on FFN out"
    )
    return Case(
        "speecht5",
        shape,
        size["batch"],
        size["frames"],
        base.copy,
        collate(examples),
        hf_loss,
        [("speaker", spec)],
        [],
        lambda m: m.model.speecht5.encoder.prenet.embed_tokens,
        pipeline,
        adapter_root=lambda m: m.model,
        unit="frames",
    )


BUILDERS = {
    "imaging": imaging,
    "protein": protein,
    "clinical": clinical,
    "speech": speech,
    "speecht5": speecht5,
}


def build_case(config: str, domain: str, steps: int) -> Case:
    """The case of `domain` at configuration `config` ("gpu" or "cpu"), data for `steps` steps."""
    return BUILDERS[domain](SIZES[config][domain], steps)
