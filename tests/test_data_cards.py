"""Every data card validates, and every registered dataset has a card whose files match its registration."""

from __future__ import annotations

import pytest

from pipelines.core.cards import CardError, DataCard, cards_dir, list_cards, load_card
from pipelines.core.data import get_dataset, list_datasets
from pipelines.core.registry import import_domains

EXPECTED_CARDS = {
    "pneumoniamnist",
    "mtsamples",
    "mimic_iv_notes",
    "fsdd",
    "flip_gb1",
    "flip_secondary_structure",
    "flip_bind",
}


def _registered_datasets() -> list[str]:
    """Import each domain that imports here (its optional libraries may be absent); datasets register then."""
    import_domains()
    return list_datasets()


def test_the_expected_cards_exist():
    assert EXPECTED_CARDS <= set(list_cards())


@pytest.mark.parametrize("name", list_cards())
def test_card_validates(name):
    card, body = load_card(name)
    assert card.name == name
    assert body.strip().startswith("#"), "the prose starts with a heading"
    assert all(source.url.startswith("https://") for source in card.source)
    assert (card.access == "credentialed") == (card.files == [])


@pytest.mark.parametrize("name", _registered_datasets())
def test_registered_dataset_has_matching_card(name):
    info = get_dataset(name)
    assert info.card is not None, f"dataset {name} names no card"
    card, _ = load_card(info.card)
    assert sorted(card.files) == sorted([*info.files, *info.folders])


def test_invalid_cards_are_refused_with_the_reason(tmp_path):
    good = (cards_dir() / "fsdd.md").read_text()
    wrong_key = tmp_path / "fsdd.md"
    wrong_key.write_text(good.replace("license:", "licence:"))
    with pytest.raises(CardError, match="licence\n  Extra inputs are not permitted"):
        load_card(wrong_key)
    renamed = tmp_path / "other.md"
    renamed.write_text(good)
    with pytest.raises(CardError, match="is named 'fsdd'; rename one so both are 'other'"):
        load_card(renamed)
    bare = tmp_path / "bare.md"
    bare.write_text("# no front matter\n")
    with pytest.raises(CardError, match="must start with YAML front matter between two '---' lines"):
        load_card(bare)
    with pytest.raises(CardError, match="does not exist"):
        load_card("no_such_card")
    assert set(DataCard.model_fields) >= {"name", "source", "license", "personal_data", "citation"}
