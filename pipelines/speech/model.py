"""A small multi-speaker non-autoregressive acoustic model (FastSpeech-like, convolutional).

Text ids -> character encoder -> + speaker embedding -> duration predictor -> length regulator (each
token repeated for its frames, with its position inside the token as a feature) -> mel decoder. Every
block ends in a pointwise ``nn.Linear`` called ``proj``: that is where bottleneck adapters and LoRA go
(``encoder.blocks.N.proj``, ``duration_predictor.blocks.N.proj``, ``decoder.blocks.N.proj``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipelines.speech.data import VOCAB

__all__ = ["AcousticConfig", "AcousticModel", "ConvBlock", "length_regulate", "adapter_targets"]


@dataclass(frozen=True)
class AcousticConfig:
    """Sizes of the acoustic model; ``to_dict``/``AcousticConfig(**d)`` round-trip through JSON."""

    vocab_size: int = len(VOCAB)
    num_speakers: int = 5
    num_mels: int = 80
    hidden: int = 128
    kernel_size: int = 5
    encoder_layers: int = 3
    duration_layers: int = 2
    decoder_layers: int = 4
    dropout: float = 0.1

    def to_dict(self) -> dict:
        """Plain dict of the fields."""
        return asdict(self)


class ConvBlock(nn.Module):
    """Residual block on (batch, time, channels): conv, ReLU, pointwise ``proj``, dropout, LayerNorm."""

    def __init__(self, hidden: int, kernel_size: int, dropout: float) -> None:
        super().__init__()
        self.conv = nn.Conv1d(hidden, hidden, kernel_size, padding=kernel_size // 2)
        self.proj = nn.Linear(hidden, hidden)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C); mask: (B, T, 1) with 1 on real positions."""
        # contiguous: a strided input sends the matmul down an alignment-dependent path, and disabling an
        # adapter must give the base output bit for bit
        hidden = torch.relu(self.conv((x * mask).transpose(1, 2))).transpose(1, 2).contiguous()
        return self.norm(x + self.dropout(self.proj(hidden))) * mask


