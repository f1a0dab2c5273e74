"""MLflow around the engine: runs (parent + one child per trial or request), their figures, and the
registry of hotfixes where an operator picks the one that serves (`@production`).

Rules this module keeps, and why:
- Every call names its experiment, run and registry URI explicitly (`MlflowClient`, never the
  fluent API's active run, `MLFLOW_EXPERIMENT_ID` or `MLFLOW_REGISTRY_URI`): Ray workers inherit
  the driver's environment, and a Tune trial process creates child runs of a parent that the
  driver created. `Tracker` and `Registry` pickle as (uri, names) and reconnect on the other side.
- A relative `sqlite:///` URI is made absolute here: a Ray worker with another working directory
  would otherwise silently open (and create) a different database.
- Privacy: forget targets are personal data (faces; their file names are often a person's name).
  Only their content hashes reach MLflow. `before_after.png`, `samples/` and target images are
  never logged (`log_figure` refuses them), and the logged copy of report.json has target ids and
  paths replaced (`redact_report`); the full report stays in our own object storage.
- A hotfix is a diffusers directory in our object storage (`s3://...`) or a local directory; the
  registry only points at it (`source`). Promotion moves an alias, after checking the version's
  evaluation tags; the tags are written at registration from the engine's report (`version_tags`).
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

DEFAULT_EXPERIMENT = "ray-unlearn"
DEFAULT_MODEL_NAME = "ray-unlearn-hotfix"
SERVING_ALIAS = "production"
IDEMPOTENCY_TAG = "idempotency_key"
PRIVATE_FILES = ("before_after.png",)  # shows the target faces
PRIVATE_DIRS = ("samples",)  # the model's output for each target
REDACTED = "<redacted: personal data, see target_hashes>"


def tracking_uri(uri: str | None = None) -> str:
    """uri, else $MLFLOW_TRACKING_URI, else sqlite:///<absolute cwd>/mlflow.db (MLflow 3's default
    store, made absolute). A relative sqlite path is made absolute against the current directory."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and uri != prefix + ":memory:":
        return prefix + str(Path.cwd() / uri[len(prefix):])
    return uri


class PromotionRefused(RuntimeError):
    """Promotion was refused; the message says why, for the operator."""


# -- tags from a report --------------------------------------------------------------------------


