"""Speech data: the FSDD registration, folders of WAV files with transcripts, text ids, durations, batches.

Durations: no forced aligner exists offline, so each clip's duration targets are derived simply. The
voiced span is the run of frames from the first to the last frame whose mean log-mel energy lies within
``span_db`` (35 dB) of the clip's loudest frame; the frames before and after it go to a leading and a
trailing silence token, and the voiced frames are split uniformly over the characters of the text (the
remainder goes to the first characters). Characters stand in for phones: the digit words of FSDD are
short and this keeps the whole path free of a lexicon.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines.core.data import DatasetInfo, dataset_dir, register_dataset
from pipelines.speech.audio import AUDIO, load_wav, mel_spectrogram

__all__ = [
    "FSDD",
    "FSDD_SPEAKERS",
    "DIGIT_WORDS",
    "VOCAB",
    "Utterance",
    "Example",
    "fsdd_utterances",
    "folder_utterances",
    "transcript_digit",
    "digit_labels",
    "split_fsdd",
    "text_to_ids",
    "uniform_durations",
    "load_example",
    "collate_examples",
]

FSDD_SHA256 = "ddb17656a0bca4c5ddace082be188ca630516dc2ef1110afe3c4e9cc71173de4"
FSDD = register_dataset(
    DatasetInfo(
        name="fsdd",
        folders={"fsdd/recordings": ("*.wav", FSDD_SHA256)},
        card="fsdd",
        license="CC BY-SA 4.0",
        description="Free Spoken Digit Dataset: 3,000 clips of 6 speakers saying digits, 8 kHz mono WAV",
        homepage="https://github.com/Jakobovski/free-spoken-digit-dataset",
    )
)
FSDD_SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FSDD_TEST_INDICES = range(0, 5)  # the official split: clip indices 0-4 are test, 5-49 train

PAD, SILENCE = "<pad>", "_"
VOCAB = (PAD, SILENCE, " ", "'", *"abcdefghijklmnopqrstuvwxyz")
_CHAR_TO_ID = {c: i for i, c in enumerate(VOCAB)}
AUDIO_LOG_FLOOR = float(np.log(AUDIO.log_floor))
_FSDD_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")


@dataclass(frozen=True)
class Utterance:
    """One recording and its transcript; digit and index are set for FSDD clips."""

    path: Path
    text: str
    speaker: str
    digit: int | None = None
    index: int | None = None


@dataclass
class Example:
    """Model inputs and targets of one utterance: token ids, frames per token, log-mel, speaker id."""

    tokens: torch.Tensor  # (tokens,) long
    durations: torch.Tensor  # (tokens,) long, sums to frames
    mel: torch.Tensor  # (frames, n_mels) float
    speaker: int
    utterance: Utterance


def fsdd_utterances(root: Path | None = None) -> list[Utterance]:
    """Every FSDD clip, sorted by name; ``root`` defaults to the verified mirror folder."""
    root = Path(root) if root is not None else dataset_dir("fsdd", "fsdd/recordings")
    utterances = []
    for path in sorted(root.glob("*.wav")):
        match = _FSDD_NAME.match(path.name)
        if match is None:
            raise ValueError(
                f"FSDD file {path} does not follow '{{digit}}_{{speaker}}_{{index}}.wav'; remove it"
            )
        digit, speaker, index = int(match[1]), match[2], int(match[3])
        utterances.append(Utterance(path, DIGIT_WORDS[digit], speaker, digit, index))
    if not utterances:
        raise FileNotFoundError(
            f"no FSDD clips (*.wav) in {root}; point $PEFT_PIPELINES_DATA at the data mirror"
        )
    return utterances


def split_fsdd(utterances: list[Utterance], split: str) -> list[Utterance]:
    """The official FSDD split: ``test`` holds clip indices 0-4, ``train`` the rest."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown FSDD split '{split}'; use 'train' or 'test'")
    want_test = split == "test"
    return [u for u in utterances if (u.index in FSDD_TEST_INDICES) == want_test]


