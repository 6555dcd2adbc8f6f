"""peft-pipelines: parameter-efficient fine-tuning pipelines for domain scientists."""

from __future__ import annotations

__version__ = "0.1.0"
