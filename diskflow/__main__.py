"""`python -m diskflow` is the `diskflow` command."""

from diskflow.cli import app

app(prog_name="diskflow")
