"""The deletion-request batch processor: `ray-unlearn requests process` / `jobs/process_requests.py`.

One run: finish what crashed runs left committed, claim up to `limit` requests, unlearn them one
after another on top of the serving version (or the base model), gate every step, and, when
something passed, commit one new version and move the alias. The commit protocol is in
`ray_unlearn.requests.lineage`; the queue's in `ray_unlearn.requests.queue`.

Per request, from the current weights: snapshot the trainable weights, train on that request
alone, then gate: (1) forgotten (SSCD below the threshold and not artifact texture), (2) integrity
SSIM against the base model at or above the bound, (3) every request done before it, in earlier
batches or this one, still forgotten. A failed gate restores the snapshot; (1) and an unusable
image fail the request; (2) and (3) depend on what came before it, so the request goes back to
pending (and fails once its claims exceed `max_attempts`). Then the batch: the final figures
(SSIM, LPIPS, FID) and all re-verifications again, and the commit, in this order, each step safe
to crash after: upload the hotfix -> manifest -> checkpoint each request -> decide -> lineage lock
-> register (idempotent by batch id) -> promote -> complete each request -> purge its image.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ray_unlearn.requests.lease import LeaseKeeper
from ray_unlearn.requests.lineage import BASE, Lineage, LineageError, parent_key
from ray_unlearn.requests.models import LeaseLost, RequestRecord
from ray_unlearn.requests.queue import Queue
from ray_unlearn.storage import open_store

REQUESTS_EXPERIMENT = "ray-unlearn-requests"
EXIT_OK, EXIT_RETURNED = 0, 3


class BatchAborted(RuntimeError):
    """The batch stops and ships nothing (a lease was lost, the lineage moved, a gate failed)."""


def make_holder() -> str:
    return f"{socket.gethostname()[:60]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class Outcome:
    """What one run did, for the CLI and scripts."""

    holder: str
    batch: str | None = None
    parent: str | None = None
    version: int | None = None
    status: str = "idle"  # idle | promoted | nothing-passed | returned | aborted
    message: str = ""
    requests: list[dict] = field(default_factory=list)  # {id, result, reason, ...}
    reverified: list[dict] = field(default_factory=list)
    integrity: dict | None = None
    wall_seconds: float = 0.0
    gpus: list = field(default_factory=list)  # the GPU ids Ray gave the batch (--gpu); [] in-process

    @property
    def exit_code(self) -> int:
        returned = any(r["result"] == "returned" for r in self.requests)
        return EXIT_RETURNED if returned or self.status == "aborted" else EXIT_OK

    def add(self, rid: str, result: str, reason: str | None = None, **extra) -> None:
        self.requests.append({"id": rid, "result": result, "reason": reason, **extra})

    def public(self) -> dict:
        return {**asdict(self), "exit_code": self.exit_code}

    def summary(self) -> str:
        lines = [f"batch {self.batch or '-'}: {self.status}" + (f" ({self.message})" if self.message else "")]
        for r in self.requests:
            lines.append(f"  {r['id']}  {r['result']:<8}" + (f" version {r['version']}" if r.get("version") else "")
                         + (f"  {r['reason']}" if r.get("reason") else ""))
        if self.integrity:
            i = self.integrity
            lines.append(f"integrity vs base on {i['n']} seeds: SSIM {i['ssim']} (bound {i.get('min_ssim')}) "
                         f"LPIPS {i['lpips']} FID {i['fid']}")
        if self.reverified:
            ok = sum(r["forgotten"] is True for r in self.reverified)
            skipped = sum(r["forgotten"] is None for r in self.reverified)
            lines.append(f"re-verified on the new version: {ok}/{len(self.reverified)} forgotten"
                         + (f" ({skipped} without seed or image: not re-verifiable)" if skipped else ""))
        lines.append(f"({self.wall_seconds} s; evidence: `ray-unlearn requests show ID`)")
        return "\n".join(lines)


class Processor:
    def __init__(self, store: str, *, tracking_uri: str | None = None, model_name: str | None = None,
                 limit: int = 8, retention: str = "delete", config_path: str | None = None,
                 overrides: list[str] = (), lease_seconds: float = 900.0, max_attempts: int = 5,
                 holder: str | None = None, log=print):
        from ray_unlearn.platform.tracking import DEFAULT_MODEL_NAME, Registry

        if retention not in ("delete", "keep"):
            raise ValueError(f"retention must be 'delete' or 'keep', got {retention!r}")
        if not 1 <= limit <= 300:  # the version's `requests` tag holds the ids (MLflow: 8000 chars)
            raise ValueError(f"--limit must be between 1 and 300, got {limit}")
        self.holder = holder or make_holder()
        self.store = open_store(store)
        # the queue's own give-up (at claim time) could fail a request that a crashed run already
        # committed; this processor gives up itself, after checking the lineage (see _triage)
        self.queue = Queue(self.store, lease_seconds=lease_seconds, max_attempts=2**31)
        self.registry = Registry(tracking_uri, model_name or DEFAULT_MODEL_NAME)
        self.tracking_uri = self.registry.uri
        self.lineage = Lineage(self.store, self.registry, self.holder)
        self.limit, self.retention, self.max_attempts = limit, retention, max_attempts
        self.config_path, self.overrides = config_path, list(overrides)
        self.lease_seconds = lease_seconds
        self.log = log

    # ---- the run ------------------------------------------------------------------------------
    def run(self) -> Outcome:
        t0 = time.perf_counter()
        out = Outcome(self.holder)
        serving = self.lineage.advance(self.log)
        cfg = self.settings(serving)  # before claiming: a bad setting touches no request
        self._finish_purges()
        claimed = self.queue.claim(self.holder, self.limit)
        if not claimed:
            out.message = "no pending requests"
            return out
        self.log(f"claimed {len(claimed)} request(s) as {self.holder}")
        keeper = LeaseKeeper(self.queue, self.holder, [r.id for r in claimed], self.lease_seconds / 3, self.log)
        try:
            todo = self._triage(claimed, keeper, out)
            if todo:
                from ray_unlearn.requests.batch import Batch

                fresh = self.lineage.advance(self.log)  # triage may have rolled a batch forward
                if parent_key(fresh) != parent_key(serving):
                    serving, cfg = fresh, self._settings_or_abort(fresh)
                Batch(self, keeper, serving, cfg, out).run(todo)
        except BatchAborted as err:
            out.status, out.message = "aborted", str(err)
            self.log(f"batch stopped, nothing shipped: {err}")
            for rid in keeper.held_ids():
                self._release(keeper, rid, out, str(err))
        finally:
            keeper.stop()
        out.wall_seconds = round(time.perf_counter() - t0, 2)
        return out

    # ---- settings ---------------------------------------------------------------------------------
    def settings(self, serving):
        """--config / --set over the serving version's stored settings (else the built-in
        defaults); a ConfigError names what is wrong."""
        from ray_unlearn.config import ConfigError, load_config

        base = None
        if self.config_path is None:
            stored = stored_config(self, serving)
            if stored:
                base = {k: v for k, v in stored.items() if k not in ("targets", "cache_dir")}
                self.log(f"settings: those of version {serving.version} (override with --config / --set)")
        cfg = load_config(self.config_path, self.overrides, base=base)
        if cfg.targets:
            raise ConfigError("a batch's targets are its requests: remove `targets` from the config")
        lineage_base = serving.tags.get("base_model") if serving else None
        if lineage_base and lineage_base != cfg.model.path:
            raise ConfigError(f"version {serving.version} descends from base model {lineage_base!r}, but model.path "
                              f"is {cfg.model.path!r}: integrity is judged against the lineage's base")
        return cfg

    def _settings_or_abort(self, serving):
        from ray_unlearn.config import ConfigError

        try:
            return self.settings(serving)
        except ConfigError as err:
            raise BatchAborted(str(err)) from None

    # ---- requests a crashed run left behind -----------------------------------------------------
    def _triage(self, claimed: list[RequestRecord], keeper: LeaseKeeper, out: Outcome) -> list[RequestRecord]:
        """Complete the claimed requests that a committed batch already applied; give up on those
        claimed too often; the rest is this batch's work."""
        todo = []
        for rec in claimed:
            committed = None
            for batch, parent in self._batches_tried(rec.id):
                settled = self.lineage.settle(batch, parent)
                if settled.committed:
                    committed = batch
                    break
            if committed is not None:
                self.lineage.advance(self.log)
                self._complete_committed(rec, committed, keeper, out)
            elif rec.attempts > self.max_attempts:
                last = (rec.evidence.get("last_attempt") or {}).get("reason")
                why = f"gave up after {rec.attempts - 1} attempts" + (f"; the last: {last}" if last else
                                                                       " (the processor died or lost the lease each time)")
                self._fail(keeper, rec.id, why, out)
            else:
                todo.append(rec)
        return todo

    def _batches_tried(self, rid: str) -> list[tuple[str, str]]:
        """(batch, parent) of every checkpoint in the request's ledger, newest first."""
        seen, out = set(), []
        for e in reversed(self.queue.ledger(rid)):
            ev = e["record"].get("evidence") or {}
            if e["event"] == "checkpoint" and ev.get("batch") and ev["batch"] not in seen:
                seen.add(ev["batch"])
                out.append((ev["batch"], str(ev.get("parent", BASE))))
        return out

    def _complete_committed(self, rec: RequestRecord, batch: str, keeper: LeaseKeeper, out: Outcome) -> None:
        m = self.lineage.manifest(batch)
        v = self.registry.register(m["hotfix"], run_id=m.get("run_id"), tags=m["tags"], idempotency_key=batch)
        self.complete(keeper, rec.id, m["evidence"][rec.id], v.version, out, recovered=True)

    def _finish_purges(self) -> None:
        """A run that died between `complete` and `purge_image` left an image behind: delete it."""
        for rec in self.queue.list("done"):
            if rec.image_key is not None and rec.evidence.get("retention") == "delete":
                self.queue.purge_image(rec.id)

    # ---- queue transitions, each dropping the request from the lease keeper first ----------------
    def complete(self, keeper: LeaseKeeper, rid: str, evidence: dict, version: int, out: Outcome,
                 recovered: bool = False) -> None:
        keeper.drop(rid)
        evidence = {**evidence, "versions": {**evidence.get("versions", {}), "new": version},
                    "times": {**evidence.get("times", {}), "completed_at": _now()}, "retention": self.retention}
        try:
            self.queue.complete(rid, self.holder, evidence)
        except LeaseLost as err:  # the batch is committed: whoever retook it completes it
            self.log(f"{rid}: {err}")
            return
        if self.retention == "delete":
            self.queue.purge_image(rid)
        note = " (finished a crashed run's committed batch)" if recovered else ""
        self.log(f"{rid}: done in version {version}{note}; image {'purged' if self.retention == 'delete' else 'kept'}")
        out.add(rid, "done", None, version=version, recovered=recovered)

    def _fail(self, keeper: LeaseKeeper, rid: str, reason: str, out: Outcome, **extra) -> None:
        keeper.drop(rid)
        try:
            self.queue.fail(rid, self.holder, reason[:1900])
        except LeaseLost as err:
            self.log(f"{rid}: {err}")
            return
        self.log(f"{rid}: FAILED: {reason}")
        out.add(rid, "failed", reason, **extra)

    def _release(self, keeper: LeaseKeeper, rid: str, out: Outcome, reason: str, evidence: dict | None = None) -> None:
        keeper.drop(rid)
        try:
            self.queue.checkpoint(rid, self.holder, {"last_attempt": {"holder": self.holder, "at": _now(),
                                                                      "reason": reason[:1500], **(evidence or {})}})
            self.queue.release(rid, self.holder)
        except LeaseLost as err:
            self.log(f"{rid}: {err}")
            return
        self.log(f"{rid}: returned to pending: {reason}")
        out.add(rid, "returned", reason)

    def release_or_fail(self, keeper: LeaseKeeper, rec: RequestRecord, reason: str, out: Outcome,
                        evidence: dict | None = None) -> None:
        if rec.attempts >= self.max_attempts:
            self._fail(keeper, rec.id, f"{reason} (attempt {rec.attempts} of {self.max_attempts})", out)
        else:
            self._release(keeper, rec.id, out, reason, evidence)


