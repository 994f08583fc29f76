"""Metadata-context option data: parsing `NBD_OPT_LIST/SET_META_CONTEXT` and matching queries.

A query is ``namespace:leaf``.  For LIST an empty leaf (``base:``) is a
wildcard over the namespace and no query at all lists everything; SET takes
exact names only (proto.md: ``base:`` "MUST be ignored" there).  Queries of
a namespace the export does not offer are ignored, not errors.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from .constants import NBD_MAX_STRING

_U32 = struct.Struct(">I")
MAX_QUERIES = 64  # more than any client sends; bounds the work per option


class BadMetaRequest(ValueError):
    """The option data is malformed; the message goes into NBD_REP_ERR_INVALID."""


def parse(data: bytes) -> tuple[bytes, list[str]]:
    """Split option data into (raw export name, queries); raise `BadMetaRequest` when malformed."""
    pos = 0

    def take_string(what: str) -> bytes:
        nonlocal pos
        if pos + 4 > len(data):
            raise BadMetaRequest(f"{what} length missing")
        (n,) = _U32.unpack_from(data, pos)
        pos += 4
        if n > NBD_MAX_STRING or pos + n > len(data):
            raise BadMetaRequest(f"{what} length {n} runs past the option")
        raw = data[pos : pos + n]
        pos += n
        return raw

    name = take_string("export name")
    if pos + 4 > len(data):
        raise BadMetaRequest("query count missing")
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    if count > MAX_QUERIES:
        raise BadMetaRequest(f"{count} queries; at most {MAX_QUERIES} are accepted")
    queries: list[str] = []
    for _ in range(count):
        raw = take_string("query")
        try:
            query = raw.decode()
        except UnicodeDecodeError:
            raise BadMetaRequest("query is not UTF-8") from None
        if ":" not in query:
            raise BadMetaRequest(f"query {query!r} has no namespace (expected namespace:name)")
        queries.append(query)
    if pos != len(data):
        raise BadMetaRequest(f"{len(data) - pos} bytes after the last query")
    return name, queries


def for_list(available: Sequence[str], queries: Sequence[str]) -> list[str]:
    """The contexts LIST_META_CONTEXT answers with, in the export's order."""
    if not queries:
        return list(available)
    wanted = set()
    for query in queries:
        namespace, _, leaf = query.partition(":")
        for name in available:
            if name == query or (not leaf and name.startswith(namespace + ":")):
                wanted.add(name)
    return [name for name in available if name in wanted]


def for_set(available: Sequence[str], queries: Sequence[str]) -> list[str]:
    """The contexts SET_META_CONTEXT selects: exact names only, each once."""
    asked = set(queries)
    return [name for name in available if name in asked]


def context_id(available: Sequence[str], name: str) -> int:
    """A context's id: its place in the export's list, from 1 (ids are per connection anyway)."""
    return available.index(name) + 1
