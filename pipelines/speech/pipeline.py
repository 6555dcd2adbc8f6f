"""The registered speech pipelines: ``speech/speaker_adaptation`` and ``speech/base_multispeaker``.

``speech/speaker_adaptation`` adapts the FSDD base (this module) or, when ``backbone.name`` is a
transformers TTS model, SpeechT5 / FastSpeech2Conformer (:mod:`pipelines.speech.hf_pipeline`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from pipelines.core.evaluation import EvaluationReport, RunResult
from pipelines.core.experiment import run_experiment, train_candidate
from pipelines.core.peft import AdapterSpec, load_adapter, save_adapter
from pipelines.core.recipe import StageSection, pipeline_options
from pipelines.core.registry import register_pipeline
from pipelines.core.training import TrainConfig, TrainResult
from pipelines.speech.adaptation import BASELINES as OFFLINE_BASELINES
from pipelines.speech.adaptation import ClipTraining, adaptation_recipe, default_adapter, nearest_speaker
from pipelines.speech.audio import load_vocoder
from pipelines.speech.backbones import Backbone, BaseSettings, load_backbone
from pipelines.speech.data import Example, Utterance, folder_utterances, load_example, text_to_ids
from pipelines.speech.fsdd import FsddSession
from pipelines.speech.hf_tts import is_hf_backbone
from pipelines.speech.options import (
    HF_FIELDS,
    AdaptationDataOptions,
    AdaptationOptions,
    AdaptationStageOptions,
    BaseOptions,
    SpeechBackboneOptions,
)
from pipelines.speech.saved import read_speech_facts, write_speech_facts
from pipelines.speech.scoring import evaluate_scores, synthesize_and_score

__all__ = ["SpeakerAdaptationPipeline", "BaseMultispeakerPipeline"]


def _utterances(data: str | Path | list[Utterance], speaker: str) -> list[Utterance]:
    if isinstance(data, (str, Path)):
        return folder_utterances(data, speaker)
    return list(data)


def _low_data_refusals(recipe, fix: str, fraction: bool = False) -> list[tuple[str, str]]:
    """Refuse ``data.shots_per_class``, and ``data.fraction`` unless the pipeline draws one (``fraction``)."""
    refused = []
    if recipe.data.fraction != 1.0 and not fraction:
        refused.append(("data.fraction", f"{recipe.pipeline} does not sample a fraction of its data; {fix}"))
    if recipe.data.shots_per_class is not None:
        refused.append(("data.shots_per_class", f"{recipe.pipeline} has no classes to count shots of; {fix}"))
    return refused


def _folder_refusals(recipe) -> list[tuple[str, str]]:
    """``speaker_folder`` and ``test_folder`` go together and replace the FSDD clip choice."""
    given = {key for key, value in recipe.data.options.items() if value is not None}
    where = "data.options."
    if "speaker_folder" not in given:
        if "test_folder" not in given:
            return []
        reason = "test_folder is read with speaker_folder; set both, or neither to adapt to an FSDD speaker"
        return [(where + "test_folder", reason)]
    refused = [
        (where + key, f"{key} chooses FSDD clips; with speaker_folder all test_folder clips are scored")
        for key in ("target_speaker", "eval_clips_per_digit")
        if key in given
    ]
    if "test_folder" not in given:
        reason = "speaker_folder needs test_folder: held-out WAV files of the same speaker to score"
        refused.append((where + "test_folder", reason))
    return refused


# Options only one kind of backbone reads: refused beside the other kind instead of ignored.
BUILT_IN_ONLY = {
    "backbone.options": tuple(k for k in BaseSettings.model_fields if k != "held_out_speaker") + ("vocoder",),
    "data.options": ("plot_clips", "evaluators", "vocode_reference", "second_take_reference"),
}


def _validation_refusals(recipe) -> list[tuple[str, str]]:
    """Speaker adaptation has no validation clips: evaluation and early stopping have nothing to read."""
    reason = "speaker adaptation has no validation clips to evaluate; remove"
    return [
        (f"stages.{index}.train.{name}", f"{reason} {name}")
        for index, stage in enumerate(recipe.stages)
        for name in ("eval_every", "early_stopping_patience")
        if getattr(stage.train, name) is not None
    ]


def _backbone_refusals(recipe) -> list[tuple[str, str]]:
    """Options of the built-in FSDD acoustic model beside a transformers backbone, and the transformers
    options (``HF_FIELDS``) beside the built-in model."""
    name = recipe.backbone.name
    sections = {"backbone.options": recipe.backbone.options, "data.options": recipe.data.options}
    given = {f"{where}.{key}" for where, options in sections.items()
             for key, value in options.items() if value is not None}  # fmt: skip
    if is_hf_backbone(name):
        unread = [f"{where}.{key}" for where, keys in BUILT_IN_ONLY.items() for key in keys]
        reason = f"the built-in FSDD acoustic model reads it; the transformers backbone {name} does not"
    else:
        unread = [f"backbone.options.{key}" for key in HF_FIELDS if key != "vocoder"]
        reason = f"transformers backbones (hf:<id>, a folder) read it; the built-in model {name} does not"
    return [(path, f"{reason}: remove it") for path in unread if path in given]


class SpeakerAdaptationPipeline:
    """Adapt a frozen multi-speaker acoustic model to a new speaker with a small adapter.

    Lab code::

        pipe = create_pipeline("speech/speaker_adaptation", train={"max_steps": 200})
        pipe.fit("my_speaker_wavs/")          # WAV files + metadata.csv (id|text) or .txt beside each
        report = pipe.evaluate("my_speaker_test_wavs/")
        wav = pipe.synthesize("seven")        # 22,050 Hz waveform
    """

    OBJECTIVES = ("tts",)
    BASELINES = (*OFFLINE_BASELINES, "base")  # base: the frozen transformers backbone
    SPEC_BASELINES = True  # an adapter spec in compare trains with the stage's objective and budget
    DATASETS = ("fsdd",)

    def __init__(
        self,
        backbone: str | Backbone = "fsdd_multispeaker",
        adapter: AdapterSpec | None = None,
        train: TrainConfig | dict | None = None,
        backbone_options: SpeechBackboneOptions | dict | None = None,
        speaker: str | int | None = None,
        name: str = "speaker",
        evaluators: bool = True,
        seed: int = 0,
        stage_options: AdaptationStageOptions | None = None,
        data_options: AdaptationDataOptions | dict | None = None,
        compare: list[str] | tuple[str, ...] = OFFLINE_BASELINES,
    ) -> None:
        """Args: backbone name or Backbone; adapter spec (default bottleneck, hidden 16, on every
        ``proj``); training settings; base settings; the existing speaker to condition on (None: the
        nearest by speaker-ID embedding when the FSDD evaluators are used, else speaker 0); adapter name;
        whether to load the FSDD evaluators (speaker similarity, intelligibility); seed; and for
        ``run``: baseline settings, data options (AdaptationDataOptions) and the baselines to compare."""
        options = backbone_options if isinstance(backbone_options, SpeechBackboneOptions) else None
        self.backbone_options = options or SpeechBackboneOptions(**(backbone_options or {}))
        self.session = FsddSession(self.backbone_options.base_settings())
        self.backbone = backbone if isinstance(backbone, Backbone) else None
        self.backbone_name = backbone if isinstance(backbone, str) else backbone.info.get("name", "custom")
        self.adapter = adapter or default_adapter()
        self.train_config = train if isinstance(train, TrainConfig) else TrainConfig(**(train or {}))
        self.speaker, self.name, self.seed = speaker, name, seed
        self.use_evaluators = evaluators
        self.stage_options = stage_options or AdaptationStageOptions()
        if isinstance(data_options, dict):
            data_options = AdaptationDataOptions(**data_options)
        self.options = AdaptationOptions(
            backbone=self.backbone_options, data=data_options or AdaptationDataOptions()
        )
        self.compare = list(compare)
        self.model = None
        self.speaker_id: int | None = None
        self._vocoder = None
        self.recipe = None

    @classmethod
    def check_recipe(cls, recipe) -> list[tuple[str, str]]:
        """Refuse ``data.shots_per_class`` (``data.fraction`` draws that share of the adaptation clips, per
        digit where digits are known) and speaker folder options that would go unread."""
        fix = "choose the number of adaptation clips with data.options.adaptation_clips"
        refusals = _low_data_refusals(recipe, fix, fraction=True) + _folder_refusals(recipe)
        return refusals + _backbone_refusals(recipe) + _validation_refusals(recipe)

    @classmethod
    def from_recipe(cls, recipe):
        """Build the pipeline of a validated recipe (its single stage is the adapter); a transformers
        backbone (``hf:<hub id>``, a local folder, ``test_tiny_speecht5``) gets
        HfSpeakerAdaptationPipeline."""
        options = pipeline_options(recipe) or AdaptationOptions()
        if len(recipe.stages) != 1:
            raise ValueError(
                f"speech/speaker_adaptation takes one stage, the recipe has {len(recipe.stages)}"
            )
        stage = recipe.stages[0]
        common = dict(
            name=stage.name,
            seed=recipe.seed,
            stage_options=options.stages[0] if options.stages else None,
            data_options=options.data,
            compare=recipe.compare,
        )
        if is_hf_backbone(recipe.backbone.name):
            from pipelines.speech.hf_pipeline import HfSpeakerAdaptationPipeline

            pipe = HfSpeakerAdaptationPipeline(
                recipe.backbone.name, stage.adapter, stage.train, options.backbone, **common
            )
            pipe.recipe = recipe
            return pipe
        if "base" in recipe.compare:
            raise ValueError(
                "compare: 'base' is for transformers backbones; the FSDD base model's own voice is "
                "'nearest_speaker'"
            )
        pipe = cls(recipe.backbone.name, stage.adapter or default_adapter(), stage.train, options.backbone,
                   **common)  # fmt: skip
        pipe.recipe = recipe
        return pipe

    # lab code -------------------------------------------------------------------------------------
    def _ensure_backbone(self, run_dir: Path | None = None, resume: bool = False) -> Backbone:
        if self.backbone is None:
            self.backbone = load_backbone(
                self.backbone_name,
                self.backbone_options.base_settings(),
                self.session.base_training_examples,
                run_dir,
                resume,
            )
        return self.backbone

    def _examples(self, utterances: list[Utterance]) -> list[Example]:
        return [load_example(u, 0) for u in utterances]

    def _choose_speaker(self, examples: list[Example]) -> int:
        backbone = self._ensure_backbone()
        if isinstance(self.speaker, int):
            return self.speaker
        if isinstance(self.speaker, str):
            if self.speaker not in backbone.speakers:
                raise ValueError(
                    f"speaker '{self.speaker}' is not one of the base speakers {backbone.speakers}"
                )
            return backbone.speakers.index(self.speaker)
        if self.use_evaluators and self.backbone_name == "fsdd_multispeaker":
            return nearest_speaker(self.session.evaluators(), examples, self.session.base_speaker_examples())[
                0
            ]
        return 0

    def stage(self) -> StageSection:
        """The one stage lab code and recipes train: the constructor's adapter, name and train config."""
        return StageSection(name=self.name, objective="tts", adapter=self.adapter, train=self.train_config)

    def fit(self, train: str | Path | list[Utterance], val=None) -> TrainResult:
        """Train the adapter on a folder of WAV files with transcripts (or Utterances), as a recipe's
        stage trains (the engine's ``train_candidate``; ``val`` is not used).

        Returns:
            The training loop's result.
        """
        examples = self._examples(_utterances(train, self.name))
        self.speaker_id = self._choose_speaker(examples)
        hooks = ClipTraining(self._ensure_backbone().model, examples, self.speaker_id, self.seed, False)
        trained = train_candidate(hooks, [self.stage()], self.name, Path("."), False, self.seed, False)
        self.model = trained.model.eval()
        return trained.results[0]

    def _require_fit(self) -> None:
        if self.model is None:
            raise RuntimeError("the pipeline has no adapted model yet; call fit(train) first")

    def vocoder(self):
        """The vocoder named in the backbone options (loaded once)."""
        if self._vocoder is None:
            self._vocoder = load_vocoder(self.backbone_options.vocoder)
        return self._vocoder

    def evaluate(self, test: str | Path | list[Utterance], bootstrap: int = 1000) -> EvaluationReport:
        """The speech metrics (``SPEECH_METRICS``; intelligibility NaN without digits) on test clips."""
        self._require_fit()
        examples = self._examples(_utterances(test, self.name))
        evaluators = self.session.evaluators() if self.use_evaluators else None
        synthesis = synthesize_and_score(
            self.model, examples, self.speaker_id, self.vocoder(), evaluators, self.session.num_bins
        )
        return evaluate_scores(synthesis, bootstrap, self.seed)

    def synthesize(self, text: str) -> np.ndarray:
        """The adapted voice saying ``text``: a waveform at 22,050 Hz."""
        self._require_fit()
        return self.vocoder()(self.model.synthesize(text_to_ids(text), self.speaker_id))

    def save_adapter(self, directory: str | Path) -> Path:
        """Write the adapter (native format, safetensors) and the base speaker it speaks as."""
        self._require_fit()
        path = save_adapter(self.model, directory, name=self.name)
        speakers = self._ensure_backbone().speakers
        write_speech_facts(directory, {"speaker_id": self.speaker_id, "speakers": speakers})
        return path

    def load_adapter(self, directory: str | Path) -> None:
        """Restore what :meth:`save_adapter` (or a run's ``adapters/<stage>``) wrote: the adapter on a copy
        of the base, speaking as the same base speaker; then ``evaluate`` and ``synthesize`` work."""
        facts = read_speech_facts(directory)
        speakers = self._ensure_backbone().speakers
        if facts.get("speakers") not in (None, speakers):
            raise ValueError(
                f"{directory} was trained on a base with speakers {facts['speakers']}, not {speakers}; "
                "load it with the same base model"
            )
        model = copy.deepcopy(self._ensure_backbone().model)
        load_adapter(model, directory)
        self.model, self.speaker_id = model.eval(), int(facts["speaker_id"])

    # recipe path ------------------------------------------------------------------------------------
    def run(self, run_dir: Path, resume: bool = False) -> RunResult:
        """Adapt with the stage's adapter and the baselines in ``compare``; score all on the same clips
        (the core engine with :class:`~pipelines.speech.experiment.SpeechExperiment` as its hooks)."""
        from pipelines.speech.experiment import SpeechExperiment

        recipe = adaptation_recipe(self.recipe, self.stage(), self.compare, self.seed, self.backbone_name)
        return run_experiment(SpeechExperiment(self, recipe, resume), recipe, Path(run_dir), resume)


