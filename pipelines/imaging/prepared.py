"""A recipe's images made ready to train and score: splits, task, transforms, datasets and loaders.

:func:`prepare_images` reads the recipe's dataset (a registered name or ``data.options.path``), infers the
task and the number of outputs, builds the MONAI transforms and caps validation and test
(``data.options.max_val``, ``max_test``: stratified); :meth:`PreparedImages.training_set` applies
``data.options.max_train`` to the training examples the engine's low-data draw kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.utils.data import DataLoader

from pipelines.imaging.data import (
    build_transforms,
    collate,
    label_key,
    load_dataset_splits,
    make_dataset,
    subsample,
)
from pipelines.imaging.options import DataOptions

__all__ = ["PreparedImages", "prepare_images", "cap_records", "num_outputs", "dataset_source"]


@dataclass
class PreparedImages:
    """The loaded splits and what the experiment reads from them.

    Attributes:
        splits: Split name -> records, as read (before any cap).
        provenance: ``load_dataset_splits``' info: name, path, checksum, classes, split sizes.
        task: ``data.task``, else binary for two classes and multiclass for more.
        outputs: Logits of the classifier.
        spatial_dims: 2 or 3 (``data.options.spatial_dims``, else the backbone's).
        train_transform: The training transform chain (with augmentation).
        val, test: The capped validation and test records.
        val_set, test_set, val_loader, test_loader: Their datasets and loaders (evaluation transforms).
    """

    splits: dict[str, list]
    provenance: dict[str, Any]
    task: str
    outputs: int
    spatial_dims: int
    train_transform: Any
    val: list[dict]
    test: list[dict]
    val_set: Any
    test_set: Any
    val_loader: DataLoader
    test_loader: DataLoader

    def train_labels(self) -> list[Any]:
        """Each training record's class (the engine's low-data draw is stratified by it)."""
        return [label_key(record) for record in self.splits["train"]]

    def training_set(self, indices: list[int], options: DataOptions, seed: int) -> tuple[Any, int]:
        """The dataset of the training records at ``indices``, capped by ``options.max_train`` (stratified).

        Returns:
            (the dataset, the number of training images in it).
        """
        kept = [self.splits["train"][i] for i in indices]
        records = cap_records(kept, options.max_train, seed)
        return make_dataset(records, self.train_transform, options.transforms.cache_rate), len(records)

    def dataset_info(self, recipe: Any, options: DataOptions) -> dict[str, Any]:
        """The report's ``dataset`` entry: provenance, the split sizes used (training before any draw) and
        the uncapped ones, and the recipe's low-data settings."""
        used = {"train": len(self.splits["train"]), "val": len(self.val), "test": len(self.test)}
        return {
            **self.provenance,
            "splits": used,
            "full_splits": self.provenance["splits"],
            "fraction": recipe.data.fraction,
            "shots_per_class": recipe.data.shots_per_class,
            "max_train": options.max_train,
        }


def prepare_images(recipe: Any, options: DataOptions, backbone: Any) -> PreparedImages:
    """Read and split the recipe's dataset and build its transforms, capped splits and loaders."""
    spatial = options.spatial_dims or backbone.spatial_dims
    name, path = dataset_source(recipe.data.dataset, options.path)
    splits, provenance = load_dataset_splits(name, path, spatial, recipe.seed)
    task = recipe.data.task or ("binary" if num_outputs("multiclass", splits) == 2 else "multiclass")
    from_files = isinstance(splits["train"][0]["image"], str)
    train_transform = build_transforms(options.transforms, True, spatial, from_files)
    evaluation = build_transforms(options.transforms, False, spatial, from_files)
    val = cap_records(splits["val"], options.max_val, recipe.seed)
    test = cap_records(splits["test"], options.max_test, recipe.seed)
    cache_rate = options.transforms.cache_rate
    val_set, test_set = make_dataset(val, evaluation, cache_rate), make_dataset(test, evaluation, cache_rate)
    return PreparedImages(
        splits=splits,
        provenance=provenance,
        task=task,
        outputs=num_outputs(task, splits),
        spatial_dims=spatial,
        train_transform=train_transform,
        val=val,
        test=test,
        val_set=val_set,
        test_set=test_set,
        val_loader=DataLoader(val_set, options.eval_batch_size, shuffle=False, collate_fn=collate),
        test_loader=DataLoader(test_set, options.eval_batch_size, shuffle=False, collate_fn=collate),
    )


def cap_records(records: list[dict], limit: int | None, seed: int) -> list[dict]:
    """A stratified subset of about ``limit`` records (all when there are fewer)."""
    if limit is None or len(records) <= limit:
        return records
    return subsample(records, fraction=limit / len(records), seed=seed)


def num_outputs(task: str, splits: dict[str, list]) -> int:
    """The classifier's outputs: the labels' width (multilabel), 2 (binary) or the largest class + 1."""
    labels = [record["label"] for split in splits.values() for record in split]
    if task == "multilabel":
        return len(labels[0])
    return 2 if task == "binary" else int(max(labels)) + 1


def dataset_source(dataset: str, path: str | None) -> tuple[str | None, str | None]:
    """(registered name, path) of ``data.dataset`` and ``data.options.path``: the path wins; a dataset that
    looks like a path (a '/' or a file suffix) is one."""
    if path:
        return dataset, path
    if "/" in dataset or dataset.endswith((".npz", ".csv", ".csv.gz")):
        return None, dataset
    return dataset, None
