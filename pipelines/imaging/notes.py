"""What an imaging report says beside its scores and the engine's notes: image size, threshold, caps."""

from __future__ import annotations

__all__ = ["report_notes"]


def report_notes(
    image_size: int | list[int], spatial_dims: int, dataset_info: dict, max_train: int | None
) -> list[str]:
    """The notes of an imaging report (``dataset_info``: the report's ``dataset`` entry, after the engine's
    low-data draw, whose note the engine writes)."""
    sizes = [image_size] * spatial_dims if isinstance(image_size, int) else image_size
    notes = [
        f"Images resized to {'x'.join(map(str, sizes))}; binary thresholds chosen on validation by "
        "Youden's J and applied unchanged to test."
    ]
    if max_train is not None:
        used, drawn = dataset_info["splits"]["train"], dataset_info["low_data"]["train_used"]
        notes.append(
            f"Training images: {used} of the {drawn} training examples (data.options.max_train={max_train}, "
            "a stratified cap applied after any low-data draw)."
        )
    return notes
