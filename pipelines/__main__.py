"""``python -m pipelines``: the ``peft-pipelines`` command."""

from __future__ import annotations

from pipelines.cli import main

raise SystemExit(main())
