"""Reading, validating and writing a database folder.

A database folder holds one file per table, CSV or Parquet::

    customers.csv | customers.parquet          required
    transactions.csv | transactions.parquet    required
    products.csv | products.parquet            optional (without it, transactions need no product_id)
    segments.csv | segments.parquet            optional labels: customer_id, segment
    database.json                              optional: {"name", "segment_rule": "table"|"rfm", "schema"}

Every table is checked against its :class:`~service.data.schema.TableSchema` and coerced to one set of
dtypes, so everything downstream (graph builder, labels, serving) can rely on them:

- ID and FOREIGN_KEY columns: ``int64``, never null; primary keys unique; foreign keys name a row
  that exists; a row with a time column is not older than the row it references (a purchase does
  not precede its customer's signup), so the database cut at any time T is closed under references.
- TIME columns: ``datetime64[ns]``, naive, in UTC (CSV: ISO 8601 text; an offset is converted to UTC).
- NUMERIC columns: ``float64``, finite; ``amount``, ``quantity`` and ``price`` are >= 0.
- CATEGORICAL columns: pandas ``str``, never null.

Columns a file has beyond its schema are dropped (with a log line). Event tables (a time column and
no primary key, e.g. transactions) are sorted by time, stably, with a fresh 0..n-1 index.

Every problem raises :class:`DataError` naming the file, the column and the 1-based data row(s).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pandas as pd

from service.data.errors import MAX_KEPT_ROWS, MAX_LISTED_ROWS, DataError
from service.data.schema import ECOMMERCE_SCHEMA, Column, ColumnKind, Database, TableSchema

__all__ = [
    "FORMATS",
    "METADATA_FILE",
    "SEGMENTS_SCHEMA",
    "SEGMENT_RULES",
    "DataError",
    "coerce_table",
    "load_database",
    "save_database",
    "schemas_from_json",
    "schemas_to_json",
    "validate_segments",
    "validate_tables",
]

logger = logging.getLogger(__name__)

#: File formats a table may be stored in, in the order :func:`save_database` prefers them.
FORMATS = ("parquet", "csv")
#: The metadata file of a database folder.
METADATA_FILE = "database.json"
#: Values of ``Database.segment_rule``: labels from the segments table, or a rule over the label window.
SEGMENT_RULES = ("table", "rfm")
#: Tables every database has; the others in a schema are optional.
REQUIRED_TABLES = ("customers", "transactions")
#: Numeric columns that are counts or money and so cannot be negative.
NON_NEGATIVE_COLUMNS = frozenset({"amount", "quantity", "price"})
#: The optional label table. It is not a graph table (labels must never become features), so it lives
#: in ``Database.segments`` and not in ``Database.tables``.
SEGMENTS_SCHEMA = TableSchema(
    "segments",
    (
        Column("customer_id", ColumnKind.FOREIGN_KEY, references="customers"),
        Column("segment", ColumnKind.CATEGORICAL, description="class name, e.g. a persona"),
    ),
    "static segment labels, known for some customers only",
)

# The graph stores times as unsigned 32-bit seconds since 1970 (service.graph.temporal), so a time
# outside 1970-01-01..2106-02-07 cannot be used; say so at load time, naming file, column and row.
_TIME_MIN = pd.Timestamp("1970-01-01")
_TIME_MAX = pd.Timestamp("2106-02-07")

BoolArray = npt.NDArray[np.bool_]


# --------------------------------------------------------------------------------------------- loading


def load_database(path: Path, *, name: str | None = None) -> Database:
    """Loads and validates the database in folder ``path``.

    Args:
        path: the folder (layout in the module docstring).
        name: the database's name; default: ``name`` in ``database.json``, else the folder's name.

    Returns:
        The database, tables coerced to the dtypes of the module docstring and transactions sorted
        by timestamp. ``schemas`` is a copy of the folder's schema (``database.json``'s ``schema``,
        else :data:`~service.data.schema.ECOMMERCE_SCHEMA`) without the optional tables that are
        absent and without foreign-key columns to them.

    Raises:
        DataError: a required file is missing, or a file breaks the schema; the message names the
            file, the column and the 1-based data row(s).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(
            f"{folder}: no such folder (expected a database folder with customers and transactions tables)",
            file=str(folder),
        )
    meta_name, segment_rule, meta_schemas = _read_metadata(folder)
    schemas = dict(meta_schemas if meta_schemas is not None else ECOMMERCE_SCHEMA)
    _check_core_schema(schemas)

    files = {t: _find_table_file(folder, t, required=t in REQUIRED_TABLES) for t in schemas}
    present = {t for t, f in files.items() if f is not None}
    schemas = {t: s for t, s in schemas.items() if t in present}

    frames: dict[str, pd.DataFrame] = {}
    sources: dict[str, str] = {}
    for table in schemas:
        file = files[table]
        assert file is not None  # absent tables were dropped above
        frames[table] = _read_file(file)
        sources[table] = file.name
        schemas[table] = _fit_schema(schemas[table], frames[table].columns, present, file.name, folder)

    tables = validate_tables(schemas, frames, sources)

    segments = None
    segments_file = _find_table_file(folder, SEGMENTS_SCHEMA.name, required=False)
    if segments_file is not None:
        segments = validate_segments(
            _read_file(segments_file),
            tables["customers"],
            source=segments_file.name,
            customers_source=sources["customers"],
        )
    return Database(
        name=name or meta_name or folder.resolve().name,
        schemas=schemas,
        tables=tables,
        segments=segments,
        segment_rule=segment_rule,
    )


