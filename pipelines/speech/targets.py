"""The new speaker's clips on the FSDD base: an FSDD speaker's official split, or the user's own folders.

``data.options.speaker_folder`` (adaptation clips) and ``test_folder`` (held-out clips to score) are
folders of WAV files with transcripts (:func:`~pipelines.speech.data.folder_utterances`: a
``metadata.csv`` of ``file name|transcript`` lines, or a ``.txt`` beside each WAV); without them the
target is the FSDD speaker ``target_speaker`` (default: the held-out one), its test clips those with
indices below ``eval_clips_per_digit``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.core.data import sha256_folder
from pipelines.speech.data import FSDD_SHA256, Example, Utterance, folder_utterances
from pipelines.speech.fsdd import FsddSession

__all__ = ["TargetClips", "target_clips"]


@dataclass
class TargetClips:
    """The target speaker's name, adaptation candidates, scored test clips, the clips a second take of a
    test text may come from, and the report's dataset entry."""

    speaker: str
    candidates: list[Example]
    test: list[Example]
    takes_from: list[Utterance]
    info: dict[str, Any]


def target_clips(
    session: FsddSession, data: Any, held_out: str, base_speakers: list[str], name: str
) -> TargetClips:
    """The target's clips for ``data`` (AdaptationDataOptions); ``name`` names a folder's speaker.

    Raises:
        ValueError: One of ``speaker_folder`` and ``test_folder`` is given without the other, they share
            clips, or the FSDD target is a base speaker.
    """
    if data.speaker_folder is not None:
        if data.test_folder is None:
            raise ValueError(
                "data.options.speaker_folder needs data.options.test_folder (held-out clips to score)"
            )
        train = folder_utterances(data.speaker_folder, name)
        test = folder_utterances(data.test_folder, name)
        shared = sorted({u.path.resolve() for u in train} & {u.path.resolve() for u in test})
        if shared:
            raise ValueError(
                f"data.options.test_folder shares {len(shared)} clip(s) with speaker_folder "
                f"({shared[0].name} ...); score clips the adapter never trained on"
            )
        info = {
            "name": str(data.speaker_folder),
            "sha256": sha256_folder(data.speaker_folder),
            "test_folder": str(data.test_folder),
            "test_sha256": sha256_folder(data.test_folder),
            "target_speaker": name,
        }
        return TargetClips(name, session.examples(train), session.examples(test), train + test, info)
    if data.test_folder is not None:
        raise ValueError("data.options.test_folder is read with speaker_folder; set both, or neither")
    target = data.target_speaker or held_out
    if target in base_speakers:
        raise ValueError(
            f"target_speaker '{target}' is one of the base speakers {base_speakers}; "
            "pick the held-out speaker"
        )
    test = [
        e for e in session.speaker_examples(target, "test") if e.utterance.index < data.eval_clips_per_digit
    ]
    takes_from = [u for u in session.utterances if u.speaker == target]
    info = {"name": "fsdd", "sha256": FSDD_SHA256, "target_speaker": target}
    return TargetClips(target, session.speaker_examples(target, "train"), test, takes_from, info)
