"""``speech/speaker_adaptation`` on a transformers TTS backbone (SpeechT5 or FastSpeech2Conformer).

Chosen by the recipe's ``backbone.name`` (``hf:<hub id>``, a local folder, or ``test_tiny_speecht5`` /
``test_tiny_fastspeech2_conformer``); lab code uses :class:`HfSpeakerAdaptationPipeline` directly::

    pipe = HfSpeakerAdaptationPipeline("hf:microsoft/speecht5_tts", train={"max_steps": 300})
    pipe.fit("my_speaker_wavs/")          # WAV files + metadata.csv (id|text) or .txt beside each
    report = pipe.evaluate("my_speaker_test_wavs/")
    wav = pipe.synthesize("seven")        # at pipe.sample_rate (SpeechT5 16 kHz, FastSpeech2Conformer 22,050)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.core.evaluation import EvaluationReport, RunResult
from pipelines.core.experiment import run_experiment, train_candidate
from pipelines.core.peft import AdapterSpec, load_adapter, save_adapter
from pipelines.core.recipe import StageSection
from pipelines.core.training import TrainConfig, TrainResult
from pipelines.speech.adaptation import adaptation_recipe
from pipelines.speech.data import Utterance, folder_utterances
from pipelines.speech.hf_adaptation import HfClipTraining, default_hf_adapter, evaluate_hf, hf_examples
from pipelines.speech.hf_tts import HfTts, load_hf_tts
from pipelines.speech.options import AdaptationDataOptions, AdaptationStageOptions, SpeechBackboneOptions
from pipelines.speech.saved import read_speech_facts, write_speech_facts

__all__ = ["HfSpeakerAdaptationPipeline"]

HF_BASELINES = ("lora", "full_finetune", "base", "nearest_speaker")


def _utterances(data: str | Path | list[Utterance], speaker: str) -> list[Utterance]:
    return folder_utterances(data, speaker) if isinstance(data, (str, Path)) else list(data)


class HfSpeakerAdaptationPipeline:
    """Adapt a frozen SpeechT5 / FastSpeech2Conformer to a new speaker with a small adapter."""

    def __init__(
        self,
        backbone: str | HfTts = "hf:microsoft/speecht5_tts",
        adapter: AdapterSpec | None = None,
        train: TrainConfig | dict | None = None,
        backbone_options: SpeechBackboneOptions | dict | None = None,
        name: str = "speaker",
        seed: int = 0,
        stage_options: AdaptationStageOptions | None = None,
        data_options: AdaptationDataOptions | dict | None = None,
        compare: list[str] | tuple[str, ...] = ("lora", "base"),
    ) -> None:
        if isinstance(backbone_options, dict):
            backbone_options = SpeechBackboneOptions(**backbone_options)
        self.backbone_options = backbone_options or SpeechBackboneOptions()
        self.backbone_name = backbone if isinstance(backbone, str) else backbone.info.get("name", "custom")
        self.tts = backbone if isinstance(backbone, HfTts) else None
        self.adapter = adapter
        self.train_config = train if isinstance(train, TrainConfig) else TrainConfig(**(train or {}))
        self.name, self.seed = name, seed
        self.stage_options = stage_options or AdaptationStageOptions()
        if isinstance(data_options, dict):
            data_options = AdaptationDataOptions(**data_options)
        self.data_options = data_options or AdaptationDataOptions()
        unknown = [c for c in compare if isinstance(c, str) and c not in HF_BASELINES]
        if unknown:
            raise ValueError(
                f"compare has {unknown}; a transformers backbone compares lora, full_finetune, base"
            )
        # the offline path's nearest_speaker is, here, the frozen base with its speaker conditioning
        self.compare: list = []
        for entry in compare:
            entry = "base" if entry == "nearest_speaker" else entry
            if entry not in self.compare:
                self.compare.append(entry)
        self.model: HfTts | None = None
        self.statistics: dict | None = None
        self.recipe = None

    def backbone(self) -> HfTts:
        """The frozen transformers backbone (loaded once)."""
        if self.tts is None:
            options = self.backbone_options
            self.tts = load_hf_tts(
                self.backbone_name, options.hf_vocoder, options.speaker_embedding, options.local_files_only
            )
        return self.tts

    @property
    def sample_rate(self) -> int:
        """The model's audio rate (inputs are resampled to it, synthesis comes out at it)."""
        return self.backbone().features.sample_rate

    def _spec(self) -> AdapterSpec:
        return self.adapter or default_hf_adapter(self.backbone().family)

    # lab code -------------------------------------------------------------------------------------
    def stage(self) -> StageSection:
        """The one stage lab code and recipes train: the adapter (default for the family), name, config."""
        return StageSection(name=self.name, objective="tts", adapter=self._spec(), train=self.train_config)

    def fit(self, train: str | Path | list[Utterance], val=None) -> TrainResult:
        """Train the adapter on a folder of WAV files with transcripts (or Utterances), as a recipe's
        stage trains (the engine's ``train_candidate``; ``val`` is not used)."""
        examples = hf_examples(self.backbone(), _utterances(train, self.name))
        self.statistics = examples[0].extra.get("statistics") if examples else None
        hooks = HfClipTraining(self.backbone(), examples, self.seed, checkpoint=False)
        trained = train_candidate(hooks, [self.stage()], self.name, Path("."), False, self.seed, False)
        self.model = trained.model.eval()
        return trained.results[0]

    def _require_fit(self) -> HfTts:
        if self.model is None:
            raise RuntimeError("the pipeline has no adapted model yet; call fit(train) first")
        return self.model

    def evaluate(self, test: str | Path | list[Utterance], bootstrap: int = 1000) -> EvaluationReport:
        """MCD and log-F0 RMSE of the adapted voice on test recordings."""
        model = self._require_fit()
        examples = hf_examples(self.backbone(), _utterances(test, self.name), self.statistics)
        return evaluate_hf(model, examples, bootstrap, self.seed)

    def synthesize(self, text: str) -> np.ndarray:
        """The adapted voice saying ``text`` at :attr:`sample_rate`."""
        model = self._require_fit()
        return model.vocode(model.synthesize_mel(model.tokenize(text), self.seed))

    def save_adapter(self, directory: str | Path) -> Path:
        """Write the adapter (native format, safetensors) and its input statistics to ``directory``."""
        path = save_adapter(self._require_fit().model, directory, name=self.name)
        write_speech_facts(directory, {"statistics": self.statistics})
        return path

    def load_adapter(self, directory: str | Path) -> None:
        """Restore what :meth:`save_adapter` (or a run's ``adapters/<stage>``) wrote: the adapter on a copy
        of the backbone and the statistics its inputs are standardised with."""
        facts = read_speech_facts(directory)
        model = self.backbone().copy()
        load_adapter(model.model, directory)
        saved = facts.get("statistics")  # {"pitch": [mean, std], "energy": [mean, std]} in the JSON
        self.model = model.eval()
        self.statistics = {key: tuple(pair) for key, pair in saved.items()} if saved else None

    # recipe path ------------------------------------------------------------------------------------
    def run(self, run_dir: Path, resume: bool = False) -> RunResult:
        """Adapt with the stage's adapter and the baselines in ``compare``; score all on the same clips
        (the core engine with :class:`~pipelines.speech.hf_experiment.HfExperiment` as its hooks)."""
        from pipelines.speech.hf_experiment import HfExperiment

        recipe = adaptation_recipe(self.recipe, self.stage(), self.compare, self.seed, self.backbone_name)
        return run_experiment(HfExperiment(self, recipe, resume), recipe, Path(run_dir), resume)
