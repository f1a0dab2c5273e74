"""What the processor, a batch and the lease keeper share: the outcome of a run, the batch's
context, the queue transitions a batch may make, and the one clock. Nothing here imports the
other request modules' processing code, so batch -> process -> lease cannot form a cycle."""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ray_unlearn.exit_codes import ExitCode
from ray_unlearn.requests.models import BatchAborted, LeaseLost, RequestRecord, now_iso  # noqa: F401 (re-exported)

if TYPE_CHECKING:  # types only: no import at run time
    from ray_unlearn.requests.lease import LeaseKeeper
    from ray_unlearn.requests.lineage import Lineage
    from ray_unlearn.requests.queue import Queue
    from ray_unlearn.storage import Store

logger = logging.getLogger(__name__)

REQUESTS_EXPERIMENT = "ray-unlearn-requests"


def make_holder() -> str:
    return f"{socket.gethostname()[:60]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


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
    claimed_elsewhere: list[dict] = field(default_factory=list)  # {holder, expires_at, n}: live leases of others

    @property
    def exit_code(self) -> int:
        """The highest that applies (see ray_unlearn.exit_codes)."""
        results = {r["result"] for r in self.requests}
        if "returned" in results or self.status == "aborted":
            return int(ExitCode.GATE_REFUSED)
        if results & {"failed", "not_produced"}:
            return int(ExitCode.REQUEST_FAILED)
        return int(ExitCode.OK)

    def add(self, rid: str, result: str, reason: str | None = None, **extra) -> None:
        self.requests.append({"id": rid, "result": result, "reason": reason, **extra})

    def public(self) -> dict:
        return {**asdict(self), "exit_code": self.exit_code}


@dataclass
class BatchContext:
    """What a batch needs from the processor that runs it, passed in (a batch never reaches into
    the processor)."""

    store: Store
    queue: Queue
    lineage: Lineage
    registry: Any  # ray_unlearn.platform.tracking.Registry
    holder: str
    tracking_uri: str
    limit: int
    retention: str
    max_attempts: int


class Transitions:
    """The queue transitions of the requests one run holds, each dropping the request from the
    lease keeper first (so that a renewal racing the transition is not taken for a lost lease)
    and recording the result in the outcome. A LeaseLost here is logged and skipped: someone
    else holds the request now."""

    def __init__(self, ctx: BatchContext, keeper: LeaseKeeper, out: Outcome):
        self.ctx, self.keeper, self.out = ctx, keeper, out

    def complete(self, rid: str, evidence: dict, version: int, recovered: bool = False) -> None:
        ctx = self.ctx
        self.keeper.drop(rid)
        evidence = {**evidence, "versions": {**evidence.get("versions", {}), "new": version},
                    "times": {**evidence.get("times", {}), "completed_at": now_iso()}, "retention": ctx.retention}
        try:
            ctx.queue.complete(rid, ctx.holder, evidence)
        except LeaseLost as err:  # the batch is committed: whoever retook it completes it
            logger.warning("%s: %s", rid, err)
            return
        if ctx.retention == "delete":
            ctx.queue.purge_image(rid)
        note = " (finished a crashed run's committed batch)" if recovered else ""
        logger.info("%s: done in version %s%s; image %s", rid, version, note,
                    "purged" if ctx.retention == "delete" else "kept")
        self.out.add(rid, "done", None, version=version, recovered=recovered)

    def fail(self, rid: str, reason: str, **extra) -> None:
        self.keeper.drop(rid)
        try:
            figures = {"last_attempt": {"holder": self.ctx.holder, "at": now_iso(), "reason": reason[:1500], **extra}}
            self.ctx.queue.fail(rid, self.ctx.holder, reason[:1900], evidence=figures if extra else None)
        except LeaseLost as err:
            logger.warning("%s: %s", rid, err)
            return
        logger.warning("%s: FAILED: %s", rid, reason)
        self.out.add(rid, "failed", reason, **extra)

    def not_produced(self, rid: str, reason: str, evidence: dict) -> None:
        self.keeper.drop(rid)
        try:
            self.ctx.queue.not_produced(rid, self.ctx.holder, reason[:1900], evidence)
        except LeaseLost as err:
            logger.warning("%s: %s", rid, err)
            return
        logger.warning("%s: NOT PRODUCED: %s", rid, reason)
        self.out.add(rid, "not_produced", reason, sscd_base=evidence.get("sscd_base"))

    def release(self, rid: str, reason: str, evidence: dict | None = None) -> None:
        ctx = self.ctx
        self.keeper.drop(rid)
        try:
            ctx.queue.checkpoint(rid, ctx.holder, {"last_attempt": {"holder": ctx.holder, "at": now_iso(),
                                                                    "reason": reason[:1500], **(evidence or {})}})
            ctx.queue.release(rid, ctx.holder)
        except LeaseLost as err:
            logger.warning("%s: %s", rid, err)
            return
        logger.warning("%s: returned to pending: %s", rid, reason)
        self.out.add(rid, "returned", reason)

    def release_or_fail(self, rec: RequestRecord, reason: str, evidence: dict | None = None) -> None:
        if rec.attempts >= self.ctx.max_attempts:
            self.fail(rec.id, f"{reason} (attempt {rec.attempts} of {self.ctx.max_attempts})", **(evidence or {}))
        else:
            self.release(rec.id, reason, evidence)
