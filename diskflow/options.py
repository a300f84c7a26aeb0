"""Command-line options shared by commands that talk to the same kind of store."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from importer.sources.s3_options import S3Options


class S3Addressing(StrEnum):
    AUTO = "auto"
    PATH = "path"
    VIRTUAL = "virtual"


S3Endpoint = Annotated[
    str | None, typer.Option(help="S3-compatible store URL (https://minio.example:9000).")
]
S3Region = Annotated[
    str | None, typer.Option(help="S3 region; default: from an AWS host name, else us-east-1.")
]
S3AddressingOption = Annotated[
    S3Addressing,
    typer.Option(help="Bucket in the path or the host name; auto: path with --s3-endpoint."),
]
S3Profile = Annotated[str | None, typer.Option(help="AWS profile for the credentials.")]
S3CredentialsFile = Annotated[
    Path | None,
    typer.Option(exists=True, dir_okay=False, help="AWS shared-credentials file (INI)."),
]


def s3_options(
    endpoint: str | None,
    region: str | None,
    addressing: S3Addressing,
    profile: str | None,
    credentials_file: Path | None,
    *,
    cdi_url: bool = False,
) -> S3Options:
    """S3Options from the shared --s3-* options."""
    return S3Options(
        endpoint=endpoint,
        region=region,
        addressing=addressing.value,
        profile=profile,
        credentials_file=str(credentials_file) if credentials_file else None,
        cdi_url=cdi_url,
    )