class ConvStack(nn.Module):
    """A stack of ConvBlocks named ``blocks``."""

    def __init__(self, layers: int, hidden: int, kernel_size: int, dropout: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ConvBlock(hidden, kernel_size, dropout) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return x


def _mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    return (torch.arange(size, device=lengths.device)[None] < lengths[:, None]).unsqueeze(-1).float()


def length_regulate(
    hidden: torch.Tensor, durations: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Repeat each token's vector for its number of frames.

    Returns:
        (frames (B, F, C), frame features (B, F, 3): position inside the token, its complement and
        log(1 + token duration), frame lengths (B,)).
    """
    batch, _, channels = hidden.shape
    lengths = durations.sum(dim=1)
    total = max(int(lengths.max()), 1)
    out = hidden.new_zeros(batch, total, channels)
    features = hidden.new_zeros(batch, total, 3)
    for i in range(batch):
        repeats = durations[i]
        n = int(lengths[i])
        if n == 0:
            continue
        out[i, :n] = torch.repeat_interleave(hidden[i], repeats, dim=0)
        starts = torch.repeat_interleave(torch.cumsum(repeats, 0) - repeats, repeats)
        token_length = torch.repeat_interleave(repeats, repeats).float()
        position = (torch.arange(n, device=hidden.device) - starts).float() / token_length
        features[i, :n] = torch.stack([position, 1 - position, torch.log1p(token_length)], dim=1)
    return out, features, lengths


class AcousticModel(nn.Module):
    """Multi-speaker text-to-mel model; predicts log-mels (HiFi-GAN convention) and log durations."""

    def __init__(self, config: AcousticConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or AcousticConfig()
        self.embedding = nn.Embedding(config.vocab_size, config.hidden, padding_idx=0)
        self.encoder = ConvStack(config.encoder_layers, config.hidden, config.kernel_size, config.dropout)
        self.speaker_embedding = nn.Embedding(config.num_speakers, config.hidden)
        self.duration_predictor = ConvStack(config.duration_layers, config.hidden, 3, config.dropout)
        self.duration_out = nn.Linear(config.hidden, 1)
        self.frame_features = nn.Linear(3, config.hidden)
        self.decoder = ConvStack(config.decoder_layers, config.hidden, config.kernel_size, config.dropout)
        self.mel_out = nn.Linear(config.hidden, config.num_mels)
        # per-bin statistics of the training log-mels: the network works on standardised mels
        self.register_buffer("mel_mean", torch.zeros(config.num_mels))
        self.register_buffer("mel_std", torch.ones(config.num_mels))

    def encode(self, tokens: torch.Tensor, token_lengths: torch.Tensor, speakers: torch.Tensor):
        """Encoder states with the speaker added, their mask and the predicted log(1 + duration)."""
        mask = _mask(token_lengths, tokens.shape[1])
        hidden = self.encoder(self.embedding(tokens) * mask, mask)
        hidden = (hidden + self.speaker_embedding(speakers)[:, None]) * mask
        log_durations = self.duration_out(self.duration_predictor(hidden, mask)).squeeze(-1) * mask.squeeze(
            -1
        )
        return hidden, mask, log_durations

    def decode(self, hidden: torch.Tensor, durations: torch.Tensor, speakers: torch.Tensor):
        """Standardised mels (B, F, n_mels) and frame lengths, given token states and durations."""
        frames, features, lengths = length_regulate(hidden, durations)
        mask = _mask(lengths, frames.shape[1])
        frames = (frames + self.frame_features(features) + self.speaker_embedding(speakers)[:, None]) * mask
        return self.mel_out(self.decoder(frames, mask)) * mask, lengths

    def forward(
        self,
        tokens: torch.Tensor,
        token_lengths: torch.Tensor,
        speakers: torch.Tensor,
        durations: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Teacher-forced when ``durations`` is given, else uses the rounded predicted durations.

        Returns:
            ``mels`` (log-mels, B x F x n_mels), ``normalized_mels``, ``log_durations`` (B x tokens),
            ``durations`` used and ``frame_lengths``.
        """
        hidden, mask, log_durations = self.encode(tokens, token_lengths, speakers)
        if durations is None:
            durations = self.predict_durations(log_durations, mask.squeeze(-1))
        normalized, lengths = self.decode(hidden, durations, speakers)
        mels = normalized * self.mel_std + self.mel_mean
        return {
            "mels": mels,
            "normalized_mels": normalized,
            "log_durations": log_durations,
            "durations": durations,
            "frame_lengths": lengths,
        }

    @staticmethod
    def predict_durations(log_durations: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Round exp(log_durations) - 1 to frames; characters (not the edge silences) get at least 1."""
        durations = torch.clamp(torch.round(torch.expm1(log_durations.detach())), min=0).long()
        lengths = mask.sum(dim=1).long()
        inner = mask.clone()
        inner[:, 0] = 0
        inner[torch.arange(len(lengths)), (lengths - 1).clamp(min=0)] = 0
        durations = torch.where(inner.bool(), durations.clamp(min=1), durations)
        return durations * mask.long()

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """L1 on standardised mels plus MSE on log(1 + duration), both over real positions only."""
        out = self(batch["tokens"], batch["token_lengths"], batch["speakers"], batch["durations"])
        frames = out["normalized_mels"].shape[1]
        target = (batch["mels"][:, :frames] - self.mel_mean) / self.mel_std
        frame_mask = _mask(batch["frame_lengths"], frames)
        mel_loss = ((out["normalized_mels"] - target).abs() * frame_mask).sum() / (
            frame_mask.sum() * self.config.num_mels
        )
        token_mask = _mask(batch["token_lengths"], batch["tokens"].shape[1]).squeeze(-1)
        duration_error = (out["log_durations"] - torch.log1p(batch["durations"].float())) ** 2
        duration_loss = (duration_error * token_mask).sum() / token_mask.sum()
        return mel_loss + duration_loss

    @torch.no_grad()
    def synthesize(self, tokens: torch.Tensor, speaker: int) -> torch.Tensor:
        """Log-mel (frames, n_mels) of one token sequence with predicted durations."""
        out = self(tokens[None], torch.tensor([len(tokens)]), torch.tensor([speaker]))
        return out["mels"][0, : int(out["frame_lengths"][0])]


def adapter_targets(parts: tuple[str, ...] = ("encoder", "duration_predictor", "decoder")) -> list[str]:
    """Regex targets for the pointwise projections of the named parts of an AcousticModel."""
    return [f"re:^{part}\\.blocks\\.\\d+\\.proj$" for part in parts]
