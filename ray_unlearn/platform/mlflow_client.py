"""One MLflow connection rule for runs and registry alike.

- Every call names its experiment, run and registry URI explicitly (`MlflowClient`, never the
  fluent API's active run, `MLFLOW_EXPERIMENT_ID` or `MLFLOW_REGISTRY_URI`): Ray workers inherit
  the driver's environment, and a Tune trial process creates child runs of a parent that the
  driver created. `Tracker` and `Registry` pickle as (uri, names) and reconnect on the other side.
- A relative `sqlite:///` URI is made absolute here: a Ray worker with another working directory
  would otherwise silently open (and create) a different database.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlflow.tracking import MlflowClient


def tracking_uri(uri: str | None = None) -> str:
    """uri, else $MLFLOW_TRACKING_URI, else sqlite:///<absolute cwd>/mlflow.db (MLflow 3's default
    store, made absolute). A relative sqlite path is made absolute against the current directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and uri != prefix + ":memory:":
        return prefix + str(Path.cwd() / uri[len(prefix):])
    return uri


class Connected:
    """An MlflowClient on an explicit URI (tracking and registry alike); pickles as its URI."""

    uri: str

    @property
    def client(self) -> MlflowClient:
        if getattr(self, "_client", None) is None:
            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_client"}


def chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]
