"""The user's own notes: a CSV (``.csv``, ``.csv.gz``), JSONL or Parquet file, or a DataFrame (a
MIMIC-style export, lab data), turned into labelled :class:`~pipelines.clinical.data.Notes`.

A file that is cut short, not UTF-8, empty or without the named columns is refused in one line that
names it. Privacy: messages name files, columns, ids, lines and byte offsets, never note text.
"""

from __future__ import annotations

import codecs
import gzip
import re
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.clinical.data import Notes, NotesError, TaskType

__all__ = ["notes_from_frame", "load_notes_file"]

_CSV = (".csv", ".csv.gz")
_JSONL = (".jsonl", ".jsonl.gz", ".ndjson")
_PLACE = re.compile(r"\b(line|row) (\d+)")


def _label_column(
    values: Any, column: str, task: TaskType | None, where: str
) -> tuple[np.ndarray, list[str], TaskType]:
    distinct = sorted(values.unique().tolist(), key=str)
    as_numbers = {str(v) for v in distinct} <= {"0", "1", "0.0", "1.0", "True", "False"}
    if task is None:
        task = "binary" if len(distinct) <= 2 else "multiclass"
    if task == "binary":
        if len(distinct) != 2:
            raise NotesError(
                f"{where}: label column '{column}' has {len(distinct)} distinct values; binary needs 2"
            )
        if as_numbers:
            labels = values.map(lambda v: int(str(v) in ("1", "1.0", "True"))).to_numpy(np.int64)
            return labels, ["0", "1"], task
        return (values == distinct[1]).to_numpy(np.int64), [str(v) for v in distinct], task
    if task == "multiclass":
        index = {v: k for k, v in enumerate(distinct)}
        return values.map(index).to_numpy(np.int64), [str(v) for v in distinct], task
    raise NotesError(
        f"{where}: task '{task}' needs several 0/1 label columns, one per label; '{column}' is one column"
    )


def notes_from_frame(
    frame: Any,
    text_column: str = "text",
    label_columns: str | list[str] = "label",
    id_column: str | None = None,
    task: TaskType | None = None,
    source: dict[str, Any] | None = None,
) -> Notes:
    """Turn a DataFrame of notes into :class:`Notes` (a MIMIC-style export, or lab data).

    Args:
        frame: A pandas DataFrame.
        text_column: Column holding the note text; empty notes are dropped and counted.
        label_columns: One column (binary or multiclass: values become class names, sorted) or several
            0/1 columns (multilabel, one per label).
        id_column: Column of note ids; the row number when omitted.
        task: Forces ``binary``, ``multiclass`` or ``multilabel``; inferred when omitted.
        source: Provenance for the report (``file``, ``sha256``); errors name the file.

    Returns:
        The labelled notes.
    """
    source = dict(source or {})
    where = f"notes file {source['file']}" if source.get("file") else "the notes"
    columns = [label_columns] if isinstance(label_columns, str) else list(label_columns)
    wanted = [text_column, *columns] + ([id_column] if id_column else [])
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        raise NotesError(
            f"{where}: no column(s) {missing} (its columns: {list(frame.columns)}); set text_column / "
            "label_columns / id_column (data.options in a recipe) to the names in the file"
        )
    if len(frame) == 0:
        raise NotesError(f"{where}: no notes (a header and no rows); give one row per note")
    ids = frame[id_column].astype(str) if id_column else frame.index.to_series().astype(str)
    if ids.duplicated().any():
        raise NotesError(
            f"{where}: id column '{id_column or 'row index'}' repeats {int(ids.duplicated().sum())} ids"
        )
    text = frame[text_column].fillna("").astype(str)
    empty = (text.str.strip() == "").to_numpy()
    if empty.all():
        raise NotesError(
            f"{where}: no notes with text (column '{text_column}' is empty in all {len(frame)} rows); "
            "set text_column to the column of the note text"
        )
    unlabelled = frame[columns].isna().any(axis=1).to_numpy()
    if unlabelled[~empty].any():
        bad = ids[unlabelled & ~empty].tolist()[:5]
        raise NotesError(
            f"{where}: label column(s) {columns} are empty for note ids {bad}; fill or drop those rows"
        )
    keep = ~empty
    kept = frame.loc[keep]
    if len(columns) > 1 or task == "multilabel":
        values = kept[columns]
        if not values.isin([0, 1, True, False]).all().all():
            raise NotesError(f"{where}: multilabel columns {columns} must hold only 0/1 values")
        labels, names, task = values.to_numpy(np.int64), columns, "multilabel"
    else:
        labels, names, task = _label_column(kept[columns[0]], columns[0], task, where)
    counts = {"rows": len(frame), "empty_dropped": int(empty.sum()), "notes": int(keep.sum())}
    return Notes(ids[keep].tolist(), text[keep].tolist(), labels, task, names, counts, source)


