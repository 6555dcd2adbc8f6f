"""Data cards: ``data_cards/<name>.md`` files with validated YAML front matter and prose.

Every dataset the project reads has a card that says where the data came from, its license, what it
may be used for, its limits and whether it holds personal data. The front matter is checked by
:class:`DataCard` (``extra="forbid"``); the prose below it is free markdown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["CardError", "CardSource", "DataCard", "cards_dir", "list_cards", "load_card"]


class CardError(ValueError):
    """A data card is missing, lacks front matter or has invalid fields."""


class CardSource(BaseModel):
    """Where (a part of) the data comes from."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Who publishes it, e.g. 'MedMNIST v2 (Zenodo)'.")
    url: str = Field(description="The official page or file.")
    revision: str | None = Field(None, description="Commit, version or record id of the copy used.")
    path: str | None = Field(None, description="Path of the file inside that source.")


class DataCard(BaseModel):
    """The front matter of a data card."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9_]+$", description="Card name; equals the file name without .md.")
    title: str = Field(description="Human-readable dataset name.")
    source: list[CardSource] = Field(min_length=1, description="Official sources of the data.")
    license: str = Field(description="License of the data (and of the splits, when different).")
    version: str = Field(description="Which release or revision the project uses.")
    size: str = Field(description="Number of records and bytes, e.g. '5,855 images, 4.2 MB'.")
    splits: dict[str, int | str] = Field(description="Split name -> number of records (or a note).")
    task: str = Field(description="What the project uses it for, e.g. 'binary classification'.")
    metrics: list[str] = Field(min_length=1, description="Metrics reported on it.")
    intended_use: str = Field(description="What the data is suitable for.")
    limitations: list[str] = Field(min_length=1, description="Known biases, gaps and caveats.")
    personal_data: str = Field(description="Whether it describes people, and how it was de-identified.")
    citation: str = Field(description="How to cite it.")
    access: Literal["open", "credentialed"] = Field("open", description="Open download or gated access.")
    files: list[str] = Field(
        default_factory=list, description="Files or folders under the data directory (empty: none shipped)."
    )


def cards_dir() -> Path:
    """Return ``pipelines/data_cards`` (package data; ``data_cards`` links to it in a checkout)."""
    return Path(__file__).resolve().parents[1] / "data_cards"


def list_cards() -> list[str]:
    """Return the sorted names of the cards in :func:`cards_dir`."""
    return sorted(p.stem for p in cards_dir().glob("*.md") if p.name != "README.md")


def load_card(name_or_path: str | Path) -> tuple[DataCard, str]:
    """Read and validate a card.

    Args:
        name_or_path: A card name (``"fsdd"``) or the path of a ``.md`` file.

    Returns:
        The validated front matter and the prose body.

    Raises:
        CardError: Missing file, no front matter, invalid YAML or fields.
    """
    path = Path(name_or_path)
    if path.suffix != ".md":
        path = cards_dir() / f"{name_or_path}.md"
    if not path.is_file():
        raise CardError(f"data card {path} does not exist; write it (see data_cards/README.md)")
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n") or "\n---\n" not in text[4:]:
        raise CardError(f"data card {path} must start with YAML front matter between two '---' lines")
    front, body = text[4:].split("\n---\n", 1)
    try:
        data = yaml.safe_load(front)
    except yaml.YAMLError as error:
        raise CardError(f"data card {path} has invalid YAML front matter: {error}") from None
    try:
        card = DataCard.model_validate(data)
    except ValueError as error:
        raise CardError(f"data card {path} is invalid: {error}") from None
    if card.name != path.stem:
        raise CardError(f"data card {path} is named '{card.name}'; rename one so both are '{path.stem}'")
    if not body.strip():
        raise CardError(f"data card {path} has no prose after its front matter; describe the data")
    return card, body
