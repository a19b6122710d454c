"""Reading labelled examples from JSONL / JSON / CSV / Parquet files or a saved HF dataset.

Every problem with the user's data is a :class:`DataError` naming the file, the row (1-based) and
the field, and saying what was expected.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("clsgen_dist.data")

_SUFFIX_BUILDER = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


class DataError(ValueError):
    """A user error in the input data (reported without a traceback by the launchers)."""


@dataclass
class Example:
    id: str
    text: str
    label: int | None
    explanation: str | None = None


def _read_json_array(p: Path, text: str) -> list[dict]:
    """The objects of a ``.json`` file holding one array, parsed as strict JSON (a trailing comma,
    which the datasets reader lets through, is an error), or DataError naming the line or item."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}: could not read as json: line {e.lineno}: malformed JSON ({e.msg} at column "
                        f"{e.colno})") from None
    if not isinstance(items, list):
        raise DataError(f"{p}: could not read as json: expected one array of objects or one object per line")
    bad = next((i for i, x in enumerate(items) if not isinstance(x, dict)), None)
    if bad is not None:
        raise DataError(f"{p}: could not read as json: item {bad + 1} of the array: expected a JSON object, got "
                        f"{type(items[bad]).__name__}")
    return items


def _locate_bad_json_line(path: Path) -> str:
    """Where a JSON-lines ``.json`` file that the datasets reader refused goes wrong."""
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                return f"line {lineno}: malformed JSON ({e.msg} at column {e.colno})"
            if not isinstance(obj, dict):
                return f"line {lineno}: expected a JSON object, got {type(obj).__name__}"
    return "could not be parsed"


