"""Speech synthesis: adapters on multi-speaker TTS models for new-speaker adaptation.

Modules: ``audio`` (features, vocoders), ``data`` (FSDD, folders, durations), ``model`` (the small
acoustic model), ``metrics`` (MCD, F0), ``evaluators`` (speaker-ID, digit classifier), ``backbones``,
``adaptation``, ``scoring``, ``report``, ``pipeline`` (the registered pipelines).
"""
