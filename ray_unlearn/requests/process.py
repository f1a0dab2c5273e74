"""The deletion-request batch processor: `ray-unlearn requests process` / `jobs/process_requests.py`.

One run: finish what crashed runs left committed, claim up to `limit` requests, unlearn them one
after another on top of the serving version (or the base model; `continual.strategy` says how a
batch builds on earlier requests, see `batch`), gate every step, and, when
something passed, commit one new version and move the alias. The commit protocol is in
`ray_unlearn.requests.lineage`; the queue's in `ray_unlearn.requests.queue`.

First, what dead processors left behind on this machine: their scratch directories (requesters'
pictures) are removed and their MLflow runs ended KILLED. Per request, gate (0) before any
training: the base model must produce the picture (SSCD of its output for the seed, or of its
reconstruction of the picture, at or above the threshold), else the request ends `not_produced`
unless an operator overrode it. Then, from the current weights: snapshot the trainable weights,
train on that request alone (a non-finite loss or gradient fails it: "diverged (NaN at step k)"),
then gate: (1) forgotten (SSCD below the threshold and not artifact texture), (2) integrity
against the base model: SSIM at or above the bound (pooled, and per prompt when sd3's
`extra_prompts` are set) and collateral forgetting within its bound, (3) every request done before it, in earlier
batches or this one, still forgotten. A failed gate restores the snapshot; (1) and an unusable
image fail the request; (2) and (3) depend on what came before it, so the request goes back to
pending (and fails once its claims exceed `max_attempts`). Then the batch: the final figures
(SSIM, LPIPS, FID) and all re-verifications again, and the commit, in this order, each step safe
to crash after: upload the hotfix -> manifest -> checkpoint each request -> decide -> lineage lock
-> register (idempotent by batch id) -> promote -> complete each request -> purge its image.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from ray_unlearn.requests.common import (
    REQUESTS_EXPERIMENT, BatchAborted, BatchContext, Outcome, Transitions, make_holder,
)
from ray_unlearn.requests.lease import LeaseKeeper
from ray_unlearn.requests.lineage import BASE, Lineage, LineageError, parent_key
from ray_unlearn.requests.models import RequestError, RequestRecord
from ray_unlearn.requests.queue import Queue
from ray_unlearn.requests.scratch import Scratch, sweep
from ray_unlearn.storage import open_store, store_uri

logger = logging.getLogger(__name__)

__all__ = ["BatchAborted", "Outcome", "Processor", "REQUESTS_EXPERIMENT", "make_holder", "run_batch"]


class Processor:
    def __init__(self, store: str | None = None, *, tracking_uri: str | None = None, model_name: str | None = None,
                 limit: int = 8, retention: str = "delete", config_path: str | None = None,
                 overrides: list[str] = (), lease_seconds: float = 900.0, renew_seconds: float | None = None,
                 max_attempts: int = 5, holder: str | None = None, train_unproduced: bool = False,
                 scratch_root: str | None = None):
        from ray_unlearn.platform.tracking import DEFAULT_MODEL_NAME, Registry

        check_options(limit=limit, retention=retention, lease_seconds=lease_seconds, renew_seconds=renew_seconds,
                      max_attempts=max_attempts)
        self.holder = holder or make_holder()
        self.store = open_store(store_uri(store))
        self.lease_seconds = lease_seconds
        self.renew_seconds = renew_seconds or lease_seconds / 3
        # the queue's own give-up (at claim time) could fail a request that a crashed run already
        # committed; this processor gives up itself, after checking the lineage (see _triage)
        self.queue = Queue(self.store, lease_seconds=lease_seconds, max_attempts=2**31)
        self.registry = Registry(tracking_uri, model_name or DEFAULT_MODEL_NAME)
        self.tracking_uri = self.registry.uri
        self.lineage = Lineage(self.store, self.registry, self.holder)
        self.limit, self.retention, self.max_attempts = limit, retention, max_attempts
        self.config_path, self.overrides = config_path, list(overrides)
        self.train_unproduced, self.scratch_root = train_unproduced, scratch_root
        self.ctx = BatchContext(store=self.store, queue=self.queue, lineage=self.lineage, registry=self.registry,
                                holder=self.holder, tracking_uri=self.tracking_uri, limit=limit, retention=retention,
                                max_attempts=max_attempts)

    # ---- the run ------------------------------------------------------------------------------
    def run(self) -> Outcome:
        t0 = time.perf_counter()
        out = Outcome(self.holder)
        self._clean_up_after_the_dead()
        serving = self.lineage.advance()
        cfg = self.settings(serving)  # before claiming: a bad setting touches no request
        self._finish_purges()
        claimed = self.queue.claim(self.holder, self.limit)
        out.claimed_elsewhere = self._claimed_elsewhere()
        if not claimed:
            out.message = "no pending requests" + "".join(
                f"; {c['n']} request(s) are claimed by {c['holder']} whose lease expires at {c['expires_at']}"
                for c in out.claimed_elsewhere)
            return out
        logger.info("claimed %d request(s) as %s", len(claimed), self.holder)
        for c in out.claimed_elsewhere:
            logger.info("%d other request(s) are claimed by %s whose lease expires at %s", c["n"], c["holder"],
                        c["expires_at"])
        keeper = LeaseKeeper(self.queue, self.holder, [r.id for r in claimed], self.renew_seconds)
        moves = Transitions(self.ctx, keeper, out)
        try:
            with Scratch(self.holder, self.scratch_root) as scratch:
                todo = self._triage(claimed, moves)
                if todo:
                    from ray_unlearn.requests.batch import Batch, BatchSettings

                    fresh = self.lineage.advance()  # triage may have rolled a batch forward
                    if parent_key(fresh) != parent_key(serving):
                        serving, cfg = fresh, self._settings_or_abort(fresh)
                    settings = BatchSettings(cfg=cfg, serving=serving, scratch=scratch,
                                             train_unproduced=self.train_unproduced)
                    Batch(self.ctx, moves, keeper, settings, out).run(todo)
        except BatchAborted as err:
            out.status, out.message = "aborted", str(err)
            logger.warning("batch stopped, nothing shipped: %s", err)
            for rid in keeper.held_ids():
                moves.release(rid, str(err))
        finally:
            keeper.stop()
        out.wall_seconds = round(time.perf_counter() - t0, 2)
        return out

    def _clean_up_after_the_dead(self) -> None:
        """What processors that died (SIGKILL, OOM, a lost node) left behind: their scratch (the
        requesters' pictures) and their MLflow runs, still RUNNING."""
        sweep(self.scratch_root)
        from ray_unlearn.platform.batches import end_abandoned_runs

        try:
            end_abandoned_runs(self.tracking_uri, REQUESTS_EXPERIMENT, self._holder_gone)
        except Exception as err:  # tracking is evidence, not the protocol: a batch may still run
            logger.warning("could not end the MLflow runs of dead processors (%s: %s)", type(err).__name__, err)

    def _holder_gone(self, holder: str, started_ms: int) -> bool:
        """A holder on this host is gone when its process is; one elsewhere, when it holds no
        live lease and its run is older than a lease (it would have renewed by then)."""
        host, _, rest = holder.rpartition("-")[0].rpartition("-")
        pid = rest if rest.isdigit() else None
        if host == socket.gethostname()[:60] and pid is not None:
            return not _pid_alive(int(pid))
        if time.time() - started_ms / 1000 < 2 * self.lease_seconds:
            return False
        return not any(c["holder"] == holder for c in self._claimed_elsewhere())

    def _claimed_elsewhere(self) -> list[dict]:
        """Live leases of other holders, grouped: who holds how many requests, until when."""
        now, by = datetime.now(timezone.utc), {}
        for rec in self.queue.list("claimed"):
            if rec.lease_holder != self.holder and rec.lease_expires_at and rec.lease_expires_at > now:
                by.setdefault(rec.lease_holder, []).append(rec.lease_expires_at)
        return [{"holder": h, "n": len(t), "expires_at": max(t).isoformat(timespec="seconds")}
                for h, t in sorted(by.items())]

    # ---- settings ---------------------------------------------------------------------------------
    def settings(self, serving):
        """--config / --set over the serving version's stored settings (else the built-in
        defaults); a ConfigError names what is wrong."""
        from ray_unlearn.config import ConfigError, load_config

        base = None
        if self.config_path is None:
            stored = stored_config(self.ctx, serving)
            if stored:
                base = {k: v for k, v in stored.items() if k not in ("targets", "cache_dir")}
                logger.info("settings: those of version %s (override with --config / --set)", serving.version)
        cfg = load_config(self.config_path, self.overrides, base=base)
        if cfg.targets:
            raise ConfigError("a batch's targets are its requests: remove `targets` from the config")
        check_continual(cfg)
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
    def _triage(self, claimed: list[RequestRecord], moves: Transitions) -> list[RequestRecord]:
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
                self.lineage.advance()
                m = self.lineage.manifest(committed)
                v = self.registry.register(m["hotfix"], run_id=m.get("run_id"), tags=m["tags"],
                                           idempotency_key=committed)
                moves.complete(rec.id, m["evidence"][rec.id], v.version, recovered=True)
            elif rec.attempts > self.max_attempts:
                last = (rec.evidence.get("last_attempt") or {}).get("reason")
                why = f"gave up after {rec.attempts - 1} attempts" + (f"; the last: {last}" if last else
                                                                       " (the processor died or lost the lease each time)")
                moves.fail(rec.id, why)
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

    def _finish_purges(self) -> None:
        """A run that died between `complete` and `purge_image` left an image behind: delete it."""
        for rec in self.queue.list("done"):
            if rec.image_key is not None and rec.evidence.get("retention") == "delete":
                self.queue.purge_image(rec.id)


_CHECKED = ("limit", "retention", "lease_seconds", "renew_seconds", "max_attempts")


def check_options(*, limit: int = 8, retention: str = "delete", lease_seconds: float = 900.0,
                  renew_seconds: float | None = None, max_attempts: int = 5) -> None:
    """The processor's options, checked before anything is read or claimed (RequestError: usage)."""
    if retention not in ("delete", "keep"):
        raise RequestError(f"--retention must be 'delete' or 'keep', got {retention!r}")
    if not 1 <= limit <= 300:  # the version's `requests` tag holds the ids (MLflow: 8000 chars)
        raise RequestError(f"--limit must be between 1 and 300, got {limit}")
    if max_attempts < 1:
        raise RequestError(f"--max-attempts must be at least 1, got {max_attempts}: with 0 every claimed request "
                           "would fail without being tried")
    renew = renew_seconds if renew_seconds is not None else lease_seconds / 3
    if not lease_seconds > 0 or not renew > 0:
        raise RequestError(f"--lease-seconds ({lease_seconds}) and the renewal period ({renew}) must be positive")
    if lease_seconds <= renew:
        raise RequestError(f"--lease-seconds ({lease_seconds}) must be longer than the renewal period "
                           f"--renew-seconds ({renew}), three times is safe: a lease that runs out between two "
                           "renewals is lost and the batch ships nothing")


def check_continual(cfg) -> None:
    """The continual settings a batch can run (ConfigError: what to change)."""
    from ray_unlearn.config import ConfigError

    c = cfg.continual
    if c.strategy == "sequential" and c.pull > 0:
        raise ConfigError("continual.pull applies to the anchored, joint and merge strategies; sequential is the "
                          "unregularised reference: set continual.pull=0 or another continual.strategy")
    if c.strategy in ("joint", "merge") and cfg.model.family != "ddpm":
        raise ConfigError(f"continual.strategy={c.strategy} rebuilds the hotfix from the base model's weights, which "
                          f"is implemented for the ddpm family only (model.family={cfg.model.family}): use "
                          "continual.strategy=anchored")
    if c.strategy == "merge" and c.together:
        raise ConfigError("continual.together trains a batch's requests in one training, but merge keeps one delta "
                          "per request, trained alone: set continual.together=false, or use continual.strategy=anchored "
                          "or joint (joint always trains together)")
    if c.replay_as == "hold" and cfg.method.name == "siss":
        raise ConfigError("continual.replay_as=hold adds hold samples to the remember term, which SISS's "
                          "importance-weighted loss does not have: set continual.replay_as=forget, or another method")
    lora = cfg.model.lora is not None or (cfg.model.family == "sd3" and not cfg.model.sd3.full_finetune)
    if c.strategy == "anchored" and c.pull > 0 and lora:
        raise ConfigError("continual.pull under anchored pulls the trained weights toward the original base's, which "
                          "needs full-weight training (a LoRA's parameters are not the base's): unset model.lora "
                          "(sd3: model.sd3.full_finetune=true), or use continual.strategy=joint or merge, whose "
                          "adapters start from the base")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def stored_config(ctx: BatchContext, serving) -> dict | None:
    """The settings the serving version was made with: its `config_uri` tag (a batch's config in
    the store), else the config in its MLflow run's report.json (a search or `unlearn` run)."""
    if serving is None:
        return None
    uri = serving.tags.get("config_uri")
    if uri:
        root = ctx.store.uri()
        key = uri[len(root):].lstrip("/") if uri.startswith(root) else None
        if key is None:
            raise LineageError(f"version {serving.version}'s config_uri {uri} is outside the store {root}")
        return ctx.store.get_json(key)
    if serving.run_id:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = ctx.registry.client.download_artifacts(serving.run_id, "report.json", tmp)
                return json.loads(Path(path).read_text()).get("config")
        except Exception:  # no report logged with that run: the built-in defaults apply
            return None
    return None


def run_batch(*, store: str | None = None, gpu: bool = False, **options) -> Outcome:
    """One batch, in this process or (gpu=True) as a Ray task that holds one GPU."""
    if not gpu:
        return Processor(store, **options).run()
    check_options(**{k: v for k, v in options.items() if k in _CHECKED})  # here, not after Ray started
    from ray_unlearn.platform.batches import run_on_gpu

    out, gpus = run_on_gpu(_process_in_worker, store_uri(store), options)
    out.gpus = gpus  # evidence of where it ran
    return out


def _process_in_worker(store: str, options: dict) -> Outcome:
    return Processor(store, **options).run()