def _utf8_line(p: Path, lineno: int, raw: bytes) -> str:
    """One line of a text file, or DataError naming it if it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: line {lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                        f"{e.start + 1}); save the file as UTF-8") from None


def _check_utf8(p: Path) -> None:
    """DataError naming the first line that is not UTF-8 (text formats are read as UTF-8)."""
    with p.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            _utf8_line(p, lineno, raw)


def _read_csv(p: Path) -> list[dict]:
    """Rows of a UTF-8 CSV file with a header, every cell a string as written (no type guessing:
    an id "00123" stays "00123", a note "N/A" stays "N/A"); an empty cell is None (missing). Columns
    without a name (a pandas index written by ``to_csv``, a trailing comma) are ignored. Each row
    records the line it starts on (quoted fields may span lines)."""
    import csv

    limit = sys.maxsize  # no cap on a cell's length: long documents are what truncation is for
    while True:
        try:
            csv.field_size_limit(limit)
            break
        except OverflowError:
            limit //= 2
    rows: list[dict] = []
    header: list[str] | None = None
    with p.open("r", encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, strict=True)
        start = 1  # the line the next record starts on
        try:
            for rec in reader:
                line, start = start, reader.line_num + 1
                if not any(c.strip() for c in rec):  # a blank line
                    continue
                if header is None:
                    header = [h.strip() for h in rec]
                    dup = sorted({h for h in header if h and header.count(h) > 1})
                    if dup:
                        raise DataError(f"{p}: line {line}: the header row is not usable (column name {dup[0]!r} "
                                        f"appears twice)")
                    if not any(header):
                        raise DataError(f"{p}: line {line}: the header row names no column")
                elif len(rec) != len(header):
                    named = [h for h in header if h]
                    raise DataError(f"{p}: line {line}: {len(rec)} fields, expected {len(header)} as in the header "
                                    f"({', '.join(named)}); quote a field that contains a comma")
                else:
                    rows.append({**{h: (v if v != "" else None) for h, v in zip(header, rec) if h},
                                 "__row__": line})
        except csv.Error as e:
            if "unexpected end of data" in str(e):
                raise DataError(f"{p}: line {start}: a quoted field that starts here is never closed") from None
            raise DataError(f"{p}: line {reader.line_num}: not valid CSV ({e})") from None
    if header is None:
        raise DataError(f"{p}: no header row (the file holds only blank lines)")
    if not rows:
        raise DataError(f"{p}: the header ({', '.join(h for h in header if h)}) is followed by no data rows")
    return rows


def _datasets():
    """The ``datasets`` package, imported only for the formats it reads (a saved folder, JSON,
    Parquet): JSONL and CSV are parsed here, and need neither it nor its import time."""
    import datasets

    datasets.disable_progress_bars()
    return datasets


def load_records(path: str | Path) -> tuple[list[dict], str]:
    """Load every row of ``path`` as a dict. Returns (rows, row_word) where row_word says how rows
    are numbered in messages ("line" for JSONL and CSV: the file's line; "row" otherwise)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if p.is_dir():
        datasets = _datasets()
        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - any failure here is a user error about this folder
            raise DataError(f"{p}: not a dataset saved with datasets.save_to_disk ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if len(ds) != 1:
                raise DataError(f"{p}: a DatasetDict with splits {list(ds)}; point at one split's folder")
            ds = next(iter(ds.values()))
        return ds.to_list(), "row"
    builder = _SUFFIX_BUILDER.get(p.suffix.lower())
    if builder is None:
        raise DataError(f"{p}: unsupported file type {p.suffix!r}; expected one of "
                        f"{', '.join(sorted(_SUFFIX_BUILDER))} or a saved dataset folder")
    if p.stat().st_size == 0:
        raise DataError(f"{p}: the file is empty")
    if p.suffix.lower() == ".jsonl":
        # Parse JSONL ourselves: exact line numbers in errors (bad JSON or bad UTF-8), and no Arrow
        # schema inference surprises (e.g. a column that is null in the first rows).
        rows = []
        with p.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                line = _utf8_line(p, lineno, raw)
                if lineno == 1:
                    line = line.removeprefix("\ufeff")  # a byte-order mark is not part of line 1
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}: line {lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{p}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
                obj["__row__"] = lineno
                rows.append(obj)
        return rows, "line"
    if builder == "csv":
        _check_utf8(p)
        return _read_csv(p), "line"
    if builder == "json":
        _check_utf8(p)
        text = p.read_text(encoding="utf-8").removeprefix("\ufeff")
        if text.lstrip().startswith("["):  # one array: parsed here, its errors named by the document's line
            return _read_json_array(p, text), "row"
        # else JSON lines in a .json file: read by datasets, whose decode error names no line
    datasets = _datasets()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its ERROR lines would precede ours
    try:
        ds = datasets.load_dataset(builder, data_files=str(p), split="train", keep_in_memory=True)
    except Exception as e:  # noqa: BLE001
        detail = _locate_bad_json_line(p) if builder == "json" else (str(e).splitlines() or [repr(e)])[0][:300]
        raise DataError(f"{p}: could not read as {builder}: {detail}") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    return ds.to_list(), "row"


def parse_label(value: Any, label_names: Sequence[str]) -> int:
    """0/1 (int, bool, float, numeric string such as "1" or "1.0", "true"/"false") or one of
    ``label_names`` (case-insensitive)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    if isinstance(value, str):
        s = value.strip().lower()
        if s in ("0", "1", "0.0", "1.0"):
            return int(float(s))
        names = [n.strip().lower() for n in label_names]
        if s in names:
            return names.index(s)
        if s in ("false", "true"):  # a CSV cell written from a boolean column
            return int(s == "true")
    raise ValueError


def read_examples(
    path: str | Path,
    *,
    text_field: str = "text",
    label_field: str = "label",
    explanation_field: str | None = "explanation",
    id_field: str | None = "id",
    label_names: Sequence[str] = ("no", "yes"),
    require_label: bool = True,
    limit: int | None = None,
) -> list[Example]:
    """Read and validate examples (the first ``limit`` when given). Raises DataError naming file,
    row and field on bad input."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of examples, got {limit}")
    p = Path(path)
    rows, word = load_records(p)
    if not rows:
        raise DataError(f"{p}: the file has no rows")
    columns = set().union(*(r.keys() for r in rows[:100])) - {"__row__"}
    if text_field not in columns:
        raise DataError(f"{p}: missing field {text_field!r} (data.text_field); fields found: {sorted(columns)}")
    if require_label and label_field not in columns:
        raise DataError(f"{p}: missing field {label_field!r} (data.label_field); fields found: {sorted(columns)}")
    allowed = f"0, 1, {label_names[0]!r} or {label_names[1]!r}"
    out: list[Example] = []
    where_id: dict[str, list] = defaultdict(list)  # id -> the rows that have it
    for i, row in enumerate(rows):
        rowno = row.pop("__row__", i + 1)
        where = f"{p}: {word} {rowno}"
        text = row.get(text_field)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: field {text_field!r} must be a non-empty string, got {text!r:.80}")
        label = None
        if label_field in row and row[label_field] is not None:
            try:
                label = parse_label(row[label_field], label_names)
            except ValueError:
                raise DataError(f"{where}: field {label_field!r} = {row[label_field]!r:.80} is not a label; "
                                f"expected {allowed}") from None
        elif require_label:
            raise DataError(f"{where}: field {label_field!r} is missing; expected {allowed}")
        expl = row.get(explanation_field) if explanation_field else None
        if expl is not None and not isinstance(expl, str):
            raise DataError(f"{where}: field {explanation_field!r} must be a string or null, got {expl!r:.80}")
        expl = expl.strip() if isinstance(expl, str) and expl.strip() else None
        ex_id = row.get(id_field) if id_field else None
        out.append(Example(id=str(ex_id) if ex_id is not None else str(rowno), text=text, label=label,
                           explanation=expl))
        where_id[out[-1].id].append(rowno)
        if limit is not None and len(out) >= limit:
            break
    repeated = {k: v for k, v in where_id.items() if len(v) > 1}
    if repeated:
        k, rows_ = next(iter(repeated.items()))
        log.warning("%s: ids repeated: %d (e.g. %r at %ss %s); their predictions cannot be told apart by id: set "
                    "data.id_field to a unique column", p, len(repeated), k, word,
                    ", ".join(map(str, rows_[:3])))
    return out
