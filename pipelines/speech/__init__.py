"""Speech synthesis: adapters on multi-speaker TTS models for new-speaker adaptation.

Modules: ``audio`` (features, vocoders), ``data`` (FSDD, folders, durations), ``model`` (the small
acoustic model), ``metrics`` (MCD, DTW), ``pitch`` (F0 measures), ``evaluators`` (speaker-ID, digit
classifier), ``backbones``, ``adaptation``, ``scoring``, ``report``, ``pipeline`` (the registered
pipelines).
"""
