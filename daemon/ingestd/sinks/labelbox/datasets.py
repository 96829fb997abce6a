"""Labelbox datasets by name: found (the oldest wins if several share the name) or
created as labelbox-python's `Client.create_dataset` creates them: the organisation's
default delegated-access (IAM) integration attached (`setSignerForDataset`) and the
dataset validated, deleted again if validation fails. Private bucket objects
(`transfer: register`) are readable by Labelbox only through such an integration."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import structlog

from ingestd.core.errors import PermanentError, SyncError
from ingestd.core.model import FilePayload
from ingestd.sinks.labelbox import graphql as gq

log = structlog.get_logger("ingestd.sinks")


@dataclass(frozen=True, slots=True)
class Dataset:
    id: str
    name: str
    signer: str | None  # the delegated-access integration attached to it, if any


async def find_or_create(gql: gq.Gql, name: str) -> Dataset:
    what = f"looking up dataset {name!r}"
    variables = {"name": name, "deleted": False}
    integrations: list[dict[str, Any]] | None
    try:
        data = await gql(gq.Q_DATASETS_IAM, variables, what)
        integrations = list(data.get("iamIntegrations") or [])
    except gq.LabelboxRefused as e:
        if e.code != "AUTHORIZATION_ERROR":
            raise
        # A key that may not read the integrations: local files do not need one, and
        # registered objects then fail with NoIntegration.
        data = await gql(gq.Q_DATASETS, variables, what)
        integrations = None
    found = [d for d in data.get("datasets") or [] if d.get("name") == name]
    if not found:
        return await _create(gql, name, _default_integration(integrations, name))
    found.sort(key=lambda d: str(d.get("createdAt") or ""))
    if len(found) > 1:
        log.warning(
            "several Labelbox datasets have this name; using the oldest",
            dataset=name,
            ids=[d["id"] for d in found],
        )
    signer = (found[0].get("signer") or {}).get("id")
    return Dataset(str(found[0]["id"]), name, str(signer) if signer else None)


async def _create(gql: gq.Gql, name: str, signer: dict[str, Any] | None) -> Dataset:
    data = await gql(gq.M_CREATE_DATASET, {"name": name}, f"creating dataset {name!r}")
    ds_id = str(data["createDataset"]["id"])
    if signer is None:
        log.info("created a Labelbox dataset (no delegated access)", dataset=name, id=ds_id)
        return Dataset(ds_id, name, None)
    try:
        await gql(
            gq.M_SET_SIGNER,
            {"signerId": signer["id"], "datasetId": ds_id},
            f"attaching delegated access to dataset {name!r}",
        )
        data = await gql(gq.M_VALIDATE_DATASET, {"id": ds_id}, f"validating dataset {name!r}")
        check = data.get("validateDataset") or {}
        if not check.get("valid"):
            failed = [c.get("name") for c in check.get("checks") or [] if not c.get("success")]
            raise PermanentError(
                f"Labelbox dataset {name!r}: the organisation's default delegated-access "
                f"integration {signer.get('name')!r} did not validate for it (failed checks: "
                f"{', '.join(map(str, failed)) or 'none named'}); fix the integration in "
                "Labelbox, or unset it as the default"
            )
    except SyncError:
        with contextlib.suppress(SyncError):
            await gql(gq.M_DELETE_DATASET, {"datasetId": ds_id}, f"deleting dataset {name!r}")
        raise
    log.info(
        "created a Labelbox dataset with delegated access",
        dataset=name,
        id=ds_id,
        integration=signer.get("name"),
    )
    return Dataset(ds_id, name, str(signer["id"]))


def _default_integration(
    integrations: list[dict[str, Any]] | None, dataset: str
) -> dict[str, Any] | None:
    """The organisation's default integration (Organization.get_default_iam_integration);
    None when it has none, or when the key may not see them."""
    if integrations is None:
        log.warning(
            "the API key may not read the delegated-access integrations; creating the "
            "dataset without one",
            dataset=dataset,
        )
        return None
    defaults = [i for i in integrations if i.get("isOrgDefault")]
    if len(defaults) > 1:
        raise PermanentError(
            f"Labelbox dataset {dataset!r}: the organisation has more than one default "
            "delegated-access integration; Labelbox support must resolve this"
        )
    if defaults and not defaults[0].get("valid"):
        raise PermanentError(
            f"Labelbox dataset {dataset!r}: the organisation's default delegated-access "
            f"integration {defaults[0].get('name')!r} is not valid; fix it in Labelbox (or "
            "unset it as the default) so that ingestd can create the dataset"
        )
    return defaults[0] if defaults else None


class NoIntegration(PermanentError):
    """A bucket object for a dataset Labelbox cannot read it through."""

    def __init__(self, where: str, f: FilePayload, ds: Dataset) -> None:
        super().__init__(
            f"{where}: {f.url} is a bucket object, which Labelbox reads only through a "
            f"delegated-access (IAM) integration, and Labelbox dataset {ds.name!r} has none "
            "(ingestd attaches the organisation's default integration to the datasets it "
            "creates, and the organisation has none). Set up an integration for the bucket "
            "in Labelbox and make it the default, or attach one to this dataset; or use "
            "transfer: copy"
        )
