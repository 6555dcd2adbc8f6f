"""The report's mel-spectrogram grid: time in seconds, frequency in Hz on the mel axis, level in dB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipelines.speech.audio import AUDIO, AudioConfig

__all__ = ["DB_PER_NEPER", "mel_bin_frequencies", "mel_figure", "plot_mels"]

DB_PER_NEPER = 20.0 / np.log(10.0)  # the mels are natural logs of magnitudes: dB = 20 log10 = 8.69 ln
LEVELS_DB = (-100.0, 20.0)  # the colour scale; the features' floor, ln(1e-5), is -100 dB
FREQUENCY_TICKS_HZ = (250, 500, 1000, 2000, 4000, 8000)


LOG_STEP = np.log(6.4) / 27.0  # Slaney: linear (200/3 Hz per mel) to 1 kHz = mel 15, then logarithmic


def _hz_to_mel(hz: float) -> float:
    return hz * 3.0 / 200.0 if hz < 1000.0 else 15.0 + np.log(hz / 1000.0) / LOG_STEP


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return np.where(mel < 15.0, mel * 200.0 / 3.0, 1000.0 * np.exp((mel - 15.0) * LOG_STEP))


def mel_bin_frequencies(config: AudioConfig = AUDIO) -> np.ndarray:
    """Centre frequency in Hz of each mel bin (Slaney's mel scale, as the features' filterbank)."""
    edges = np.linspace(_hz_to_mel(config.f_min), _hz_to_mel(config.f_max), config.n_mels + 2)
    return _mel_to_hz(edges[1:-1])


def mel_figure(
    reference: list[torch.Tensor],
    synthesized: dict[str, list[torch.Tensor]],
    titles: list[str],
    config: AudioConfig = AUDIO,
):
    """A matplotlib Figure: one row per utterance, the recording then each model's synthesis, with time
    (s) and frequency (Hz) axes and one dB colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 1 + len(synthesized)
    figure, axes = plt.subplots(
        len(reference), columns, figsize=(2.6 * columns + 1.0, 2.1 * len(reference) + 0.4), squeeze=False,
        layout="constrained",
    )  # fmt: skip
    centres = mel_bin_frequencies(config)
    ticks = [f for f in FREQUENCY_TICKS_HZ if centres[0] <= f <= centres[-1]]
    seconds_per_frame = config.hop_length / config.sample_rate
    image = None
    for row, mel in enumerate(reference):
        panels = [("recording", mel)] + [(label, mels[row]) for label, mels in synthesized.items()]
        for column, (label, panel) in enumerate(panels):
            axis, values = axes[row][column], np.asarray(panel, dtype=float)
            image = axis.imshow(
                values.T * DB_PER_NEPER, origin="lower", aspect="auto", cmap="magma",
                vmin=LEVELS_DB[0], vmax=LEVELS_DB[1],
                extent=(0.0, len(values) * seconds_per_frame, -0.5, values.shape[1] - 0.5),
            )  # fmt: skip
            axis.set_title(f"{label}: {titles[row]}" if column == 0 else label, fontsize=8)
            axis.set_yticks(np.interp(ticks, centres, np.arange(len(centres))), [f"{f:g}" for f in ticks])
            axis.tick_params(labelsize=6)
            if column == 0:
                axis.set_ylabel("frequency (Hz, mel scale)", fontsize=7)
            if row == len(reference) - 1:
                axis.set_xlabel("time (s)", fontsize=7)
    bar = figure.colorbar(image, ax=axes, shrink=0.8)
    bar.set_label("level (dB, 20 log10 of the mel magnitude)", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    return figure


def plot_mels(
    path: Path,
    reference: list[torch.Tensor],
    synthesized: dict[str, list[torch.Tensor]],
    titles: list[str],
    config: AudioConfig = AUDIO,
) -> Path:
    """Write :func:`mel_figure` as a PNG at ``path``; returns the path."""
    import matplotlib.pyplot as plt

    figure = mel_figure(reference, synthesized, titles, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path