def _num(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return None
    return float(x)


def _s(x) -> str:
    return "true" if x is True else "false" if x is False else str(x)


def version_tags(report: dict, **extra) -> dict[str, str]:
    """The evaluation of a hotfix as registry tags (all strings), from an engine report
    (`engine.write_outputs`). A figure the report lacks is omitted; nothing here raises on a
    partial report. `extra` is added as str() (None values are skipped)."""
    rows = [r for r in (report.get("targets") or []) if isinstance(r, dict)]
    th = report.get("forget_threshold") or {}
    integ = report.get("integrity") or {}
    sscd = [v for v in (_num(r.get("sscd_unlearned")) for r in rows) if v is not None]
    base = [v for v in (_num(r.get("sscd_base")) for r in rows) if v is not None]
    tags = {
        "passed": _s(report.get("passed") is True),
        "forgotten": _s(report.get("all_forgotten") is True),
        "artifact": _s(any(r.get("artifact") is True for r in rows)) if rows else None,
        "sscd": max(sscd) if sscd else None,
        "sscd_base": max(base) if base else None,
        "threshold": _num(th.get("value")),
        "threshold_kind": th.get("kind"),
        "integrity_ssim": _num(integ.get("ssim")),
        "min_integrity_ssim": _num(integ.get("min_ssim")),
        "fid": _num(integ.get("fid")),
        "lpips": _num(integ.get("lpips")),
        "method": report.get("method"),
        "target_hashes": ",".join(str(r["content_sha256"]) for r in rows if r.get("content_sha256")) or None,
        **extra,
    }
    return {k: _s(v) for k, v in tags.items() if v is not None}


def redact_config(cfg: dict) -> dict:
    """A copy of a config dict without target or surrogate file paths (a face's file name is often
    a person's name). Seeds stay: they are not personal data."""
    cfg = copy.deepcopy(cfg)
    if isinstance(cfg.get("targets"), list):
        cfg["targets"] = [
            {k: (REDACTED if k in ("image", "noise") and v else v) for k, v in t.items()} if isinstance(t, dict) else REDACTED
            for t in cfg["targets"]
        ]
    sur = cfg.get("surrogate")
    if isinstance(sur, dict) and sur.get("paths"):
        sur["paths"] = [REDACTED] * len(sur["paths"])
    return cfg


def redact_report(report: dict) -> dict:
    """The report as MLflow may show it: target ids (file stems) replaced by content hashes, the
    config's target and surrogate paths removed."""
    report = copy.deepcopy(report)
    for i, row in enumerate(report.get("targets") or []):
        if isinstance(row, dict):
            h = row.get("content_sha256")
            row["id"] = f"target-{str(h)[:12]}" if h else f"target-{i}"
    if isinstance(report.get("config"), dict):
        report["config"] = redact_config(report["config"])
    return report


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
    return out


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


def _is_private(path: Path) -> bool:
    return path.name in PRIVATE_FILES or any(p in PRIVATE_DIRS for p in path.parts[:-1])


# -- connection ----------------------------------------------------------------------------------


class _Connected:
    """An MlflowClient on an explicit URI (tracking and registry alike); pickles as its URI."""

    uri: str

    @property
    def client(self) -> MlflowClient:
        if getattr(self, "_client", None) is None:
            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_client"}


class Tracker(_Connected):
    """Runs in one experiment. Side effects belong on rank 0 / the driver / a trial's own process."""

    def __init__(self, uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT):
        self.uri = tracking_uri(uri)
        self.experiment = experiment
        self.experiment_id = self._experiment_id(experiment)

    def _experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            location = None
            if self.uri.startswith("sqlite:///"):
                # MLflow's default for a sqlite store is ./mlruns of whichever process creates the
                # experiment; keep the artifacts beside the database instead
                location = (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
            try:
                return self.client.create_experiment(name, artifact_location=location)
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = self.client.get_experiment_by_name(name)  # another process created it just now
        if exp.lifecycle_stage != "active":
            raise ValueError(
                f"MLflow experiment {name!r} (id {exp.experiment_id}) is deleted: restore it "
                f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or use another name"
            )
        return exp.experiment_id

    def start_run(self, name: str, *, parent_run_id: str | None = None, params: dict | None = None,
                  tags: dict | None = None) -> str:
        """Create a run in this tracker's experiment and return its id. Nested params become dotted
        keys (`train.lr`); a config's target/surrogate paths are redacted (`redact_config`)."""
        from mlflow.tracking.context.registry import resolve_tags  # user, source, git commit: as mlflow.start_run

        run_tags = resolve_tags({str(k): v for k, v in (tags or {}).items()})
        if parent_run_id:
            run_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={k: str(v)[:MAX_TAG_VAL_LENGTH] for k, v in run_tags.items()})
        run_id = run.info.run_id
        if params:
            flat = _flatten(redact_config(params))
            entries = [Param(k[:MAX_ENTITY_KEY_LENGTH], v[:MAX_PARAM_VAL_LENGTH]) for k, v in flat.items()]
            for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(run_id, params=chunk)
        return run_id

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:
        """Numeric values of `metrics` at `step`; others are skipped."""
        self.log_history(run_id, [{"step": step, **metrics}])

    def log_history(self, run_id: str, history: list[dict]) -> None:
        """Per-step figures (`{"step": k, "loss/forget": v, ...}`) as metrics with their step."""
        import time

        ts = int(time.time() * 1000)
        metrics = []
        for i, entry in enumerate(history):
            step = entry.get("step", i)
            for k, v in entry.items():
                if k == "step":
                    continue
                if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:
                    v = v.item()  # numpy / torch scalars
                value = _num(v)
                if value is not None:
                    metrics.append(Metric(str(k)[:MAX_ENTITY_KEY_LENGTH], value, ts, int(step)))
        for chunk in _chunks(metrics, MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk)

    def log_report(self, run_id: str, report: dict, out_dir: Path | None = None,
                   storage_uri: str | None = None) -> None:
        """Final figures as metrics, the evaluation as tags (as on a registered version), a
        redacted report.json and the integrity grid as artifacts. Never the target pictures."""
        tags = version_tags(report)
        figures = {k: float(tags[k]) for k in ("sscd", "sscd_base", "threshold", "integrity_ssim", "fid", "lpips")
                   if k in tags}
        figures["forgotten"] = float(report.get("all_forgotten") is True)
        figures["passed"] = float(report.get("passed") is True)
        for k in ("wall_seconds", "train_seconds"):
            if _num(report.get(k)) is not None:
                figures[k] = float(report[k])
        self.log_metrics(run_id, {k: v for k, v in figures.items() if math.isfinite(v)},
                         step=int(report.get("steps") or 0))
        if storage_uri:
            tags["storage_uri"] = storage_uri
        self.set_tags(run_id, tags)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "report.json"
            path.write_text(json.dumps(redact_report(report), indent=2, default=str) + "\n")
            self.client.log_artifact(run_id, str(path))
        if out_dir is not None and (Path(out_dir) / "integrity_grid.png").is_file():
            self.log_figure(run_id, Path(out_dir) / "integrity_grid.png")

    def log_figure(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        """Log one picture. Refuses the pictures that show forget targets (privacy rule)."""
        path = Path(path)
        if _is_private(path):
            raise ValueError(f"{path} shows forget targets (personal data): it is never logged to MLflow")
        self.client.log_artifact(run_id, str(path), artifact_path)

    def set_tags(self, run_id: str, tags: dict) -> None:
        entries = [RunTag(str(k)[:MAX_ENTITY_KEY_LENGTH], str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in tags.items()]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=chunk)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark a run ended: FINISHED, FAILED or KILLED."""
        if status not in ("FINISHED", "FAILED", "KILLED") or not RunStatus.is_terminated(RunStatus.from_string(status)):
            raise ValueError(f"run status {status!r}: use FINISHED, FAILED or KILLED")
        self.client.set_terminated(run_id, status)


# -- registry ------------------------------------------------------------------------------------


def _f(x: float, other: float | None = None) -> str:
    """Two decimals, or four where two would print both sides of a comparison alike."""
    if other is not None and f"{x:.2f}" == f"{other:.2f}":
        return f"{x:.4f}"
    return f"{x:.2f}"


def _tag_float(tags: dict[str, str], key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


@dataclass
class Version:
    name: str
    version: int
    source: str
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.tags.get("passed") == "true"

    def refusal(self) -> str | None:
        """Why this version must not serve, phrased for the operator; None when it may."""
        t, v = self.tags, f"version {self.version}"
        if "forgotten" not in t or "passed" not in t:
            return f"{v} has no evaluation tags (was it registered by ray-unlearn?)"
        sscd, th = _tag_float(t, "sscd"), _tag_float(t, "threshold")
        n = len([h for h in t.get("target_hashes", "").split(",") if h])
        what = f"all {n} of its targets" if n > 1 else "its target"
        highest = "the highest SSCD" if n > 1 else "SSCD"
        kind = f" ({t['threshold_kind']})" if t.get("threshold_kind") else ""
        if t["forgotten"] != "true" or t.get("artifact") == "true":
            if sscd is None or th is None:
                return f"{v} did not forget {what}: SSCD was not measured (see its run's report.json)"
            if sscd >= th:
                return f"{v} did not forget {what}: {highest} {_f(sscd, th)} is not below the threshold {_f(th, sscd)}{kind}"
            if t.get("artifact") == "true":
                return (f"{v} did not forget {what}: {highest} {_f(sscd, th)} is below the threshold {_f(th, sscd)}{kind}, "
                        "but the output is artifact texture (high-frequency energy beyond the base model's)")
            return f"{v} did not forget {what} (its report says a target was not forgotten)"
        ssim, bound = _tag_float(t, "integrity_ssim"), _tag_float(t, "min_integrity_ssim")
        if ssim is None:
            return f"{v} has no integrity SSIM (the metric was unavailable): nothing shows it kept other outputs"
        if bound is None:
            return f"{v} has no integrity bound (min_integrity_ssim) in its tags"
        if ssim < bound:
            return f"{v} fell below the integrity bound: SSIM {_f(ssim, bound)} < {_f(bound, ssim)}"
        if t["passed"] != "true":
            return f"{v} did not pass its evaluation (passed={t['passed']})"
        return None

    def summary(self) -> str:
        """'SSCD 0.53 < 0.63, integrity SSIM 0.80' from whichever figures the tags hold."""
        t, parts = self.tags, []
        sscd, th, ssim = _tag_float(t, "sscd"), _tag_float(t, "threshold"), _tag_float(t, "integrity_ssim")
        if sscd is not None:
            rel = "" if th is None else f" {'<' if sscd < th else '>='} {_f(th, sscd)}"
            parts.append(f"SSCD {_f(sscd, th)}{rel}")
        if ssim is not None:
            parts.append(f"integrity SSIM {ssim:.2f}")
        return ", ".join(parts) or "no evaluation figures"


def _as_int(version: int | str) -> int:
    try:
        return int(str(version).lstrip("vV"))
    except ValueError:
        raise LookupError(f"{version!r} is not a version number") from None


class Registry(_Connected):
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
