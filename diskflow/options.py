"""Command-line options shared by commands that talk to the same kind of store."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from importer.sources.s3_options import S3Options


class S3Addressing(StrEnum):
    AUTO = "auto"
    PATH = "path"
    VIRTUAL = "virtual"


@dataclass(frozen=True)
class S3Flags:
    """How to reach an S3 store: `diskflow import`'s sources, the template stores."""

    s3_endpoint: Annotated[
        str | None,
        typer.Option(
            "--s3-endpoint",
            "--endpoint-url",
            help="S3-compatible store URL (https://minio.example:9000); default: "
            "AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or the profile's endpoint_url, else AWS.",
        ),
    ] = None
    s3_region: Annotated[
        str | None,
        typer.Option(
            "--s3-region",
            "--region",
            help="S3 region; default: from an AWS host name, else AWS_REGION, "
            "AWS_DEFAULT_REGION or the profile's, else us-east-1.",
        ),
    ] = None
    s3_addressing: Annotated[
        S3Addressing,
        typer.Option(help="Bucket in the path or the host name; auto: path with an endpoint."),
    ] = S3Addressing.AUTO
    s3_profile: Annotated[
        str | None,
        typer.Option(
            "--s3-profile", "--profile", help="AWS profile for the credentials (AWS_PROFILE)."
        ),
    ] = None
    s3_credentials_file: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="AWS shared-credentials file (INI)."),
    ] = None

    def options(self, *, cdi_url: bool = False) -> S3Options:
        return S3Options(
            endpoint=self.s3_endpoint,
            region=self.s3_region,
            addressing=self.s3_addressing.value,
            profile=self.s3_profile,
            credentials_file=str(self.s3_credentials_file) if self.s3_credentials_file else None,
            cdi_url=cdi_url,
        )
