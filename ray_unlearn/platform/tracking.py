"""MLflow runs around the engine: a parent run per search or batch, a child per trial or request,
their figures and pictures. The registry lives in `registry`, the promotion policy in `promotion`,
what may be logged at all in `privacy`; their names are importable from here too.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from ray_unlearn.platform.mlflow_client import Connected, chunks, tracking_uri
from ray_unlearn.platform.privacy import is_private, redact_config, redact_report
from ray_unlearn.platform.promotion import (
    DEFAULT_MODEL_NAME,
    SERVING_ALIAS,
    PromotionRefused,
    Version,
    as_float,
    version_tags,
)
from ray_unlearn.platform.registry import Registry

__all__ = ["DEFAULT_EXPERIMENT", "DEFAULT_MODEL_NAME", "SERVING_ALIAS", "PromotionRefused", "Registry", "Tracker",
           "Version", "redact_config", "redact_report", "tracking_uri", "version_tags"]

DEFAULT_EXPERIMENT = "ray-unlearn"


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
    return out


class Tracker(Connected):
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
            for chunk in chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(run_id, params=chunk)
        return run_id

    def log_metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:
        """Numeric values of `metrics` at `step`; others are skipped."""
        self.log_history(run_id, [{"step": step, **metrics}])

    def log_history(self, run_id: str, history: list[dict]) -> None:
        """Per-step figures (`{"step": k, "loss/forget": v, ...}`) as metrics with their step."""
        ts = int(time.time() * 1000)
        metrics = []
        for i, entry in enumerate(history):
            step = entry.get("step", i)
            for k, v in entry.items():
                if k == "step":
                    continue
                if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 0) == 0:
                    v = v.item()  # numpy / torch scalars
                value = as_float(v)
                if value is not None:
                    metrics.append(Metric(str(k)[:MAX_ENTITY_KEY_LENGTH], value, ts, int(step)))
        for chunk in chunks(metrics, MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=chunk)

    def log_report(self, run_id: str, report: dict, out_dir: Path | None = None,
                   storage_uri: str | None = None) -> None:
        """Final figures as metrics, the evaluation as tags (as on a registered version), a
        redacted report.json and the integrity grid as artifacts. Never the target pictures."""
        tags = version_tags(report)
        figures = {k: float(tags[k]) for k in ("sscd", "sscd_base", "threshold", "integrity_ssim", "fid", "lpips",
                                               "specificity_margin", "collateral") if k in tags}
        figures["forgotten"] = float(report.get("all_forgotten") is True)
        figures["passed"] = float(report.get("passed") is True)
        for k in ("wall_seconds", "train_seconds"):
            if as_float(report.get(k)) is not None:
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
        if is_private(path):
            raise ValueError(f"{path} shows forget targets (personal data): it is never logged to MLflow")
        self.client.log_artifact(run_id, str(path), artifact_path)

    def set_tags(self, run_id: str, tags: dict) -> None:
        entries = [RunTag(str(k)[:MAX_ENTITY_KEY_LENGTH], str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in tags.items()]
        for chunk in chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, tags=chunk)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark a run ended: FINISHED, FAILED or KILLED."""
        if status not in ("FINISHED", "FAILED", "KILLED") or not RunStatus.is_terminated(RunStatus.from_string(status)):
            raise ValueError(f"run status {status!r}: use FINISHED, FAILED or KILLED")
        self.client.set_terminated(run_id, status)
