"""The FLIP datasets (J-SNACKKB/FLIP splits), read as published, and their registration.

GB1: CSV ``sequence,target,set,validation``. Secondary structure and binding sites: FASTA label files with
``>ID SET=train|test VALIDATION=True|False`` headers, joined to ``sequences.fasta`` by ID.
"""

from __future__ import annotations

from typing import Literal

from pipelines.core.data import DatasetInfo, dataset_file, register_dataset
from pipelines.protein.data import (
    DataIssues,
    OnInvalid,
    ProteinDataError,
    ProteinRecord,
    read_csv_records,
    read_residue_labels,
)

__all__ = [
    "SS3_CLASSES",
    "BIND_BITS",
    "GB1_SPLITS",
    "BIND_SPLITS",
    "load_flip_gb1",
    "load_flip_secondary_structure",
    "load_flip_bind",
]

SS3_CLASSES = ("H", "E", "C")  # helix, strand, coil: label indices 0, 1, 2
# FLIP bind labels are bit flags in the order SNM: 4 small molecule, 2 nucleic acid, 1 metal ion.
BIND_BITS = {"small_molecule": 4, "nucleic_acid": 2, "metal": 1}
GB1_SPLITS = ("one_vs_rest", "two_vs_rest", "three_vs_rest", "low_vs_high", "sampled")
BIND_SPLITS = ("one_vs_many", "two_vs_many", "from_publication", "one_vs_sm", "one_vs_mn", "one_vs_sn")


def load_flip_gb1(
    split: str = "three_vs_rest", on_invalid: OnInvalid = "error", issues: DataIssues | None = None
) -> list[ProteinRecord]:
    """Load a FLIP GB1 split (``set`` train/test, ``validation=True`` marks the validation part)."""
    if split not in GB1_SPLITS:
        raise ProteinDataError(f"unknown FLIP GB1 split '{split}'; choose one of {', '.join(GB1_SPLITS)}")
    path = dataset_file("flip_gb1", f"flip/gb1/{split}.csv")
    return read_csv_records(
        path, split_column="set", validation_column="validation", on_invalid=on_invalid, issues=issues
    )


def load_flip_secondary_structure(
    on_invalid: OnInvalid = "error", issues: DataIssues | None = None
) -> list[ProteinRecord]:
    """Load FLIP's ``sampled`` 3-state secondary structure split; unresolved residues are not scored."""
    folder = "flip/secondary_structure"
    return read_residue_labels(
        dataset_file("flip_secondary_structure", f"{folder}/sampled.fasta"),
        dataset_file("flip_secondary_structure", f"{folder}/sequences.fasta"),
        {c: i for i, c in enumerate(SS3_CLASSES)},
        on_invalid,
        issues,
        mask_path=dataset_file("flip_secondary_structure", f"{folder}/mask.fasta"),
    )


def load_flip_bind(
    split: str = "one_vs_many",
    ligand: Literal["any", "small_molecule", "nucleic_acid", "metal"] = "any",
    on_invalid: OnInvalid = "error",
    issues: DataIssues | None = None,
) -> list[ProteinRecord]:
    """Load a FLIP binding-site split as per-residue binary labels (binds ``ligand`` or not)."""
    if split not in BIND_SPLITS:
        raise ProteinDataError(f"unknown FLIP bind split '{split}'; choose one of {', '.join(BIND_SPLITS)}")
    if ligand != "any" and ligand not in BIND_BITS:
        raise ProteinDataError(f"unknown ligand '{ligand}'; choose any or one of {', '.join(BIND_BITS)}")
    bit = 7 if ligand == "any" else BIND_BITS[ligand]
    decode = {str(v): int(bool(v & bit)) for v in range(8)}
    return read_residue_labels(
        dataset_file("flip_bind", f"flip/bind/{split}.fasta"),
        dataset_file("flip_bind", "flip/bind/sequences.fasta"),
        decode,
        on_invalid,
        issues,
    )


_FLIP_HOME = "https://github.com/J-SNACKKB/FLIP (splits/<task>/splits.zip, commit 62cace87)"
_GB1_SUMS = {
    "low_vs_high.csv": "190217d19cdafec40d8a961fce2dcbfd9fc89c9f4c6fa994aa90861b06e073fa",
    "one_vs_rest.csv": "e901db7f88f5851f6d5177ca78d8ba9c7b01b4712cd553cb309f29a34f569d02",
    "sampled.csv": "19bcb946fb9f8fe5ac1d5ed0aa85d4a85848b44744560d9684cc278935f3bd16",
    "three_vs_rest.csv": "b8aa60cc061013a5c2e6f4070593c82976b1d9e5c9058a66ad57c6e9c3cec023",
    "two_vs_rest.csv": "b368e4564e10e33735f897c9b63f1be7030082e565c6d4e1368d6f1641a310de",
}
_SS_SUMS = {
    "mask.fasta": "6ffafb87ab0d40781103594d3a8fa202d1db741fd49cc00fe6220797bf55897f",
    "sampled.fasta": "d74173c6ecd35339e9455565b45160f7285d401a1fc05e814af67bcb7bb83ad1",
    "sequences.fasta": "cc69cb36650161fa08874c7a3a2ceceb9c3bbab1b6394cb875647c1b8b4a4b03",
}
_BIND_SUMS = {
    "from_publication.fasta": "8b000abee7f98633cdf3683aa9ef9311ddddd41c1be9845992c2af5f8a550e4d",
    "one_vs_many.fasta": "00c885369dcb92f2c9cee4a645ed4b8a23a135cf9a05ef5760916592133a3226",
    "one_vs_mn.fasta": "bfb89809e662e7fcff2d3861da8668be4174bfbe55dc8e80645fa41bb04a2ed1",
    "one_vs_sm.fasta": "a6716a11fcf5ba3431dacf0a8b7ead2a7a27b31ea0e75ffde2a38e35f896140c",
    "one_vs_sn.fasta": "0a11de0c900bfeea3e9f58ffc88d48f92ba9c44eada85df5e769324d753d8f5c",
    "sequences.fasta": "09487b43f207164acef3c491bf59e9ba83f3fcc2d19f011f2bab1ddfc0b9d924",
    "two_vs_many.fasta": "9002f9c5735d772a35b97cca8756194fc04446297dfd56ec5e3241a7db2bd235",
}


def _files(folder: str, sums: dict[str, str]) -> dict[str, str]:
    return {f"{folder}/{name}": digest for name, digest in sums.items()}


register_dataset(
    DatasetInfo(
        name="flip_gb1",
        files=_files("flip/gb1", _GB1_SUMS),
        card="flip_gb1",
        license="splits AFL-3.0, raw data CC BY 4.0",
        description="FLIP GB1: 8,733 variants of a 265-residue construct, fitness regression (Spearman)",
        homepage=_FLIP_HOME,
    )
)
register_dataset(
    DatasetInfo(
        name="flip_secondary_structure",
        files=_files("flip/secondary_structure", _SS_SUMS),
        card="flip_secondary_structure",
        license="AFL-3.0",
        description="FLIP secondary structure (sampled split): 11,156 proteins, 3-state labels per residue",
        homepage=_FLIP_HOME,
    )
)
register_dataset(
    DatasetInfo(
        name="flip_bind",
        files=_files("flip/bind", _BIND_SUMS),
        card="flip_bind",
        license="AFL-3.0",
        description="FLIP binding sites: 1,360 proteins, per-residue small-molecule/nucleic-acid/metal flags",
        homepage=_FLIP_HOME,
    )
)