def load_notes_file(path: str | Path, **kwargs: Any) -> Notes:
    """Read notes from a ``.csv(.gz)``, ``.jsonl`` or ``.parquet`` file; see :func:`notes_from_frame`.

    Raises:
        NotesError: The file is missing, of another kind, cut short, not UTF-8, empty or unparsable.
    """
    from pipelines.core.data import sha256_file

    path = Path(path).expanduser()
    if not path.is_file():
        raise NotesError(f"notes file {path} does not exist; give the path of a CSV, JSONL or Parquet file")
    frame = _read_frame(path)
    if path.name.lower().endswith(".csv") and len(frame) and _ends_mid_row(path, frame):
        raise NotesError(
            f"notes file {path} ends in the middle of a row (its last row lacks column "
            f"'{frame.columns[-1]}' and has no line end), so it looks cut short; copy the file again"
        )
    source = {"file": str(path), "sha256": sha256_file(path)}
    return notes_from_frame(frame, source=source, **kwargs)


def _read_frame(path: Path) -> Any:
    """The file as a DataFrame; every way it can fail to read becomes one NotesError naming it."""
    import pandas as pd

    name = path.name.lower()
    if not name.endswith((*_CSV, *_JSONL, ".parquet")):
        raise NotesError(f"notes file {path.name} is not .csv, .csv.gz, .jsonl or .parquet; convert it first")
    try:
        if name.endswith(_CSV):
            # No implicit index: pandas would make the text column the ids when the first row has one
            # field too many; the warning it gives instead (the extra field dropped) is an error here.
            with warnings.catch_warnings():
                warnings.simplefilter("error", pd.errors.ParserWarning)
                return pd.read_csv(path, encoding="utf-8", index_col=False)
        if name.endswith(_JSONL):
            return pd.read_json(path, lines=True, encoding="utf-8")
        return pd.read_parquet(path)
    except ImportError as error:
        raise NotesError(
            f"reading notes file {path.name} needs pyarrow; pip install pyarrow, or export CSV"
        ) from error
    except EOFError as error:
        raise NotesError(
            f"notes file {path} is cut short (its gzip stream ends before the end marker); copy it again"
        ) from error
    except gzip.BadGzipFile as error:
        raise NotesError(f"notes file {path} is not a gzip file although its name ends in .gz") from error
    except zlib.error as error:
        raise NotesError(
            f"notes file {path} is damaged (its gzip data does not decompress); copy it again"
        ) from error
    except UnicodeDecodeError as error:
        raise NotesError(
            f"notes file {path} is not UTF-8 text ({_first_bad_byte(path)}); re-save it as UTF-8 "
            "(e.g. `iconv -f latin1 -t utf-8`)"
        ) from error
    except pd.errors.EmptyDataError as error:
        raise NotesError(f"notes file {path} is empty; give a header row and one row per note") from error
    except (pd.errors.ParserError, pd.errors.ParserWarning, ValueError, OSError) as error:
        raise NotesError(
            f"notes file {path} cannot be read as {_kind(name)}{_place(error)} ({type(error).__name__}): "
            f"{_reason(name, error)}"
        ) from error


def _kind(name: str) -> str:
    return "CSV" if name.endswith(_CSV) else "JSON lines" if name.endswith(_JSONL) else "Parquet"


def _place(error: BaseException) -> str:
    """`` near line N`` from the parser's message (only the number: the message may quote the file)."""
    found = _PLACE.search(str(error))
    return f" near {found.group(1)} {found.group(2)}" if found else ""


def _reason(name: str, error: BaseException) -> str:
    if name.endswith(_CSV):
        if "EOF" in str(error):
            return "a quoted field never closes, so the file looks cut short; copy it again"
        return "a row has more fields than the header; fix that row or quote its text"
    if name.endswith(_JSONL):
        return "every line must be one JSON object; a file cut short ends in half an object"
    return "the file is damaged or cut short; copy it again"


def _first_bad_byte(path: Path) -> str:
    """Where the first byte that is not UTF-8 is, as ``offset N, line L`` of the (decompressed) file."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 1
    with opener(path, "rb") as handle:
        while chunk := _read(handle):
            held = decoder.getstate()[0]  # an incomplete sequence kept back from the last chunk
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as error:
                start = error.start - len(held)  # the error counts from the held bytes, then the chunk
                line = lines + chunk[: max(start, 0)].count(b"\n")
                return f"first invalid byte at offset {offset + start}, line {line}"
            offset += len(chunk)
            lines += chunk.count(b"\n")
    return "a byte sequence that is not UTF-8"


def _read(handle: Any) -> bytes:
    try:
        return handle.read(1 << 20)
    except (EOFError, OSError, zlib.error):  # a damaged gzip stream: report what was found before it
        return b""


def _ends_mid_row(path: Path, frame: Any) -> bool:
    """A plain CSV whose last byte is no line end and whose last row lacks its last column was cut."""
    with open(path, "rb") as handle:
        handle.seek(-1, 2)
        last = handle.read(1)
    return last not in (b"\n", b"\r") and bool(frame.iloc[-1].isna().iloc[-1])
