"""Item metadata as Labelbox metadata fields: names resolve to schema ids through the
organisation's metadata ontology (reserved fields such as `tag`, `split`,
`captureDateTime` first, then custom ones); a missing name is created as a custom
field (numbers as number fields, everything else as text). Values are encoded as
labelbox-python's DataRowMetadataOntology.parse_upsert_metadata does, date-times in
whole seconds (`%Y-%m-%dT%H:%M:%SZ`, labelbox.utils.format_iso_datetime).

A metadata-only change replaces the row's fields in place: the fields the item no
longer has are deleted, then the others upserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog

from ingestd.core.errors import PermanentError
from ingestd.sinks.labelbox import graphql as gq

log = structlog.get_logger("ingestd.sinks")

KIND_STRING = "CustomMetadataString"
KIND_NUMBER = "CustomMetadataNumber"
KIND_DATETIME = "CustomMetadataDateTime"
KIND_ENUM = "CustomMetadataEnum"
NAME_MAX = 100  # metadata schema names (SDK: 1..100 characters)
STRING_MAX = 4096  # string metadata values (SDK)
DATETIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # labelbox.utils.ISO_DATETIME_FORMAT


@dataclass(slots=True)
class Schema:
    id: str
    name: str
    kind: str
    reserved: bool
    options: dict[str, str] = field(default_factory=dict)  # option name -> option id


def _parse_schema(s: Mapping[str, Any]) -> Schema:
    options = {str(o["name"]): str(o["id"]) for o in s.get("options") or []}
    return Schema(str(s["id"]), str(s["name"]), str(s["kind"]), bool(s.get("reserved")), options)


class Ontology:
    """The organisation's metadata schemas, loaded once and again when a name is
    missing (another process may have created it); missing names are created. One
    lock: concurrent items that introduce the same key create it once."""

    def __init__(self, gql: gq.Gql) -> None:
        self._gql = gql
        self.reserved: dict[str, Schema] = {}
        self.custom: dict[str, Schema] = {}
        self.loaded = False
        self._lock = asyncio.Lock()

    async def load(self) -> None:
        data = await self._gql(gq.Q_ONTOLOGY, {}, "reading the metadata schemas")
        reserved: dict[str, Schema] = {}
        custom: dict[str, Schema] = {}
        for s in data.get("customMetadataOntology") or []:
            schema = _parse_schema(s)
            (reserved if schema.reserved else custom)[schema.name] = schema
        self.reserved, self.custom, self.loaded = reserved, custom, True

    def find(self, name: str) -> Schema | None:
        return self.reserved.get(name) or self.custom.get(name)  # reserved names win (SDK)

    async def schema(self, name: str, value: Any, where: str) -> Schema:
        async with self._lock:
            if not self.loaded:
                await self.load()
            schema = self.find(name)
            if schema is None:
                await self.load()
                schema = self.find(name)
            return schema if schema is not None else await self._create(name, value, where)

    async def _create(self, name: str, value: Any, where: str) -> Schema:
        kind = KIND_NUMBER if _is_number(value) else KIND_STRING
        try:
            data = await self._gql(
                gq.M_UPSERT_SCHEMA,
                {"data": {"name": name, "kind": kind}},
                f"creating metadata field {name!r}",
            )
        except PermanentError as e:
            await self.load()
            schema = self.find(name)
            if schema is not None:  # created by someone else in between
                return schema
            raise PermanentError(
                f"{where}: metadata key {name!r} is not a metadata field in Labelbox and "
                f"creating it failed ({e.reason}); create it in Labelbox's metadata "
                "schema, or leave the key out (each plan has a limit on custom fields)"
            ) from None
        schema = _parse_schema(data["upsertCustomMetadataSchema"])
        self.custom[schema.name] = schema
        log.info("created a metadata field in Labelbox", field=name, kind=kind)
        return schema

    async def fields(self, metadata: Mapping[str, Any], where: str) -> list[dict[str, Any]]:
        """The item's metadata as `metadata_fields` entries."""
        out: list[dict[str, Any]] = []
        for name, value in metadata.items():
            if value is None:
                continue
            if not name.strip() or len(name.strip()) > NAME_MAX:
                raise PermanentError(
                    f"{where}: metadata key {name[:120]!r} cannot be a Labelbox metadata "
                    f"field name (1 to {NAME_MAX} characters); rename it"
                )
            schema = await self.schema(name.strip(), value, where)
            out.extend(encode(schema, value, where))
        return out


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if _is_number(value):
        return str(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _number(schema: Schema, value: Any, where: str) -> float:
    number: float | None = float(value) if _is_number(value) else None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
    if number is None or number != number or number in (float("inf"), float("-inf")):
        raise PermanentError(
            f"{where}: metadata {schema.name!r} is a number field in Labelbox but this item "
            f"has {_as_text(value)[:80]!r}; make the value a number or use another key"
        )
    return number


def _datetime(schema: Schema, value: Any, where: str) -> str:
    when = None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if when is None:
        raise PermanentError(
            f"{where}: metadata {schema.name!r} is a date-time field in Labelbox but this "
            f"item has {_as_text(value)[:80]!r}; use an ISO 8601 time such as "
            "2024-05-01T12:00:00Z"
        )
    if when.tzinfo is None:  # the SDK reads a time without offset as UTC
        when = when.replace(tzinfo=UTC)
    return when.astimezone(UTC).strftime(DATETIME_FORMAT)


def encode(schema: Schema, value: Any, where: str) -> list[dict[str, Any]]:
    """`value` as the metadata field entries Labelbox takes for this schema kind."""
    name = schema.name
    if schema.kind == KIND_STRING:
        text = _as_text(value)
        if len(text) > STRING_MAX:
            raise PermanentError(
                f"{where}: metadata {name!r} is {len(text)} characters long; Labelbox "
                f"text fields hold at most {STRING_MAX}"
            )
        return [{"schemaId": schema.id, "value": text}]
    if schema.kind == KIND_NUMBER:
        return [{"schemaId": schema.id, "value": _number(schema, value, where)}]
    if schema.kind == KIND_DATETIME:
        return [{"schemaId": schema.id, "value": _datetime(schema, value, where)}]
    if schema.kind == KIND_ENUM:
        option = schema.options.get(_as_text(value))
        if option is None:
            choices = ", ".join(sorted(schema.options)[:10]) or "none"
            raise PermanentError(
                f"{where}: metadata {name!r} is a choice field in Labelbox and "
                f"{_as_text(value)[:80]!r} is not one of its options ({choices})"
            )
        # The SDK's enum upsert: the field itself and the chosen option.
        return [{"schemaId": schema.id, "value": {}}, {"schemaId": option, "value": {}}]
    raise PermanentError(
        f"{where}: metadata {name!r} is a {schema.kind} field in Labelbox, which ingestd "
        "cannot fill; rename the key"
    )


class RowMissing(Exception):
    """A metadata update found no row for the key: the whole item must be put."""


def _first_error(answer: Any) -> str | None:
    for r in answer or []:
        if isinstance(r, dict) and r.get("error"):
            return str(r["error"])
    return None


async def replace_fields(gql: gq.Gql, gk: str, key: str, new: list[dict[str, Any]]) -> None:
    """Make the row's metadata exactly `new`: read what it holds, delete the fields the
    item no longer has, upsert the rest. RowMissing when there is no row."""
    ident = {"ids": [gk], "idType": "GKEY"}
    data = await gql(gq.Q_ROW_METADATA, {"dataRowIdentifiers": ident}, "reading row metadata")
    rows = [r for r in data.get("dataRowCustomMetadata") or [] if r.get("globalKey") == gk]
    if not rows:
        raise RowMissing(key)
    stale = {str(f["schemaId"]) for f in rows[0].get("fields") or []} - {
        str(f["schemaId"]) for f in new
    }
    if stale:
        deletes = [{"dataRowIdentifier": {"id": gk, "idType": "GKEY"}, "schemaIds": sorted(stale)}]
        data = await gql(gq.M_DELETE_METADATA, {"deletes": deletes}, "deleting metadata")
        if (error := _first_error(data.get("deleteDataRowCustomMetadata"))) is not None:
            raise PermanentError(f"Labelbox refused the metadata of {key}: {error}")
    if new:
        upserts = [{"globalKey": gk, "fields": new}]
        data = await gql(gq.M_UPSERT_METADATA, {"metadata": upserts}, "updating metadata")
        if (error := _first_error(data.get("upsertDataRowCustomMetadata"))) is not None:
            raise PermanentError(f"Labelbox refused the metadata of {key}: {error}")
