"""SQL identifiers a pipeline file may name: plain words that no statement needs to quote.

Table and column names are interpolated into SQL text (placeholders cannot stand for them), so
they are refused unless they are plain identifiers and not a keyword that SQLite refuses as an
unquoted name: ``order`` or ``select`` would break every statement the sink writes. The list is
the keywords that fail in SQLite's CREATE TABLE, CREATE INDEX, INSERT, SELECT and DELETE as
table or column names (found by trying each of SQLite's keywords); ``key``, ``user`` or
``value`` work and stay allowed.
"""

from __future__ import annotations

__all__ = ["SQL_KEYWORDS"]

_WORDS = """
add all alter and as autoincrement between case cast check collate commit constraint create
current_date current_time current_timestamp default deferrable delete distinct drop else escape
except exists foreign from group having if in index insert intersect into is isnull join limit
not notnull null on or order primary raise references returning select set table then to
transaction union unique update using values when where
"""

#: Lower-case keywords SQLite cannot take as an unquoted table or column name.
SQL_KEYWORDS = frozenset(_WORDS.split())
