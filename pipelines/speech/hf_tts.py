"""transformers TTS backbones: SpeechT5 (+ its HiFi-GAN) and FastSpeech2Conformer (+ its HiFi-GAN).

A backbone name is ``hf:<hub id>`` (``hf:microsoft/speecht5_tts``, ``hf:espnet/fastspeech2_conformer``) or
a local folder saved with ``save_pretrained``; ``test_tiny_speecht5`` / ``test_tiny_fastspeech2_conformer``
are tiny random models for tests. :class:`HfTts` wraps the acoustic model with its speaker conditioning,
its own training loss (the model's ``loss``), mel synthesis and the paired vocoder.

Features (log10 magnitude mels, Slaney filters, centred STFT with reflect padding):
- SpeechT5 (``SpeechT5FeatureExtractor`` defaults): 16 kHz, 80 mels 80-7600 Hz, 1024-sample window, hop 256.
- FastSpeech2Conformer (ESPnet LJSpeech ``LogMelFbank``): 22,050 Hz, 80 mels 80-7600 Hz, n_fft 1024, hop 256.

FastSpeech2Conformer trains on duration, pitch and energy labels per token. transformers ships no aligner,
so durations are the offline path's even split (:func:`pipelines.speech.data.uniform_durations`): frames
before the voiced span go to the first phone, the voiced span is split evenly over the phones, the frames
after it go to the final ``<sos/eos>`` token. Pitch (WORLD harvest log-F0 over voiced frames) and energy
(frame L2 norm of the STFT magnitude) are averaged per token and standardised over the adaptation clips:
ESPnet's global statistics are not published with the weights.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipelines.speech.hf_features import FEATURES, MelFeatures, log_mel

__all__ = [
    "FAMILIES",
    "MelFeatures",
    "HfTts",
    "is_hf_backbone",
    "load_hf_tts",
    "tiny_hf_tts",
    "hf_adapter_targets",
    "log_mel",
]

FAMILIES = ("speecht5", "fastspeech2_conformer")
DEFAULT_VOCODERS = {
    "speecht5": "microsoft/speecht5_hifigan",
    "fastspeech2_conformer": "espnet/fastspeech2_conformer_hifigan",
}
TINY = {"test_tiny_speecht5": "speecht5", "test_tiny_fastspeech2_conformer": "fastspeech2_conformer"}


class CharTokenizer:
    """Characters to ids (a-z, space, apostrophe) for the tiny test models, which have no vocabulary."""

    def __init__(self, vocab_size: int, end_token: bool) -> None:
        self.vocab_size, self.end_token = vocab_size, end_token

    def __call__(self, text: str) -> torch.Tensor:
        ids = [3 + (ord(c) % (self.vocab_size - 3)) for c in text.lower() if c.isalpha() or c in " '"]
        return torch.tensor(ids + ([self.vocab_size - 1] if self.end_token else []), dtype=torch.long)


def is_hf_backbone(name: str) -> bool:
    """Whether a backbone name is a transformers TTS model (``hf:...``, a local folder or a tiny test)."""
    return name.startswith("hf:") or name in TINY or Path(name).is_dir()


def hf_adapter_targets(
    family: str, parts: tuple[str, ...] = ("encoder", "decoder", "predictors")
) -> list[str]:
    """Regex targets of the feed-forward outputs (and FastSpeech2Conformer's variance predictors).

    SpeechT5: ``speecht5.encoder.wrapped_encoder.layers.N.feed_forward.output_dense`` and the same
    under ``speecht5.decoder.wrapped_decoder``.
    FastSpeech2Conformer: ``{encoder,decoder}.conformer_layers.N.feed_forward.conv2`` and
    ``{duration,pitch,energy}_predictor.conv_layers.N.conv``.
    """
    if family == "speecht5":
        where = {"encoder": "encoder\\.wrapped_encoder", "decoder": "decoder\\.wrapped_decoder"}
        return [
            f"re:^speecht5\\.{where[p]}\\.layers\\.\\d+\\.feed_forward\\.output_dense$"
            for p in parts
            if p in where
        ]
    if family == "fastspeech2_conformer":
        targets = [
            f"re:^{p}\\.conformer_layers\\.\\d+\\.feed_forward\\.conv2$" for p in parts if p != "predictors"
        ]
        if "predictors" in parts:
            targets.append("re:^(duration|pitch|energy)_predictor\\.conv_layers\\.\\d+\\.conv$")
        return targets
    raise ValueError(f"unknown transformers TTS family '{family}'; use one of {FAMILIES}")


class HfTts(nn.Module):
    """A transformers acoustic model with its speaker conditioning, tokenizer, vocoder and loss.

    Adapters go on ``self.model`` (the transformers module, so their names are the model's own). BatchNorm
    layers (the postnets) stay in eval mode while training, so only adapter weights change.
    """

    def __init__(
        self,
        family: str,
        model: nn.Module,
        tokenizer=None,
        vocoder: nn.Module | None = None,
        speaker_embedding: torch.Tensor | None = None,
        info: dict | None = None,
    ) -> None:
        super().__init__()
        self.family, self.model, self.tokenizer = family, model, tokenizer
        self.vocoder = [vocoder]  # a list keeps the vocoder out of parameters, state dicts and adapters
        rate = (
            getattr(getattr(vocoder, "config", None), "sampling_rate", None) or FEATURES[family].sample_rate
        )
        self.features = MelFeatures(int(rate), n_mels=model.config.num_mel_bins)
        if speaker_embedding is None and family == "speecht5":
            speaker_embedding = torch.zeros(model.config.speaker_embedding_dim)
        self.register_buffer("speaker_embedding", speaker_embedding, persistent=False)
        self.info = info or {}
        self.max_length_ratio = 20.0

    def train(self, mode: bool = True) -> HfTts:
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def copy(self) -> HfTts:
        """A copy with its own acoustic model; tokenizer, vocoder and speaker embedding are shared."""
        twin = HfTts(
            self.family, copy.deepcopy(self.model), self.tokenizer, self.vocoder[0], self.speaker_embedding
        )
        twin.info, twin.features, twin.max_length_ratio = (
            dict(self.info),
            self.features,
            self.max_length_ratio,
        )
        return twin.train(self.training)

    def tokenize(self, text: str) -> torch.Tensor:
        """Token ids of a text (the model's own tokenizer; characters for the tiny test models)."""
        if self.tokenizer is None:
            reason = self.info.get("tokenizer_error", "none was loaded")
            raise ValueError(
                f"the {self.family} backbone has no tokenizer ({reason}); pass token ids instead"
            )
        if isinstance(self.tokenizer, CharTokenizer):
            return self.tokenizer(text)
        return torch.as_tensor(self.tokenizer(text, return_tensors="pt")["input_ids"][0])

    def _speakers(self, batch_size: int) -> torch.Tensor | None:
        if self.speaker_embedding is None:
            return None
        return self.speaker_embedding[None].expand(batch_size, -1)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's own training loss on a batch from :func:`collate_hf`."""
        if self.family == "speecht5":
            out = self.model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
                speaker_embeddings=self._speakers(len(batch["input_ids"])),
                return_dict=True,
            )
            return out.loss
        if not self.model.training:
            raise RuntimeError("FastSpeech2Conformer computes its loss in training mode only; call .train()")
        out = self.model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            spectrogram_labels=batch["labels"],
            duration_labels=batch["durations"],
            pitch_labels=batch["pitch"],
            energy_labels=batch["energy"],
            return_dict=True,
        )
        return out.loss

    @torch.no_grad()
    def synthesize_mel(self, input_ids: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Log10 mel (frames, n_mels) of one token sequence (inference mode, seeded: SpeechT5's prenet
        dropout stays on at inference, so the seed makes the output reproducible)."""
        was_training = self.training
        self.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                if self.family == "speecht5":
                    mel = self.model.generate(
                        input_ids[None],
                        speaker_embeddings=self._speakers(1),
                        maxlenratio=self.max_length_ratio,
                    )
                else:
                    mel = self.model(input_ids[None], return_dict=True).spectrogram[0]
        finally:
            self.train(was_training)
        return mel

    @torch.no_grad()
    def vocode(self, mel: torch.Tensor) -> np.ndarray:
        """A waveform at ``self.features.sample_rate`` from a log10 mel (the paired HiFi-GAN)."""
        if self.vocoder[0] is None:
            raise ValueError(
                f"the {self.family} backbone was loaded without a vocoder; set backbone.options.vocoder"
            )
        if len(mel) == 0:
            return np.zeros(0, dtype=np.float32)
        return self.vocoder[0](mel).clamp(-1, 1).numpy().astype(np.float32)


def _load_speaker_embedding(source: str | None, dim: int) -> torch.Tensor | None:
    """A speaker x-vector from a .npy or .safetensors file (first tensor), or None (zeros)."""
    if source in (None, "zeros"):
        return None
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"speaker embedding file {path} does not exist; give a .npy or .safetensors x-vector"
        )
    if path.suffix == ".npy":
        vector = torch.from_numpy(np.load(path, allow_pickle=False)).float().flatten()
    elif path.suffix == ".safetensors":
        from safetensors.torch import load_file

        vector = next(iter(load_file(path).values())).float().flatten()
    else:
        raise ValueError(f"speaker embedding file {path} must be .npy or .safetensors (pickles are refused)")
    if vector.numel() != dim:
        raise ValueError(f"speaker embedding {path} has {vector.numel()} values; the model expects {dim}")
    return vector


def _from_pretrained(cls, source: str, what: str, local_files_only: bool):
    try:
        return cls.from_pretrained(source, local_files_only=local_files_only)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(
            f"needs the weights of {what} '{source}' ({type(error).__name__}): run online once so the hub "
            "caches them, or give a local folder saved with save_pretrained"
        ) from error


def _family_of(source: str, local_files_only: bool) -> str:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, local_files_only=local_files_only)
    model_type = getattr(config, "model_type", "")
    if model_type == "fastspeech2_conformer_with_hifigan":
        return "fastspeech2_conformer_with_hifigan"
    if model_type not in FAMILIES:
        raise ValueError(f"backbone '{source}' is a {model_type} model; speech adaptation takes {FAMILIES}")
    return model_type


def load_hf_tts(
    name: str,
    vocoder: str | None = "default",
    speaker_embedding: str | None = None,
    local_files_only: bool = False,
) -> HfTts:
    """Load a transformers TTS backbone by ``hf:<hub id>`` or local folder, with its vocoder.

    Args:
        name: ``hf:microsoft/speecht5_tts``, ``hf:espnet/fastspeech2_conformer``,
            ``hf:espnet/fastspeech2_conformer_with_hifigan`` or a local folder (``test_tiny_*``: tiny random).
        vocoder: Hub id or folder of the HiFi-GAN; "default" = the model's usual one; None = no vocoder.
        speaker_embedding: SpeechT5 x-vector file (.npy / .safetensors, 512 values); None = zeros.
        local_files_only: Never reach the hub.

    Raises:
        FileNotFoundError: The weights are neither cached nor in the folder (the message says what to do).
    """
    if name in TINY:
        return tiny_hf_tts(TINY[name])
    source = name.removeprefix("hf:")
    try:
        family = _family_of(source, local_files_only)
    except (OSError, ValueError) as error:
        if "speech adaptation takes" in str(error):
            raise
        raise FileNotFoundError(
            f"needs the weights of {source}: run online once (the hub caches them), or give a local folder "
            f"saved with save_pretrained ({type(error).__name__})"
        ) from error
    import transformers as tf

    info = {"name": name, "source": "transformers", "weights": f"hub id {source}"}
    if Path(source).is_dir():
        info["weights"] = f"local folder {Path(source).resolve()}"
    if family == "fastspeech2_conformer_with_hifigan":
        joint = _from_pretrained(
            tf.FastSpeech2ConformerWithHifiGan, source, "FastSpeech2Conformer", local_files_only
        )
        family, model, vocoder_model = "fastspeech2_conformer", joint.model, joint.vocoder
        vocoder = None
    elif family == "speecht5":
        model = _from_pretrained(tf.SpeechT5ForTextToSpeech, source, "SpeechT5", local_files_only)
        vocoder_model = None
    else:
        model = _from_pretrained(
            tf.FastSpeech2ConformerModel, source, "FastSpeech2Conformer", local_files_only
        )
        vocoder_model = None
    if vocoder == "default":
        vocoder = DEFAULT_VOCODERS[family]
    if vocoder is not None:
        cls = tf.SpeechT5HifiGan if family == "speecht5" else tf.FastSpeech2ConformerHifiGan
        vocoder_model = _from_pretrained(
            cls, vocoder.removeprefix("hf:"), "the HiFi-GAN vocoder", local_files_only
        )
        info["vocoder"] = vocoder
    try:
        tokenizer = _load_tokenizer(family, source, local_files_only)
    except (FileNotFoundError, ImportError) as error:  # the model still synthesises from token ids
        tokenizer, info["tokenizer_error"] = None, str(error)
    dim = model.config.speaker_embedding_dim if family == "speecht5" else 0
    embedding = _load_speaker_embedding(speaker_embedding, dim) if family == "speecht5" else None
    info["speaker_embedding"] = speaker_embedding or ("zeros" if family == "speecht5" else "none")
    model.eval()
    if vocoder_model is not None:
        vocoder_model.eval()
    return HfTts(family, model, tokenizer, vocoder_model, embedding, info)


def _load_tokenizer(family: str, source: str, local_files_only: bool):
    import transformers as tf

    if family == "speecht5":
        return _from_pretrained(tf.SpeechT5Processor, source, "the SpeechT5 processor", local_files_only)
    try:
        return tf.FastSpeech2ConformerTokenizer.from_pretrained(source, local_files_only=local_files_only)
    except ImportError as error:
        raise ImportError(
            "FastSpeech2Conformer's tokenizer turns text into phones with g2p_en: pip install g2p-en"
        ) from error


def tiny_hf_tts(family: str, seed: int = 0, vocoder: bool = True) -> HfTts:
    """A tiny random transformers TTS model (hidden 32, 1-2 layers, 8 mels, no dropout) for tests."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "speecht5":
        config = tf.SpeechT5Config(
            vocab_size=40, hidden_size=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
            speech_decoder_prenet_units=32, speech_decoder_postnet_units=32, speech_decoder_postnet_layers=2,
            speaker_embedding_dim=16, encoder_layerdrop=0.0, decoder_layerdrop=0.0, hidden_dropout=0.0,
            attention_dropout=0.0, activation_dropout=0.0, positional_dropout=0.0,
            speech_decoder_postnet_dropout=0.0, max_speech_positions=400, max_text_positions=100,
            encoder_max_relative_position=16,
        )  # fmt: skip
        model = tf.SpeechT5ForTextToSpeech(config)
        voc_config = tf.SpeechT5HifiGanConfig(
            model_in_dim=8, upsample_initial_channel=16, upsample_rates=[4, 4], upsample_kernel_sizes=[8, 8],
            resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]], sampling_rate=16000,
        )  # fmt: skip
        voc = tf.SpeechT5HifiGan(voc_config)
        embedding = torch.randn(16)
    elif family == "fastspeech2_conformer":
        dropouts = {
            k: 0.0
            for k in (
                "energy_predictor_dropout", "pitch_predictor_dropout", "encoder_dropout_rate",
                "encoder_positional_dropout_rate", "encoder_attention_dropout_rate", "decoder_dropout_rate",
                "decoder_positional_dropout_rate", "decoder_attention_dropout_rate",
                "duration_predictor_dropout_rate", "speech_decoder_postnet_dropout",
            )
        }  # fmt: skip
        config = tf.FastSpeech2ConformerConfig(
            hidden_size=32, vocab_size=40, num_mel_bins=8, encoder_layers=1, decoder_layers=1,
            encoder_linear_units=64, decoder_linear_units=64, speech_decoder_postnet_layers=2,
            speech_decoder_postnet_units=16, encoder_kernel_size=3, decoder_kernel_size=3,
            duration_predictor_channels=16, energy_predictor_channels=16, pitch_predictor_channels=16,
            pitch_predictor_layers=2, **dropouts,
        )  # fmt: skip
        model = tf.FastSpeech2ConformerModel(config)
        voc_config = tf.FastSpeech2ConformerHifiGanConfig(
            model_in_dim=8, upsample_initial_channel=16, upsample_rates=[4, 4], upsample_kernel_sizes=[8, 8],
            resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
        )  # fmt: skip
        voc = tf.FastSpeech2ConformerHifiGan(voc_config)
        embedding = None
    else:
        raise ValueError(f"unknown transformers TTS family '{family}'; use one of {FAMILIES}")
    tiny = HfTts(
        family,
        model.eval(),
        CharTokenizer(40, end_token=family == "fastspeech2_conformer"),
        voc.eval() if vocoder else None,
        embedding,
        {"name": f"test_tiny_{family}", "source": "tiny test model", "weights": "random initialisation"},
    )
    tiny.max_length_ratio = 2.0
    return tiny