def validate_tables(
    schemas: Mapping[str, TableSchema],
    frames: Mapping[str, pd.DataFrame],
    sources: Mapping[str, str] | None = None,
) -> dict[str, pd.DataFrame]:
    """Checks raw tables against their schemas and coerces them; the core of :func:`load_database`.

    Also used by the CDNOW reader and by tests on in-memory tables.

    Args:
        schemas: table name -> schema; every table named here must be in ``frames``.
        frames: table name -> raw DataFrame (any dtypes that coerce; row i is data row i + 1).
        sources: table name -> the file name to put in error messages; default ``<table>``.

    Returns:
        table name -> a new DataFrame holding exactly the schema's columns, in schema order, with the
        dtypes of the module docstring; event tables sorted by time.

    Raises:
        DataError: a table or column is missing, or a value breaks the contract.
    """
    names = dict(sources or {})
    for table in schemas:
        names.setdefault(table, table)
        if table not in frames:
            raise DataError(f"{names[table]}: table '{table}' is missing", file=names[table])
    tables = {t: coerce_table(frames[t], schemas[t], names[t]) for t in schemas}
    for table, schema in schemas.items():
        if len(tables[table]) == 0 and table in REQUIRED_TABLES:
            raise DataError(f"{names[table]}: no rows", file=names[table])
        pk = schema.primary_key
        if pk is not None:
            _check_unique(tables[table][pk], names[table], pk, what="id")
    for table, schema in schemas.items():
        for col in schema.of_kind(ColumnKind.FOREIGN_KEY):
            _check_reference(tables, schemas, names, table, col)
    for table, schema in schemas.items():
        time = schema.time_column
        if time is not None and schema.primary_key is None:
            df = tables[table]
            if not df[time].is_monotonic_increasing:
                tables[table] = df.sort_values(time, kind="stable", ignore_index=True)
    return tables


def validate_segments(
    raw: pd.DataFrame,
    customers: pd.DataFrame,
    *,
    source: str = "segments",
    customers_source: str = "customers",
) -> pd.DataFrame:
    """Checks a segments label table: one row per labelled customer, every customer known.

    Args:
        raw: the raw table with ``customer_id`` and ``segment``.
        customers: the validated customers table.
        source: file name for error messages.
        customers_source: the customers file name for error messages.

    Returns:
        ``customer_id`` (int64) and ``segment`` (str), in file order.

    Raises:
        DataError: a missing column or value, a customer listed twice, or an unknown customer.
    """
    seg = coerce_table(raw, SEGMENTS_SCHEMA, source)
    _check_unique(seg["customer_id"], source, "customer_id", what="customer")
    known = pd.Index(customers["customer_id"]).get_indexer(seg["customer_id"]) >= 0
    _fail_where(
        ~known,
        seg["customer_id"],
        source,
        "customer_id",
        lambda v: f"{v} not found in column 'customer_id' of {customers_source}",
    )
    return seg


# --------------------------------------------------------------------------------------------- saving


