"""Which batch of deletion requests is applied on top of which model version: the commit protocol.

A batch B unlearns its requests on top of the serving version P (or the base model, P = "base")
and, when every gate passes, becomes P's successor. MLflow aliases have no compare-and-set, so the
decisions live in the store, each one a `put_if_absent` (exactly one writer wins):

    batches/<B>/manifest.json   everything needed to finish B without it: hotfix URI, parent P,
                                requests, their evidence, registry tags, config (written first)
    batches/<B>/decision.json   "commit" (B's processor, once every request is checkpointed with B)
                                or "abort" (a processor that retook one of B's requests first)
    lineage/<model>/<P>.json    P's one successor batch: the commit point
    batches/<B>/promoted.json   written after the alias moved to B's version

Why the decision object (the lead's draft had only the lineage lock): a request is checkpointed
with B before B commits. If B's processor loses a lease and another processor retakes the request,
"lock absent -> redo it" races with B's processor still taking the lock a moment later, and the
request would be applied twice (or failed in the ledger but applied in the registry). The retaker
therefore settles B first: it writes "abort" unless "commit" is already there, and a committed
decision is rolled forward by whoever sees it (anyone may take P's lock for B: B's manifest and
hotfix are complete before its decision). A request's whole checkpoint history is consulted, not
only its latest checkpoint, because a later (losing) batch overwrites the latest one.

Invariant: a batch is registered only after it holds its parent's lineage lock, so the registered
versions form one chain from "base"; the alias is moved only forward along it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from ray_unlearn.requests.models import now_iso
from ray_unlearn.storage import NotFoundError, Store

logger = logging.getLogger(__name__)

BASE = "base"


class LineageError(RuntimeError):
    """The registry and the lineage disagree in a way only an operator can resolve."""


def parent_key(version) -> str:
    """The lineage name of a serving version (None: the base model)."""
    return BASE if version is None else str(version.version)


@dataclass
class Settled:
    batch: str
    committed: bool
    why: str


class Lineage:
    def __init__(self, store: Store, registry, holder: str):
        self.store, self.registry, self.holder = store, registry, holder
        self.model = registry.name

    # ---- keys ---------------------------------------------------------------------------------
    def lock_key(self, parent: str) -> str:
        return f"lineage/{self.model}/{parent}.json"

    @staticmethod
    def manifest_key(batch: str) -> str:
        return f"batches/{batch}/manifest.json"

    @staticmethod
    def _decision_key(batch: str) -> str:
        return f"batches/{batch}/decision.json"

    @staticmethod
    def _promoted_key(batch: str) -> str:
        return f"batches/{batch}/promoted.json"

    def _read(self, key: str) -> dict | None:
        try:
            return self.store.get_json(key)
        except NotFoundError:
            return None

    def _create(self, key: str, obj: dict) -> dict:
        """put_if_absent, then whatever is there (ours or the winner's)."""
        self.store.put_if_absent(key, json.dumps(obj, indent=2, sort_keys=True).encode())
        return self.store.get_json(key)

    # ---- reading ------------------------------------------------------------------------------
    def manifest(self, batch: str) -> dict:
        m = self._read(self.manifest_key(batch))
        if m is None:
            raise LineageError(f"batch {batch} holds a lineage lock but has no manifest "
                               f"({self.store.uri(self.manifest_key(batch))}): the store lost an object")
        return m

    def successor(self, parent: str) -> str | None:
        lock = self._read(self.lock_key(parent))
        return None if lock is None else lock["batch"]

    # ---- writing (B's own processor) ------------------------------------------------------------
    def write_manifest(self, batch: str, manifest: dict) -> None:
        self.store.put_json(self.manifest_key(batch), manifest)

    def decide_commit(self, batch: str) -> bool:
        """True: B is decided (no retaker aborted it first); nothing can undo that."""
        d = self._create(self._decision_key(batch), {"decision": "commit", "by": self.holder, "at": now_iso()})
        return d["decision"] == "commit"

    def take_lock(self, parent: str, batch: str) -> bool:
        """The commit point: True when B is (now or already) P's one successor."""
        lock = self._create(self.lock_key(parent), {"batch": batch, "by": self.holder, "at": now_iso()})
        return lock["batch"] == batch

    # ---- settling another processor's batch -----------------------------------------------------
    def settle(self, batch: str, parent: str) -> Settled:
        """Decide a batch found in a retaken request's checkpoints: committed (finish it, do not
        redo the request) or not (it can never commit now; redo the request)."""
        d = self._read(self._decision_key(batch))
        if d is None:
            d = self._create(self._decision_key(batch), {"decision": "abort", "by": self.holder, "at": now_iso()})
        if d["decision"] != "commit":
            return Settled(batch, False, f"batch {batch} was aborted before it committed")
        if self._read(self.manifest_key(batch)) is None:  # commit is only ever decided after the manifest
            raise LineageError(f"batch {batch} is decided but has no manifest: the store lost an object")
        if self.take_lock(parent, batch):  # roll the decided batch forward (no-op when it already holds it)
            return Settled(batch, True, f"batch {batch} committed on {parent}")
        return Settled(batch, False, f"batch {batch} lost {parent} to batch {self.successor(parent)}")

    # ---- the alias follows the lineage ----------------------------------------------------------
    def advance(self):
        """Register and promote committed successors of the serving version until it is the tip;
        returns the serving Version (None: nothing registered yet, the base model serves)."""
        serving = self.registry.serving()
        moved_by_us: set[int] = set()
        for _ in range(1000):
            parent = parent_key(serving)
            batch = self.successor(parent)
            if batch is None:
                return serving
            if self.store.exists(self._promoted_key(batch)):
                fresh = self.registry.serving()
                if parent_key(fresh) != parent:
                    serving = fresh  # another processor moved it on meanwhile
                    continue
                if serving is None or serving.version not in moved_by_us:
                    raise LineageError(
                        f"the alias of {self.model} points at {parent}, but batch {batch} was built on it and "
                        f"its version was promoted before: the alias was moved back by hand (or a processor "
                        f"died while moving it). Move the alias to the newest version of the lineage "
                        f"(lineage/{self.model}/ in the store) before processing more requests; building on "
                        f"{parent} again would drop the requests that batch applied.")
            m = self.manifest(batch)
            v = self.registry.register(m["hotfix"], run_id=m.get("run_id"), tags=m["tags"], idempotency_key=batch)
            if parent_key(self.registry.serving()) == parent:  # never move the alias backwards
                self.registry.promote(v.version)
                moved_by_us.add(v.version)
                logger.info("alias '%s' -> version %s (batch %s, on %s)", self._alias(), v.version, batch, parent)
            self.store.put_json(self._promoted_key(batch), {"version": v.version, "by": self.holder, "at": now_iso()})
            serving = self.registry.serving()
        raise LineageError(f"the lineage of {self.model} did not reach its tip in 1000 steps")

    def _alias(self) -> str:
        from ray_unlearn.platform.tracking import SERVING_ALIAS

        return SERVING_ALIAS

    def chain(self) -> list:
        """Registered versions from the serving one back to the base, newest first (by
        `parent_version` tags): what the ledger's done requests must equal."""
        out, v, seen = [], self.registry.serving(), set()
        while v is not None and v.version not in seen:
            seen.add(v.version)
            out.append(v)
            parent = v.tags.get("parent_version")
            v = None if parent in (None, BASE) else self.registry.get(parent)
        return out
