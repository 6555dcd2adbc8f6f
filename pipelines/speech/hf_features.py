"""Features and batches of the transformers TTS backbones: log10 mels at each model's rate, padded batches.

- SpeechT5 (``SpeechT5FeatureExtractor`` defaults): 16 kHz, 80 mels 80-7600 Hz, 1024-sample window, hop 256.
- FastSpeech2Conformer (ESPnet LJSpeech ``LogMelFbank``): 22,050 Hz, 80 mels 80-7600 Hz, n_fft 1024, hop 256.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class MelFeatures:
    """How a model's log10 mel targets are computed from audio."""

    sample_rate: int
    n_fft: int = 1024
    hop_length: int = 256
    win_length: int = 1024
    n_mels: int = 80
    f_min: float = 80.0
    f_max: float = 7600.0
    floor: float = 1e-10


FEATURES = {"speecht5": MelFeatures(16000), "fastspeech2_conformer": MelFeatures(22050)}


def _filters(features: MelFeatures) -> np.ndarray:
    from transformers.audio_utils import mel_filter_bank

    return mel_filter_bank(
        num_frequency_bins=features.n_fft // 2 + 1,
        num_mel_filters=features.n_mels,
        min_frequency=features.f_min,
        max_frequency=features.f_max,
        sampling_rate=features.sample_rate,
        norm="slaney",
        mel_scale="slaney",
    )


def _magnitude(wav: np.ndarray, features: MelFeatures) -> np.ndarray:
    from transformers.audio_utils import spectrogram, window_function

    window = window_function(features.win_length, "hann", periodic=True)
    return spectrogram(
        np.asarray(wav, dtype=np.float32),
        window,
        frame_length=features.win_length,
        hop_length=features.hop_length,
        fft_length=features.n_fft,
        power=1.0,
    )  # (freqs, frames)


def log_mel(wav: np.ndarray, features: MelFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """Log10 mel (frames, n_mels) and frame energy (frames,) of a waveform at ``features.sample_rate``."""
    magnitude = _magnitude(wav, features)
    mel = np.log10(np.maximum(_filters(features).T @ magnitude, features.floor)).T
    energy = np.sqrt((magnitude**2).sum(axis=0))
    return torch.tensor(mel, dtype=torch.float32), torch.tensor(energy, dtype=torch.float32)


def mel_bins_below(hz: float, features: MelFeatures) -> int:
    """Mel bins whose filter peaks below ``hz`` (8 kHz recordings hold nothing above 4 kHz)."""
    peaks = _filters(features).argmax(axis=0) * features.sample_rate / features.n_fft
    return int((peaks < hz).sum())


@dataclass
class HfExample:
    """One utterance featurised for a transformers TTS model."""

    input_ids: torch.Tensor
    mel: torch.Tensor  # (frames, n_mels) log10
    durations: torch.Tensor | None = None
    pitch: torch.Tensor | None = None  # (tokens,) token-averaged log-F0 (standardised later)
    energy: torch.Tensor | None = None
    utterance: object = None
    extra: dict = field(default_factory=dict)


def collate_hf(examples: list[HfExample], reduction_factor: int = 1) -> dict[str, torch.Tensor]:
    """Pad examples into a batch; mels padded with -100 (the models' ignore value), to a multiple of
    ``reduction_factor`` frames (SpeechT5 predicts 2 frames a step)."""
    batch = len(examples)
    tokens = max(len(e.input_ids) for e in examples)
    frames = max(e.mel.shape[0] for e in examples)
    frames = int(math.ceil(frames / reduction_factor) * reduction_factor)
    out = {
        "input_ids": torch.zeros(batch, tokens, dtype=torch.long),
        "attention_mask": torch.zeros(batch, tokens, dtype=torch.long),
        "labels": torch.full((batch, frames, examples[0].mel.shape[1]), -100.0),
    }
    if examples[0].durations is not None:
        out["durations"] = torch.zeros(batch, tokens, dtype=torch.long)
        out["pitch"] = torch.zeros(batch, tokens, 1)
        out["energy"] = torch.zeros(batch, tokens, 1)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        out["input_ids"][i, :n] = e.input_ids
        out["attention_mask"][i, :n] = 1
        out["labels"][i, : e.mel.shape[0]] = e.mel
        if e.durations is not None:
            out["durations"][i, :n] = e.durations
            out["pitch"][i, :n, 0] = e.pitch
            out["energy"][i, :n, 0] = e.energy
    return out
