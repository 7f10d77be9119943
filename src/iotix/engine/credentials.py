"""Per-device credentials from a CSV file.

The file has a header row naming ``username`` and ``password`` (either may be left
out: that part is not sent), and optionally ``device_id``: then each device takes the
row of its id; without it, row N (after the header) is device N. Values are taken as
written, without templates. A worker reads the file itself and keeps only its shard's
rows, so a large table is never copied to every process.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import TYPE_CHECKING

from iotix.errors import IotixError

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

__all__ = ["CREDENTIALS_HINT", "Credentials", "CredentialsError", "read_credentials"]

CREDENTIALS_HINT = "a CSV file with a header row: device_id,username,password (device_id optional)"


class CredentialsError(IotixError):
    """A credentials file is missing or malformed."""


@dataclass(frozen=True)
class Credentials:
    """A credentials table: rows in file order, and an index by device id if the file
    has a ``device_id`` column."""

    rows: list[tuple[str | None, str | None]]
    by_id: dict[str, int] | None

    def for_device(self, device_id: str, index: int) -> tuple[str | None, str | None] | None:
        """(username, password) of a device; None when the file has no row for it."""
        if self.by_id is not None:
            row = self.by_id.get(device_id)
            return None if row is None else self.rows[row]
        return self.rows[index] if index < len(self.rows) else None


def read_credentials(path: Path, *, keep: Sequence[int] | None = None) -> Credentials:
    """Read ``path``; with ``keep`` (device indices) and no ``device_id`` column, only
    those rows are kept in memory (the others are still counted)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            columns = {name: i for i, name in enumerate(header)}
            if not header or not ({"username", "password"} & set(columns)):
                raise CredentialsError(
                    f"{path}: the first row must name the columns, with username and/or "
                    f"password; it is {','.join(header) or 'empty'}"
                )
            user, secret, ident = (columns.get(k) for k in ("username", "password", "device_id"))
            wanted = None if keep is None or ident is not None else set(keep)
            rows: list[tuple[str | None, str | None]] = []
            by_id: dict[str, int] | None = {} if ident is not None else None
            for number, record in enumerate(reader):
                if wanted is not None and number not in wanted:
                    rows.append((None, None))
                    continue
                if len(record) != len(header):
                    raise CredentialsError(
                        f"{path}, line {number + 2}: {len(record)} values for {len(header)} columns"
                    )
                if by_id is not None and ident is not None:
                    by_id[record[ident]] = len(rows)
                rows.append(
                    (
                        None if user is None else record[user],
                        None if secret is None else record[secret],
                    )
                )
    except OSError as exc:
        raise CredentialsError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CredentialsError(f"{path} is not a readable CSV file: {exc}") from None
    return Credentials(rows, by_id)
