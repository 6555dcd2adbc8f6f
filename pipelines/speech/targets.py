"""The new speaker's clips: an FSDD speaker's official split, or the user's own folders.

``data.options.speaker_folder`` (adaptation clips) and ``test_folder`` (held-out clips to score) are
folders of WAV files with transcripts (:func:`~pipelines.speech.data.folder_utterances`: a
``metadata.csv`` of ``file name|transcript`` lines, or a ``.txt`` beside each WAV); without them the
target is the FSDD speaker ``target_speaker`` (default: the held-out one), its test clips those with
indices below ``eval_clips_per_digit``. :func:`target_clips` gives them as examples of the FSDD base
(with the second takes of the test texts), :func:`target_utterances` as utterances for a transformers
backbone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.core.data import sha256_folder
from pipelines.speech.adaptation import adaptation_clips, second_takes
from pipelines.speech.data import (
    FSDD_SHA256,
    Example,
    Utterance,
    folder_utterances,
    fsdd_utterances,
    split_fsdd,
)
from pipelines.speech.fsdd import FsddSession

__all__ = ["TargetClips", "target_clips", "second_take_clips", "take_pairs", "target_utterances"]


@dataclass
class TargetClips:
    """The target speaker's name, adaptation candidates, scored test clips, the clips a second take of a
    test text may come from, and the report's dataset entry."""

    speaker: str
    candidates: list[Example]
    test: list[Example]
    takes_from: list[Utterance]
    info: dict[str, Any]

    def adaptation(self, count: int | str) -> list[Example]:
        """The first ``count`` adaptation candidates in digit round-robin order."""
        by_path = {e.utterance.path: e for e in self.candidates}
        return [by_path[u.path] for u in adaptation_clips([e.utterance for e in self.candidates], count)]


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
    test = session.test_examples(target, data.eval_clips_per_digit)
    takes_from = [u for u in session.utterances if u.speaker == target]
    info = {"name": "fsdd", "sha256": FSDD_SHA256, "target_speaker": target}
    return TargetClips(target, session.speaker_examples(target, "train"), test, takes_from, info)


def second_take_clips(session: FsddSession, target: TargetClips, data: Any) -> list[Example] | None:
    """Another real take of each test text, used neither for scoring nor for any adaptation the run does
    (``data.adaptation_clips`` and each of ``data.sweep_clips``); None when ``data.second_take_reference``
    is off or some text has no such take."""
    if not data.second_take_reference:
        return None
    used = {e.utterance.path for count in [data.adaptation_clips, *data.sweep_clips]
            for e in target.adaptation(count)}  # fmt: skip
    takes = second_takes([e.utterance for e in target.test], target.takes_from, used)
    return session.examples(takes) if takes else None


def take_pairs(test: list[Example], takes: list[Example] | None) -> dict[str, str]:
    """Each test clip's name -> the name of its second take (``extra.second_takes``; empty without takes)."""
    return {e.utterance.path.stem: t.utterance.path.stem for e, t in zip(test, takes or [], strict=False)}


def target_utterances(data: Any, name: str, held_out: str) -> tuple[list[Utterance], list[Utterance], dict]:
    """Adaptation and test utterances for a transformers backbone, and the report's dataset entry: the
    user's folders (``name`` names their speaker), else an FSDD speaker's official splits.

    Raises:
        ValueError: ``speaker_folder`` is given without ``test_folder``.
    """
    if data.speaker_folder is not None:
        if data.test_folder is None:
            raise ValueError(
                "data.options.speaker_folder needs data.options.test_folder (held-out clips to score)"
            )
        train = folder_utterances(data.speaker_folder, name)
        if data.adaptation_clips != "all":
            train = adaptation_clips(train, data.adaptation_clips)
        test = folder_utterances(data.test_folder, name)
        return train, test, {"name": str(data.speaker_folder), "test_folder": str(data.test_folder)}
    target = data.target_speaker or held_out
    clips = [u for u in fsdd_utterances() if u.speaker == target]
    train = adaptation_clips(split_fsdd(clips, "train"), data.adaptation_clips)
    test = [u for u in split_fsdd(clips, "test") if u.index < data.eval_clips_per_digit]
    return train, test, {"name": "fsdd", "sha256": FSDD_SHA256, "target_speaker": target}