def save_database(db: Database, path: Path, fmt: Literal["parquet", "csv"] = "parquet") -> Path:
    """Writes ``db`` as a database folder that :func:`load_database` reads back equal.

    Table files of either format from an earlier save into the same folder are removed first, so the
    folder holds exactly this database (a stale ``products.csv`` would otherwise be loaded with it).
    ``database.json`` records the name, the segment rule and the full schema, so a database with its
    own schema (CDNOW) round-trips too.

    Args:
        db: the database.
        path: the folder; created if missing.
        fmt: ``"parquet"`` (compact, keeps dtypes) or ``"csv"`` (ISO 8601 times, full float precision).

    Returns:
        The folder.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    stale = set(db.tables) | set(ECOMMERCE_SCHEMA) | {SEGMENTS_SCHEMA.name}
    for table in stale:
        for ext in FORMATS:
            (folder / f"{table}.{ext}").unlink(missing_ok=True)
    frames = dict(db.tables)
    if db.segments is not None:
        frames[SEGMENTS_SCHEMA.name] = db.segments
    for table, df in frames.items():
        file = folder / f"{table}.{fmt}"
        if fmt == "parquet":
            df.to_parquet(file, index=False)
        else:
            df.to_csv(file, index=False)
    meta = {"name": db.name, "segment_rule": db.segment_rule, "schema": schemas_to_json(db.schemas)}
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def schemas_to_json(schemas: Mapping[str, TableSchema]) -> list[dict[str, Any]]:
    """The schemas as JSON-ready data (the ``schema`` entry of ``database.json``)."""
    return [
        {
            "name": s.name,
            "description": s.description,
            "columns": [
                {
                    "name": c.name,
                    "kind": c.kind.value,
                    "references": c.references,
                    "description": c.description,
                }
                for c in s.columns
            ],
        }
        for s in schemas.values()
    ]


def schemas_from_json(data: Any, source: str = METADATA_FILE) -> dict[str, TableSchema]:
    """Parses :func:`schemas_to_json` output back into schemas.

    Raises:
        DataError: the data is not a list of tables with typed columns (names ``source``).
    """
    try:
        schemas: dict[str, TableSchema] = {}
        for t in data:
            columns = tuple(
                Column(
                    str(c["name"]),
                    ColumnKind(c["kind"]),
                    references=None if c.get("references") is None else str(c["references"]),
                    description=str(c.get("description", "")),
                )
                for c in t["columns"]
            )
            schemas[str(t["name"])] = TableSchema(str(t["name"]), columns, str(t.get("description", "")))
    except (TypeError, KeyError, ValueError, AttributeError) as e:
        raise DataError(f"{source}: 'schema' is not a list of tables with columns ({e!r})", file=source) from e
    return schemas


# ---------------------------------------------------------------------------------------------- files


def _read_metadata(folder: Path) -> tuple[str | None, str, dict[str, TableSchema] | None]:
    file = folder / METADATA_FILE
    if not file.exists():
        return None, "table", None
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{METADATA_FILE}: cannot read it as JSON ({e})", file=METADATA_FILE) from e
    if not isinstance(meta, dict):
        raise DataError(f"{METADATA_FILE}: expected a JSON object", file=METADATA_FILE)
    name = meta.get("name")
    if name is not None and not isinstance(name, str):
        raise DataError(f"{METADATA_FILE}: 'name' must be a string, got {name!r}", file=METADATA_FILE)
    rule = meta.get("segment_rule", "table")
    if rule not in SEGMENT_RULES:
        raise DataError(
            f"{METADATA_FILE}: 'segment_rule' must be one of {', '.join(SEGMENT_RULES)}, got {rule!r}",
            file=METADATA_FILE,
        )
    schemas = schemas_from_json(meta["schema"]) if "schema" in meta else None
    return name, str(rule), schemas


def _check_core_schema(schemas: Mapping[str, TableSchema]) -> None:
    """Labels and the graph rely on these names; a schema from database.json must keep them."""
    need = {
        "customers": {"customer_id": ColumnKind.ID, "signup_time": ColumnKind.TIME},
        "transactions": {
            "customer_id": ColumnKind.FOREIGN_KEY,
            "timestamp": ColumnKind.TIME,
            "amount": ColumnKind.NUMERIC,
        },
    }
    if SEGMENTS_SCHEMA.name in schemas:
        raise DataError(
            f"{METADATA_FILE}: 'segments' is the label table and cannot be a graph table", file=METADATA_FILE
        )
    for table, columns in need.items():
        if table not in schemas:
            raise DataError(f"{METADATA_FILE}: the schema has no '{table}' table", file=METADATA_FILE)
        kinds = {c.name: c.kind for c in schemas[table].columns}
        for col, kind in columns.items():
            if kinds.get(col) is not kind:
                raise DataError(
                    f"{METADATA_FILE}: table '{table}' needs column '{col}' of kind {kind.value}",
                    file=METADATA_FILE,
                    column=col,
                )


def _find_table_file(folder: Path, table: str, *, required: bool) -> Path | None:
    found = [folder / f"{table}.{ext}" for ext in FORMATS if (folder / f"{table}.{ext}").is_file()]
    if len(found) > 1:
        # Guessing which one is current could silently load stale data.
        raise DataError(
            f"{table}.parquet and {table}.csv both exist in folder {folder}; keep one",
            file=f"{table}.parquet",
        )
    if not found:
        if required:
            raise DataError(f"{table}.csv (or {table}.parquet): not found in folder {folder}", file=f"{table}.csv")
        return None
    return found[0]


def _read_file(file: Path) -> pd.DataFrame:
    try:
        if file.suffix == ".parquet":
            return pd.read_parquet(file)
        # Everything is read as text and coerced per column kind: the raw text is what an error
        # message should quote, and pandas' default NA words would turn region "NA" into a null.
        return pd.read_csv(file, dtype=str, keep_default_na=False, na_values=[""], engine="pyarrow")
    except (OSError, ValueError) as e:  # pandas' ParserError and pyarrow's ArrowInvalid are ValueErrors
        raise DataError(f"{file.name}: cannot read the file ({e})", file=file.name) from e


def _fit_schema(
    schema: TableSchema, file_columns: pd.Index, present: set[str], source: str, folder: Path
) -> TableSchema:
    """Drops foreign keys to absent optional tables (transactions without products)."""
    keep = []
    for col in schema.columns:
        if col.kind is ColumnKind.FOREIGN_KEY and col.references not in present:
            if col.name in file_columns:
                raise DataError(
                    f"{source}: column '{col.name}' references table '{col.references}', but "
                    f"{col.references}.csv (or .parquet) is not in folder {folder}",
                    file=source,
                    column=col.name,
                )
            continue
        keep.append(col)
    return replace(schema, columns=tuple(keep))


# --------------------------------------------------------------------------------------------- checks


def coerce_table(raw: pd.DataFrame, schema: TableSchema, source: str) -> pd.DataFrame:
    """Checks one table's columns and coerces them (no cross-table checks; see :func:`validate_tables`).

    Args:
        raw: the raw table; row i is data row i + 1 in error messages.
        schema: its schema; columns beyond it are dropped.
        source: the file name for error messages.

    Returns:
        A new DataFrame with exactly the schema's columns, in schema order, dtypes as in the module
        docstring, and a 0..n-1 index.

    Raises:
        DataError: a column is missing, or a value is missing or does not coerce.
    """
    missing = [c.name for c in schema.columns if c.name not in raw.columns]
    if missing:
        have = ", ".join(f"'{c}'" for c in raw.columns)
        raise DataError(
            f"{source}: column '{missing[0]}': missing (the file has {have or 'no columns'})",
            file=source,
            column=missing[0],
        )
    extra = [str(c) for c in raw.columns if c not in {c.name for c in schema.columns}]
    if extra:
        logger.info("%s: ignoring columns not in the schema: %s", source, ", ".join(extra))
    raw = raw.reset_index(drop=True)  # row numbers are positions; a caller's index must not shift them
    return pd.DataFrame({c.name: _coerce_column(raw[c.name], c, source) for c in schema.columns})


def _coerce_column(s: pd.Series, column: Column, source: str) -> pd.Series:
    name = column.name
    _fail_where(s.isna().to_numpy(), s, source, name, lambda _v: "missing value")
    kind = column.kind
    if kind in (ColumnKind.ID, ColumnKind.FOREIGN_KEY):
        return _to_int64(s, source, name)
    if kind is ColumnKind.NUMERIC:
        return _to_float64(s, source, name)
    if kind is ColumnKind.TIME:
        return _to_datetime_ns(s, source, name)
    return s.astype("str")


def _to_int64(s: pd.Series, source: str, name: str) -> pd.Series:
    if pd.api.types.is_integer_dtype(s.dtype):
        return s.astype("int64")
    num = s if pd.api.types.is_float_dtype(s.dtype) else pd.to_numeric(s, errors="coerce")
    bad = num.isna().to_numpy()
    if not pd.api.types.is_integer_dtype(num.dtype):
        v = num.to_numpy(dtype="float64", na_value=np.nan)
        with np.errstate(invalid="ignore"):
            bad = bad | ~np.isfinite(v) | (v != np.floor(v)) | (np.abs(v) >= 2.0**63)
    _fail_where(bad, s, source, name, lambda v: f"expected an integer id, got {v}")
    return num.astype("int64")


def _to_float64(s: pd.Series, source: str, name: str) -> pd.Series:
    if pd.api.types.is_numeric_dtype(s.dtype):
        num = s.astype("float64")
    else:
        num = pd.to_numeric(s, errors="coerce")
        _fail_where(num.isna().to_numpy(), s, source, name, lambda v: f"expected a number, got {v}")
        num = num.astype("float64")
    v = num.to_numpy()
    _fail_where(~np.isfinite(v), num, source, name, lambda x: f"expected a finite number, got {x}")
    if name in NON_NEGATIVE_COLUMNS:
        _fail_where(v < 0, num, source, name, lambda x: f"expected a number >= 0, got {x}")
    return num


def _to_datetime_ns(s: pd.Series, source: str, name: str) -> pd.Series:
    if isinstance(s.dtype, pd.DatetimeTZDtype):
        t = s.dt.tz_convert("UTC").dt.tz_localize(None)
    elif pd.api.types.is_datetime64_dtype(s.dtype):
        t = s
    elif pd.api.types.is_numeric_dtype(s.dtype):
        # A number has no unit we could trust (epoch seconds? 19970101?); refuse rather than guess.
        raise _error(np.ones(len(s), dtype=bool), s, source, name, lambda v: f"expected an ISO 8601 date/time, got {v}")
    else:
        t = pd.to_datetime(s, format="ISO8601", utc=True, errors="coerce")
        _fail_where(t.isna().to_numpy(), s, source, name, lambda v: f"expected an ISO 8601 date/time, got {v}")
        t = t.dt.tz_localize(None)
    out = ((t < _TIME_MIN) | (t > _TIME_MAX)).to_numpy()
    _fail_where(out, s, source, name, lambda v: f"time outside 1970-01-01..2106-02-07, got {v}")
    return t.astype("datetime64[ns]")


def _check_unique(s: pd.Series, source: str, name: str, *, what: str) -> None:
    dup = s.duplicated(keep="first").to_numpy()
    if not dup.any():
        return
    values = s.to_numpy()
    first = values[dup][0]
    first_row = int(np.flatnonzero(values == first)[0]) + 1
    if dup.sum() == 1:
        raise _error(dup, s, source, name, lambda v: f"duplicate {what} {v} (already at row {first_row})")
    raise _error(dup, s, source, name, lambda v: f"duplicate {what}s {v} ({first} already at row {first_row})")


def _check_reference(
    tables: Mapping[str, pd.DataFrame],
    schemas: Mapping[str, TableSchema],
    names: Mapping[str, str],
    table: str,
    col: Column,
) -> None:
    ref = col.references
    source = names[table]
    if ref is None or ref not in schemas or schemas[ref].primary_key is None:
        raise DataError(
            f"{source}: column '{col.name}' references '{ref}', which is not a table with a primary key in the schema",
            file=source,
            column=col.name,
        )
    pk = schemas[ref].primary_key
    assert pk is not None
    child, parent = tables[table], tables[ref]
    pos = pd.Index(parent[pk]).get_indexer(child[col.name])
    _fail_where(
        pos < 0,
        child[col.name],
        source,
        col.name,
        lambda v: f"{v} not found in column '{pk}' of {names[ref]}",
    )

    child_time, parent_time = schemas[table].time_column, schemas[ref].time_column
    if child_time is None or parent_time is None:
        return
    ct = child[child_time].to_numpy()
    pt = parent[parent_time].to_numpy()[pos]
    early = ct < pt
    if early.any():
        i = int(np.flatnonzero(early)[0])
        detail = (
            f"{child_time} {pd.Timestamp(ct[i])} is before the {parent_time} {pd.Timestamp(pt[i])} of "
            f"{col.name} {child[col.name].iat[i]} in {names[ref]} (first listed row)"
        )
        raise _error(early, child[child_time], source, child_time, lambda _v: detail)


def _fail_where(mask: BoolArray, values: pd.Series, source: str, column: str, problem: Callable[[str], str]) -> None:
    """Raises :func:`_error` if any row is flagged in ``mask``."""
    if mask.any():
        raise _error(mask, values, source, column, problem)


def _error(mask: BoolArray, values: pd.Series, source: str, column: str, problem: Callable[[str], str]) -> DataError:
    """The DataError for the rows flagged in ``mask``; ``problem`` words it from the listed values."""
    rows = np.flatnonzero(mask)
    shown = values.iloc[rows[:MAX_LISTED_ROWS]].tolist()
    text = ", ".join(_show(v) for v in shown)
    return DataError.at(source, column, (rows[:MAX_KEPT_ROWS] + 1).tolist(), problem(text), num_rows=len(rows))


def _show(value: object) -> str:
    if isinstance(value, str):
        return repr(str(value))  # str() first: numpy 2 reprs np.str_ as "np.str_('x')"
    if isinstance(value, (float, np.floating)) and np.isnan(value):
        return "NaN"
    return str(value)
