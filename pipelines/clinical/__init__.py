"""Clinical text: a domain adapter trained with the causal-LM objective on notes, then a task adapter
and a classification head on LLaMA-family models (Gema et al. 2023)."""

from __future__ import annotations