def stored_config(processor: Processor, serving) -> dict | None:
    """The settings the serving version was made with: its `config_uri` tag (a batch's config in
    the store), else the config in its MLflow run's report.json (a search or `unlearn` run)."""
    if serving is None:
        return None
    uri = serving.tags.get("config_uri")
    if uri:
        root = processor.store.uri()
        key = uri[len(root):].lstrip("/") if uri.startswith(root) else None
        if key is None:
            raise LineageError(f"version {serving.version}'s config_uri {uri} is outside the store {root}")
        return processor.store.get_json(key)
    if serving.run_id:
        import json

        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = processor.registry.client.download_artifacts(serving.run_id, "report.json", tmp)
                return json.loads(Path(path).read_text()).get("config")
        except Exception:  # no report logged with that run: the built-in defaults apply
            return None
    return None


def run_batch(*, store: str, gpu: bool = False, log=print, **options) -> Outcome:
    """One batch, in this process or (gpu=True) as a Ray task that holds one GPU."""
    if not gpu:
        return Processor(store, log=log, **options).run()
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)
    task = ray.remote(num_gpus=1, max_retries=0)(_remote_batch)  # a retry would be a second holder: no
    return ray.get(task.remote(store, options))


def _remote_batch(store: str, options: dict) -> Outcome:
    import ray

    out = Processor(store, log=lambda msg: print(msg, flush=True), **options).run()
    out.gpus = [str(g) for g in ray.get_gpu_ids()]  # evidence of where it ran
    return out
