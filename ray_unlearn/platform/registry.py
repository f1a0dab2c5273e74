"""The MLflow model registry of hotfixes, where an operator picks the one that serves (`@production`).

A hotfix is a diffusers directory in our object storage (`s3://...`) or a local directory; the
registry only points at it (`source`). Promotion moves an alias after the promotion policy
(`promotion.Version.refusal`) found nothing against the version's evaluation tags.
"""

from __future__ import annotations

from urllib.parse import urlparse

from mlflow.exceptions import MlflowException

from ray_unlearn.platform.mlflow_client import Connected, tracking_uri
from ray_unlearn.platform.promotion import DEFAULT_MODEL_NAME, SERVING_ALIAS, PromotionRefused, Version

IDEMPOTENCY_TAG = "idempotency_key"


def _as_int(version: int | str) -> int:
    try:
        return int(str(version).lstrip("vV"))
    except ValueError:
        raise LookupError(f"{version!r} is not a version number") from None


class Registry(Connected):
    """The hotfix versions of one registered model, and the alias that serves."""

    def __init__(self, uri: str | None = None, name: str = DEFAULT_MODEL_NAME):
        self.uri = tracking_uri(uri)
        self.name = name

    def _version(self, mv, aliases: dict[str, int] | None = None) -> Version:
        number = int(mv.version)
        names = sorted(a for a, n in aliases.items() if int(n) == number) if aliases is not None else list(mv.aliases or [])
        return Version(mv.name, number, mv.source, mv.run_id or None, dict(mv.tags or {}), names)

    def _aliases(self) -> dict[str, int]:
        try:
            return {a: int(n) for a, n in (self.client.get_registered_model(self.name).aliases or {}).items()}
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return {}
            raise

    def _search(self, filter_string: str) -> list[Version]:
        # search results do not carry aliases (MLflow documents it): take them from the model
        out, token = [], None
        while True:
            page = self.client.search_model_versions(filter_string, page_token=token)
            out.extend(page)
            token = page.token
            if not token:
                break
        aliases = self._aliases() if out else {}
        return sorted((self._version(mv, aliases) for mv in out), key=lambda v: v.version)

    @staticmethod
    def _quote(value: str) -> str:
        if "'" in value:
            raise ValueError(f"quotes are not allowed in registry names and tag values: {value!r}")
        return f"'{value}'"

    def register(self, source: str, *, run_id: str | None, tags: dict[str, str],
                 idempotency_key: str | None = None) -> Version:
        """A new version pointing at `source` (a local diffusers directory or an s3:// URI in our
        object storage). With `idempotency_key`, calling again returns the version already made."""
        tags = {str(k): str(v) for k, v in tags.items()}
        if idempotency_key is not None:
            tags[IDEMPOTENCY_TAG] = idempotency_key
            found = self.find(**{IDEMPOTENCY_TAG: idempotency_key})
            if found:
                return found[0]
        try:
            self.client.create_registered_model(self.name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            mv = self.client.create_model_version(self.name, source, run_id=run_id, tags=tags)
        except MlflowException as err:
            if "Invalid model version source" in str(err) and urlparse(source).scheme in ("", "file"):
                raise ValueError(
                    f"the MLflow server at {self.uri} refuses a local path as a model source ({source}); "
                    "upload the hotfix to object storage and register its s3:// URI"
                ) from err
            raise
        if idempotency_key is not None:
            # two processors raced past the lookup above: every racer keeps the lowest version
            same = self.find(**{IDEMPOTENCY_TAG: idempotency_key})
            if same and same[0].version != int(mv.version):
                self.client.delete_model_version(self.name, str(mv.version))
                return same[0]
        return self._version(mv, self._aliases())

    def get(self, version: int | str) -> Version:
        number = _as_int(version)
        try:
            mv = self.client.get_model_version(self.name, str(number))
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise LookupError(f"{self.name} has no version {number}") from None
            raise
        return self._version(mv, self._aliases())

    def versions(self) -> list[Version]:
        return self._search(f"name={self._quote(self.name)}")

    def find(self, **tags: str) -> list[Version]:
        """Versions whose tags equal all of `tags`, ascending."""
        clauses = [f"name={self._quote(self.name)}"]
        clauses += [f"tags.`{k}`={self._quote(str(v))}" for k, v in tags.items()]
        return self._search(" and ".join(clauses))

    def serving(self, alias: str = SERVING_ALIAS) -> Version | None:
        number = self._aliases().get(alias)
        return None if number is None else self.get(number)

    def promote(self, version: int | str, alias: str = SERVING_ALIAS, *, force: bool = False) -> Version:
        """Point `alias` at `version` if its evaluation tags show it forgot every target and kept
        integrity; else raise PromotionRefused (the alias stays). `force` skips the check."""
        v = self.get(version)
        why = v.refusal()
        if why and not force:
            raise PromotionRefused(why)
        self.client.set_registered_model_alias(self.name, alias, str(v.version))
        return self.get(v.version)
