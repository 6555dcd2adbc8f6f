"""FsddSession: FSDD clips featurised once per process, by speaker and split, and the cached evaluators."""

from __future__ import annotations

from functools import cached_property

from pipelines.speech.audio import mel_bins_below
from pipelines.speech.backbones import BaseSettings
from pipelines.speech.data import FSDD_SPEAKERS, Example, Utterance, fsdd_utterances, load_example, split_fsdd
from pipelines.speech.evaluators import Evaluators, load_evaluators

__all__ = ["FsddSession"]


class FsddSession:
    """Lazily reads the FSDD mirror and keeps each clip's features; speaker ids follow the base model."""

    def __init__(self, settings: BaseSettings) -> None:
        self.settings = settings
        self._examples: dict[str, Example] = {}
        self._evaluators: Evaluators | None = None
        self.num_bins = mel_bins_below(4000.0)  # FSDD is 8 kHz audio: the MCD reads the bins below 4 kHz

    @cached_property
    def utterances(self) -> list[Utterance]:
        """Every FSDD clip."""
        return fsdd_utterances()

    def _speaker_id(self, speaker: str) -> int:
        speakers = self.settings.speakers()
        return speakers.index(speaker) if speaker in speakers else 0

    def examples(self, utterances: list[Utterance]) -> list[Example]:
        """Featurised examples (cached by file path) with base-model speaker ids (0 for other speakers)."""
        out = []
        for utterance in utterances:
            key = utterance.path
            if key not in self._examples:
                self._examples[key] = load_example(utterance, self._speaker_id(utterance.speaker))
            out.append(self._examples[key])
        return out

    def speaker_examples(self, speaker: str, split: str) -> list[Example]:
        """One speaker's examples of the official split."""
        if speaker not in FSDD_SPEAKERS:
            raise ValueError(f"'{speaker}' is not an FSDD speaker; use one of {FSDD_SPEAKERS}")
        return self.examples([u for u in split_fsdd(self.utterances, split) if u.speaker == speaker])

    def test_examples(self, speaker: str, per_digit: int) -> list[Example]:
        """One speaker's test-split examples with clip indices below ``per_digit`` (the scored clips)."""
        return [e for e in self.speaker_examples(speaker, "test") if e.utterance.index < per_digit]

    def base_training_examples(self) -> list[Example]:
        """Training-split examples of the base speakers."""
        speakers = set(self.settings.speakers())
        return self.examples([u for u in split_fsdd(self.utterances, "train") if u.speaker in speakers])

    def base_speaker_examples(self, per_digit: int = 5) -> dict[int, list[Example]]:
        """Speaker id -> training clips with indices 5 .. 5 + per_digit - 1 (for the nearest speaker)."""
        out = {}
        for speaker_id, speaker in enumerate(self.settings.speakers()):
            chosen = [
                u for u in self.utterances if u.speaker == speaker and 5 <= (u.index or 0) < 5 + per_digit
            ]
            out[speaker_id] = self.examples(chosen)
        return out

    def evaluators(self) -> Evaluators:
        """The speaker-ID model (base speakers only) and digit classifier (cached; trained on first use)."""
        if self._evaluators is None:
            self._evaluators = load_evaluators(
                lambda: (
                    self.examples(split_fsdd(self.utterances, "train")),
                    self.examples(split_fsdd(self.utterances, "test")),
                ),
                speakers=self.settings.speakers(),
                seed=self.settings.seed,
            )
        return self._evaluators