class BaseMultispeakerPipeline:
    """Train (or load from the cache) the FSDD multi-speaker base model and score it on its speakers."""

    OBJECTIVES = ("tts",)
    BASELINES = ()
    DATASETS = ("fsdd",)

    def __init__(self, backbone_options: SpeechBackboneOptions | dict | None = None, seed: int = 0) -> None:
        options = backbone_options if isinstance(backbone_options, SpeechBackboneOptions) else None
        self.backbone_options = options or SpeechBackboneOptions(**(backbone_options or {}))
        self.session = FsddSession(self.backbone_options.base_settings())
        self.seed, self.recipe, self.options = seed, None, BaseOptions()

    @classmethod
    def check_recipe(cls, recipe) -> list[tuple[str, str]]:
        """Refuse the generic low-data fields: the base trains on every training clip of its speakers."""
        fix = "the base model trains on every training clip of its speakers"
        return _low_data_refusals(recipe, fix) + _backbone_refusals(recipe)

    @classmethod
    def from_recipe(cls, recipe) -> BaseMultispeakerPipeline:
        """Build from a recipe; base training settings live in ``backbone.options`` (they key the cache)."""
        options = pipeline_options(recipe) or BaseOptions()
        for index, stage in enumerate(recipe.stages):
            if stage.adapter is not None or stage.train != TrainConfig():
                raise ValueError(
                    f"stages.{index}: speech/base_multispeaker takes no adapter or train settings; set "
                    "steps, batch_size and lr under backbone.options, so that the adaptation recipe finds "
                    "the same base"
                )
        pipe = cls(options.backbone, recipe.seed)
        pipe.recipe, pipe.options = recipe, options
        return pipe

    def run(self, run_dir: Path, resume: bool = False) -> RunResult:
        """Train (``resume``: continue) or load the base, then score it on the base speakers' test clips."""
        from pipelines.speech.base_experiment import BaseExperiment, base_recipe

        recipe = self.recipe or base_recipe(self.seed)
        return run_experiment(BaseExperiment(self, recipe, resume), recipe, Path(run_dir), resume)


register_pipeline(
    "speech/speaker_adaptation",
    SpeakerAdaptationPipeline,
    options=AdaptationOptions,
    demo="speech/fsdd_speaker_adapter",
)
register_pipeline("speech/base_multispeaker", BaseMultispeakerPipeline, options=BaseOptions)