def _utf8_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None


def _metadata_texts(metadata: Path, stems: set[str]) -> dict[str, str]:
    """{file stem: transcript} of a ``metadata.csv``, each line checked (see :func:`folder_utterances`)."""
    lines = _utf8_text(metadata).splitlines()
    texts: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, row in enumerate(csv.reader(lines, delimiter="|", quoting=csv.QUOTE_NONE), start=1):
        if not row or not "".join(row).strip():
            continue
        where = f"{metadata} line {number}"
        if len(row) not in (2, 3):
            raise ValueError(
                f"{where} has {len(row)} column(s); write 'file name|transcript' (LJSpeech's "
                "'name|text|normalised text' also works)"
            )
        stem, text = Path(row[0].strip()).stem, row[-1].strip()
        if stem not in stems:
            header = " (metadata.csv has no header line)" if number == 1 else ""
            raise ValueError(
                f"{where} names '{row[0].strip()}', which is not a .wav file in {metadata.parent}{header}; "
                "fix the name or remove the line"
            )
        if stem in first_line:
            raise ValueError(f"{where} lists '{stem}' again (first on line {first_line[stem]}); keep one")
        if not text:
            raise ValueError(f"{where} has an empty transcript for '{stem}'; write what the clip says")
        texts[stem], first_line[stem] = text, number
    return texts


def transcript_digit(text: str) -> int | None:
    """The digit a transcript says when it is one digit word or one digit ("Seven.", "7"), else None."""
    normal = normalize_text(text)
    return DIGIT_WORDS.index(normal) if normal in DIGIT_WORDS else None


def digit_labels(utterances: list[Utterance]) -> list[int] | None:
    """Each clip's digit, the strata of ``data.fraction``'s draw; None when some clip's digit is unknown."""
    digits = [u.digit for u in utterances]
    return digits if None not in digits else None


