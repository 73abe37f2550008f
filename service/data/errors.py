"""The one error of the data layer: a database that cannot be used as it is."""

from __future__ import annotations

from collections.abc import Sequence

#: How many offending rows (and values) a message lists before it says "and N more".
MAX_LISTED_ROWS = 5
#: How many offending rows the error keeps in ``rows``; a column of ten million bad values must not
#: turn into ten million Python ints.
MAX_KEPT_ROWS = 1000


class DataError(ValueError):
    """A table file, column or row breaks the schema contract: a problem with the input data, not a bug.

    The message names the file, the column and the 1-based data row(s), e.g.
    ``transactions.csv: column 'amount', row 17: expected a number, got 'abc'``. Row 1 is the first
    data row (the line after a CSV's header; the first row of a Parquet file). The same facts are
    kept as attributes so callers and tests need not parse the message.

    Attributes:
        file: the file (or table) name the problem is in, if any.
        column: the column, if the problem is in one.
        rows: the first 1-based data rows found wrong (up to :data:`MAX_KEPT_ROWS`).
        num_rows: how many rows were found wrong in all.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        column: str | None = None,
        rows: Sequence[int] = (),
        num_rows: int | None = None,
    ) -> None:
        super().__init__(message)
        self.file = file
        self.column = column
        self.rows: tuple[int, ...] = tuple(int(r) for r in rows[:MAX_KEPT_ROWS])
        self.num_rows = len(rows) if num_rows is None else num_rows

    @classmethod
    def at(
        cls, file: str, column: str | None, rows: Sequence[int], problem: str, *, num_rows: int | None = None
    ) -> DataError:
        """Builds the error for ``problem`` at ``rows`` (1-based) of ``column`` in ``file``.

        Args:
            file: file name, e.g. ``transactions.csv``.
            column: column name, or None for a problem with the whole file.
            rows: the offending 1-based data rows, in order (at least the first few).
            problem: what is wrong, e.g. ``expected a number, got 'abc'``.
            num_rows: how many rows are wrong in all, when ``rows`` holds only the first ones.
        """
        total = len(rows) if num_rows is None else num_rows
        where = file
        if column is not None:
            where += f": column '{column}'"
        if total == 1:
            where += f", row {rows[0]}"
        elif total > 1:
            listed = ", ".join(str(r) for r in rows[:MAX_LISTED_ROWS])
            more = total - min(len(rows), MAX_LISTED_ROWS)
            where += f", rows {listed}" + (f" and {more} more" if more > 0 else "")
        return cls(f"{where}: {problem}", file=file, column=column, rows=rows, num_rows=total)