def folder_utterances(folder: str | Path, speaker: str = "target") -> list[Utterance]:
    """Utterances of a speaker folder: its WAV files and their transcripts.

    Transcripts come from ``metadata.csv`` in the folder when present (the LJSpeech convention: UTF-8,
    no header, one line per clip ``file name|transcript``, the name with or without ``.wav``; of
    LJSpeech's three columns the last, the normalised text, is read), otherwise from a ``.txt`` or
    ``.lab`` file beside each WAV. A transcript that is one digit word or digit sets the clip's digit, so
    intelligibility scores it.

    Raises:
        FileNotFoundError: The folder does not exist or holds no WAV file, or a WAV file has no transcript.
        ValueError: A ``metadata.csv`` line lacks a column, names a file that is not in the folder,
            repeats one, or has an empty transcript; or the file is not UTF-8.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"speaker folder {folder} does not exist; give a folder of WAV files")
    wavs = sorted(folder.glob("*.wav"))
    if not wavs:
        raise FileNotFoundError(f"no .wav files in {folder}; pass a folder of WAV files with transcripts")
    metadata = folder / "metadata.csv"
    texts = _metadata_texts(metadata, {w.stem for w in wavs}) if metadata.is_file() else {}
    utterances = []
    for wav in wavs:
        text = texts.get(wav.stem)
        for side in (wav.with_suffix(".txt"), wav.with_suffix(".lab")):
            if text is None and side.is_file():
                text = _utf8_text(side).strip()
        if not text:
            raise FileNotFoundError(
                f"no transcript for {wav}; add a line '{wav.stem}|what it says' to {metadata}"
                + ("" if metadata.is_file() else f" or a file {wav.stem}.txt beside it")
            )
        utterances.append(Utterance(wav, text, speaker, transcript_digit(text)))
    return utterances


def normalize_text(text: str) -> str:
    """Lower-case, digits spelled out, anything outside the vocabulary dropped, spaces collapsed."""
    text = re.sub(r"\d", lambda m: f" {DIGIT_WORDS[int(m[0])]} ", text.lower())
    text = "".join(c for c in text if c in _CHAR_TO_ID and c not in (PAD, SILENCE))
    return " ".join(text.split())


def text_to_ids(text: str) -> torch.Tensor:
    """Token ids of a text, framed by a leading and a trailing silence token.

    Raises:
        ValueError: Nothing of the text is left after normalisation.
    """
    normal = normalize_text(text)
    if not normal:
        raise ValueError(f"text {text!r} has no letters the model knows (it reads a-z, space and ')")
    return torch.tensor([_CHAR_TO_ID[SILENCE], *(_CHAR_TO_ID[c] for c in normal), _CHAR_TO_ID[SILENCE]])


def uniform_durations(mel: torch.Tensor, num_chars: int, span_db: float = 35.0) -> torch.Tensor:
    """Frames per token (silence, characters..., silence) for a log-mel (see the module docstring).

    Returns:
        Long tensor of num_chars + 2 durations summing to the number of frames.
    """
    frames = mel.shape[0]
    energy_db = 10.0 * torch.log10(torch.exp(2.0 * mel).mean(dim=1).clamp(min=1e-20))
    voiced = torch.nonzero(energy_db >= energy_db.max() - span_db).flatten()
    start, end = int(voiced[0]), int(voiced[-1]) + 1
    if end - start < num_chars:  # too short a span: widen it evenly so each character gets a frame
        missing = min(num_chars, frames) - (end - start)
        start = max(0, start - (missing + 1) // 2)
        end = min(frames, start + max(num_chars, end - start))
    span = end - start
    base, extra = divmod(span, num_chars)
    chars = [base + (1 if i < extra else 0) for i in range(num_chars)]
    return torch.tensor([start, *chars, frames - end], dtype=torch.long)


def peak_normalize(wav: np.ndarray, peak: float = 0.9) -> np.ndarray:
    top = float(np.abs(wav).max())
    return wav * (peak / top) if top > 0 else wav


def load_example(utterance: Utterance, speaker: int) -> Example:
    """Read, resample to 22,050 Hz, peak-normalise and featurise one utterance."""
    wav, _ = load_wav(utterance.path, AUDIO.sample_rate)
    mel = mel_spectrogram(peak_normalize(wav))
    tokens = text_to_ids(utterance.text)
    durations = uniform_durations(mel, len(tokens) - 2)
    return Example(tokens, durations, mel, speaker, utterance)


def load_examples(utterances: list[Utterance], speakers: dict[str, int]) -> list[Example]:
    """Featurise utterances; ``speakers`` maps a speaker name to the model's speaker id."""
    return [load_example(u, speakers.get(u.speaker, 0)) for u in utterances]


def collate_examples(examples: list[Example]) -> dict[str, torch.Tensor]:
    """Pad a list of examples into a batch (tokens, durations, mels, lengths, speakers)."""
    token_lengths = torch.tensor([len(e.tokens) for e in examples])
    frame_lengths = torch.tensor([e.mel.shape[0] for e in examples])
    batch = len(examples)
    tokens = torch.zeros(batch, int(token_lengths.max()), dtype=torch.long)
    durations = torch.zeros_like(tokens)
    mels = torch.full((batch, int(frame_lengths.max()), examples[0].mel.shape[1]), AUDIO_LOG_FLOOR)
    for i, example in enumerate(examples):
        tokens[i, : len(example.tokens)] = example.tokens
        durations[i, : len(example.durations)] = example.durations
        mels[i, : example.mel.shape[0]] = example.mel
    return {
        "tokens": tokens,
        "durations": durations,
        "mels": mels,
        "token_lengths": token_lengths,
        "frame_lengths": frame_lengths,
        "speakers": torch.tensor([e.speaker for e in examples]),
    }
