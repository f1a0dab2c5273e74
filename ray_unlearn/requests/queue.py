"""The durable deletion-request queue, on any `Store` (local folder or S3).

Layout under `prefix` (default 'requests'):
    <id>/image.png                the normalised image (deleted by purge_image)
    <id>/events/<seq:08d>.json    the request's ledger: one immutable object per transition,
                                  each holding the full record after it
    _open/<id>                    empty marker while the request is pending or claimed (an index
                                  so that claiming does not read every request ever made)

Protocol. A request's state is its highest-numbered event. Every transition (submit, claim or
claim_ids, renew, checkpoint, release, complete, fail, invalid, purge) reads the head event `seq`
and creates event `seq+1` with `put_if_absent`, the store's atomic create-if-not-exists (O_EXCL-like link locally,
PUT If-None-Match:* on S3). Of two writers that read the same head, exactly one creates `seq+1`;
the other re-reads and re-decides, so a claim is a lock object per request per attempt, and a
late `complete` from a holder whose lease was retaken can never overwrite the new claim (it gets
LeaseLost). Nothing is ever read-modified-written in place, which is what makes it safe on S3.

Crash safety (a process may die between any two writes):
  submit: marker, then image, then event 1. Dying before event 1 leaves no request (submitting the
      same picture again completes it); the marker and image left behind are ignored.
  claim / renew / checkpoint / release: one write each, atomic.
  complete / fail / invalid: the event, then the marker is deleted; a marker left behind is
      deleted by the next claim, which sees the terminal head.
  purge_image: the image is deleted first, then the event, so a crash never leaves a record
      claiming the image is gone while it is still stored; purging again finishes the job.
  A holder that dies keeps its lease until lease_expires_at; then any claim retakes it (attempt
  n+1). After `max_attempts` claims whose leases all ran out, the request is failed, not retried.

Leases are judged by the claimer's clock: keep processors' clocks in sync (NTP) and leases much
longer than any skew. Ownership is decided by the event log, not the clock: an expired lease that
nobody has retaken still lets its holder renew or complete.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

from ray_unlearn.requests.images import DEFAULT_FORMATS, normalise_image
from ray_unlearn.requests.models import (
    ID_RE, REQUEUABLE, TERMINAL, LeaseLost, RequestError, RequestNotFound, RequestRecord,
    check_holder, check_id, check_note, check_prompt, check_reason, check_seed, check_state,
)
from ray_unlearn.storage import Store, StorageError, check_key

_EVENT_RE = re.compile(r"(?:^|/)(req-[0-9a-f]{16})/events/(\d{8})\.json$")
_RETRIES = 20  # re-reads after losing a race to another writer of the same request
# Pictures larger than this on a side are downscaled at the door (aspect kept; the original's hash
# is recorded): above the largest resolution the shipped families train at (Stable Diffusion XL:
# 1024 px), so a request never costs a batch more than that. Set it to your model's size.
DEFAULT_MAX_SIDE = 1024


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Queue:
    def __init__(self, store: Store, *, prefix: str = "requests", max_bytes: int = 20_000_000,
                 max_side: int = DEFAULT_MAX_SIDE, allowed_formats=DEFAULT_FORMATS, lease_seconds: float = 900.0,
                 max_attempts: int = 5, clock: Callable[[], datetime] | None = None):
        if lease_seconds <= 0 or max_attempts < 1 or max_bytes < 1 or max_side < 1:
            raise ValueError("lease_seconds, max_attempts, max_bytes and max_side must be positive")
        self.store = store
        self.prefix = check_key(prefix.strip("/"))
        self.max_bytes, self.max_side = max_bytes, max_side
        self.allowed_formats = frozenset(f.upper() for f in allowed_formats)
        self.lease = timedelta(seconds=lease_seconds)
        self.max_attempts = max_attempts
        self._clock = clock or _utcnow

    # ---- keys -------------------------------------------------------------------------------
    def _events(self, rid: str) -> str:
        return f"{self.prefix}/{rid}/events/"

    def _event_key(self, rid: str, seq: int) -> str:
        return f"{self._events(rid)}{seq:08d}.json"

    def _open_key(self, rid: str) -> str:
        return f"{self.prefix}/_open/{rid}"

    # ---- reading ----------------------------------------------------------------------------
    def _head(self, rid: str) -> tuple[int, RequestRecord] | None:
        keys = [k for k in self.store.list(self._events(rid)) if _EVENT_RE.search(k)]
        if not keys:
            return None
        event = self.store.get_json(max(keys))
        return event["seq"], RequestRecord.model_validate(event["record"])

    def _require(self, rid: str) -> tuple[int, RequestRecord]:
        head = self._head(check_id(rid))
        if head is None:
            raise RequestNotFound(f"no request {rid} in {self.store.uri(self.prefix)} (see `requests list`)")
        return head

    def get(self, request_id: str) -> RequestRecord:
        return self._require(request_id)[1]

    def list(self, state: str | None = None) -> list[RequestRecord]:
        check_state(state)
        if state in ("pending", "claimed"):
            ids = self._open_ids()
        else:
            ids = sorted({m.group(1) for k in self.store.list(self.prefix + "/") if (m := _EVENT_RE.search(k))})
        records = [head[1] for rid in ids if (head := self._head(rid)) is not None]
        return sorted((r for r in records if state is None or r.state == state), key=lambda r: (r.created_at, r.id))

    def ledger(self, request_id: str | None = None) -> list[dict]:
        """Every transition, oldest first: one request's in event order, or all requests' by time."""
        if request_id is not None:
            self._require(request_id)
            return [self.store.get_json(k) for k in self.store.list(self._events(request_id)) if _EVENT_RE.search(k)]
        events = [self.store.get_json(k) for k in self.store.list(self.prefix + "/") if _EVENT_RE.search(k)]
        return sorted(events, key=lambda e: (e["at"], e["id"], e["seq"]))

    def read_image(self, request_id: str) -> bytes:
        """The normalised PNG (RGB or L) of a request."""
        rec = self.get(request_id)
        if rec.image_key is None:
            raise RequestError(f"{rec.id}: its image was purged; only the record and evidence remain")
        return self.store.get_bytes(rec.image_key)

    def _open_ids(self) -> list[str]:
        base = self._open_key("")
        return [k[len(base):] for k in self.store.list(base) if ID_RE.fullmatch(k[len(base):])]

    # ---- writing ----------------------------------------------------------------------------
    def _append(self, seq: int, before: RequestRecord | None, after: RequestRecord, event: str,
                holder: str | None = None, reason: str | None = None) -> bool:
        entry = {"id": after.id, "seq": seq + 1, "at": after.updated_at.isoformat(timespec="microseconds"), "event": event,
                 "from": before.state if before else None, "to": after.state, "holder": holder,
                 "reason": reason, "record": after.public()}
        data = json.dumps(entry, indent=2, sort_keys=True).encode()
        if not self.store.put_if_absent(self._event_key(after.id, seq + 1), data):
            return False
        if after.state in TERMINAL:
            self.store.delete(self._open_key(after.id))
        return True

    def _update(self, rid: str, event: str, change: Callable[[RequestRecord, datetime], dict | None],
                holder: str | None = None, reason: str | None = None) -> RequestRecord:
        for _ in range(_RETRIES):
            seq, rec = self._require(rid)
            now = self._clock()
            fields = change(rec, now)  # raises when the transition is not allowed; None: nothing to do
            if fields is None:
                return rec
            new = rec.model_copy(update={**fields, "updated_at": now})
            if self._append(seq, rec, new, event, holder, reason):
                return new
        raise StorageError(f"{rid}: the request kept changing while we tried to {event} it; try again")

    def submit(self, image: str | Path | bytes, seed: int | None = None, note: str | None = None,
               prompt: str | None = None) -> tuple[RequestRecord, bool]:
        """Check, normalise and store a request; (the existing request, False) for a picture already submitted.
        `prompt`: the text that produced the picture, for a text-to-image model (sd3)."""
        seed, note, prompt = check_seed(seed), check_note(note), check_prompt(prompt)
        img = normalise_image(self._read(image), max_bytes=self.max_bytes, max_side=self.max_side,
                              allowed_formats=self.allowed_formats)
        rid = "req-" + img.sha256[:16]
        for _ in range(2):
            head = self._head(rid)
            if head is not None:
                if head[1].content_sha256 != img.sha256:  # 64-bit prefix collision: never merge two pictures
                    raise RequestError(f"{rid} already names a different picture; crop or re-encode yours and resubmit")
                return head[1], False
            now = self._clock()
            rec = RequestRecord(id=rid, content_sha256=img.sha256, seed=seed, note=note, prompt=prompt, width=img.width,
                                height=img.height, mode=img.mode, source_format=img.source_format,
                                created_at=now, updated_at=now, image_key=f"{self.prefix}/{rid}/image.png",
                                original_sha256=img.original_sha256, original_size=img.original_size)
            self.store.put_bytes(self._open_key(rid), b"")  # indexed before it exists: never unlisted
            self.store.put_bytes(rec.image_key, img.png)
            if self._append(0, None, rec, "submit"):
                return rec, True
        raise StorageError(f"{rid}: could not read the request that a concurrent submit created; try again")

    def _read(self, image: str | Path | bytes) -> bytes:
        if isinstance(image, (bytes, bytearray, memoryview)):
            return bytes(image)
        path = Path(image)
        if path.is_dir():
            raise RequestError(f"{path} is a directory: give the image file inside it")
        if not path.is_file():
            raise RequestError(f"image not found: {path}")
        if path.stat().st_size > self.max_bytes:  # before reading it into memory
            raise RequestError(f"{path} is {path.stat().st_size:,} bytes; the limit is {self.max_bytes:,}: send a smaller file")
        return path.read_bytes()

    def claim(self, holder: str, limit: int) -> list[RequestRecord]:
        """Up to `limit` requests, oldest first: pending ones and claimed ones whose lease ran out."""
        holder = check_holder(holder)
        if limit < 1:
            raise RequestError(f"claim limit must be at least 1, got {limit}")
        return self._claim(holder, self._open_ids(), limit)

    def claim_ids(self, holder: str, ids: list[str]) -> list[RequestRecord]:
        """The named requests, by the rules of `claim` (pending, or claimed with a lease that ran
        out; each a lock object per attempt; given up after `max_attempts`). A request that is not
        claimable (done, failed, invalid, or under a live lease) is left as it is and not returned:
        `get` it to see why. For a job that works on one known request, e.g. `ray-unlearn demo`."""
        holder = check_holder(holder)
        ids = list(dict.fromkeys(check_id(rid) for rid in ids))
        return self._claim(holder, ids, len(ids)) if ids else []

    def _claim(self, holder: str, ids: list[str], limit: int) -> list[RequestRecord]:
        now = self._clock()
        candidates = []
        for rid in ids:
            head = self._head(rid)
            if head is None:
                continue  # a submit in progress, or one that died before its first event
            seq, rec = head
            if rec.state in TERMINAL:
                self.store.delete(self._open_key(rid))  # finish a terminal transition that crashed
            elif rec.state == "pending" or rec.lease_expires_at <= now:
                candidates.append((rec.created_at, rid, seq, rec))
        out: list[RequestRecord] = []
        for _, rid, seq, rec in sorted(candidates, key=lambda c: (c[0], c[1])):
            if len(out) >= limit:
                break
            if rec.state == "claimed" and rec.attempts >= self.max_attempts:
                why = f"gave up after {rec.attempts} claims whose leases ran out (last holder {rec.lease_holder})"
                gave_up = rec.model_copy(update={"state": "failed", "reason": why, "lease_holder": None,
                                                 "lease_expires_at": None, "updated_at": now})
                self._append(seq, rec, gave_up, "give_up", reason=why)
                continue
            new = rec.model_copy(update={"state": "claimed", "lease_holder": holder, "lease_expires_at": now + self.lease,
                                         "attempts": rec.attempts + 1, "updated_at": now})
            if self._append(seq, rec, new, "claim", holder):  # False: another processor got there first
                out.append(new)
        return out

    def _held(self, holder: str) -> Callable[[RequestRecord], None]:
        holder = check_holder(holder)

        def check(rec: RequestRecord) -> None:
            if rec.state != "claimed" or rec.lease_holder != holder:
                raise LeaseLost(f"{rec.id}: '{holder}' does not hold its lease (state {rec.state}, holder "
                                f"{rec.lease_holder!r}): stop working on it and do not apply its result")
        return check

    def renew(self, request_id: str, holder: str) -> RequestRecord:
        check = self._held(holder)

        def change(rec, now):
            check(rec)
            return {"lease_expires_at": now + self.lease}
        return self._update(request_id, "renew", change, holder)

    def checkpoint(self, request_id: str, holder: str, evidence: dict) -> RequestRecord:
        """Merge evidence into a claimed request, fenced like a transition: when it returns, any
        later claimer will see it; when it raises LeaseLost, someone else may already hold it."""
        check, evidence = self._held(holder), _json_dict(evidence)

        def change(rec, now):
            check(rec)
            return {"evidence": {**rec.evidence, **evidence}}
        return self._update(request_id, "checkpoint", change, holder)

    def complete(self, request_id: str, holder: str, evidence: dict) -> RequestRecord:
        check, evidence = self._held(holder), _json_dict(evidence)

        def change(rec, now):
            check(rec)
            return {"state": "done", "evidence": {**rec.evidence, **evidence}, "lease_holder": None,
                    "lease_expires_at": None, "reason": None}
        return self._update(request_id, "complete", change, holder)

    def fail(self, request_id: str, holder: str, reason: str, evidence: dict | None = None) -> RequestRecord:
        """Terminal; `evidence` (the figures that made it fail) is merged into the record's."""
        check, reason = self._held(holder), check_reason(reason)
        evidence = _json_dict(evidence) if evidence is not None else {}

        def change(rec, now):
            check(rec)
            return {"state": "failed", "reason": reason, "evidence": {**rec.evidence, **evidence},
                    "lease_holder": None, "lease_expires_at": None}
        return self._update(request_id, "fail", change, holder, reason)

    def release(self, request_id: str, holder: str) -> RequestRecord:
        """Give a claimed request back, untouched, for another claim (e.g. on shutdown)."""
        check = self._held(holder)

        def change(rec, now):
            check(rec)
            return {"state": "pending", "lease_holder": None, "lease_expires_at": None}
        return self._update(request_id, "release", change, holder)

    def mark_invalid(self, request_id: str, reason: str) -> RequestRecord:
        """An operator's verdict; it ends any lease (its holder then gets LeaseLost)."""
        reason = check_reason(reason)

        def change(rec, now):
            if rec.state == "done":
                raise RequestError(f"{rec.id} is done (its removal is applied); it cannot become invalid")
            if rec.state == "invalid" and rec.reason == reason:
                return None
            return {"state": "invalid", "reason": reason, "lease_holder": None, "lease_expires_at": None}
        return self._update(request_id, "invalid", change, reason=reason)

    def not_produced(self, request_id: str, holder: str, reason: str, evidence: dict) -> RequestRecord:
        """The model does not generate the picture: nothing to remove (terminal, with the figures)."""
        check, reason, evidence = self._held(holder), check_reason(reason), _json_dict(evidence)

        def change(rec, now):
            check(rec)
            return {"state": "not_produced", "reason": reason, "evidence": {**rec.evidence, **evidence},
                    "lease_holder": None, "lease_expires_at": None}
        return self._update(request_id, "not_produced", change, holder, reason)

    def requeue(self, request_id: str, reason: str, *, train_anyway: bool = False) -> RequestRecord:
        """An operator's decision: a failed or not_produced request goes back to pending, its
        attempts counted afresh, on the ledger with the reason. `train_anyway`: the next batch
        trains on it although the model does not produce it (the override is kept on the record)."""
        reason = check_reason(reason)

        def change(rec, now):
            if rec.state not in REQUEUABLE:
                raise RequestError(f"{rec.id} is {rec.state}: only failed or not_produced requests can be requeued")
            if rec.image_key is None:
                raise RequestError(f"{rec.id}: its image was purged, so there is nothing to train on; "
                                   "ask the requester to submit the picture again after marking this one invalid")
            fields = {"state": "pending", "attempts": 0, "reason": None, "lease_holder": None, "lease_expires_at": None}
            if train_anyway:
                fields["produced_override"] = reason
            return fields

        # back in the index of open requests: before (a crash after the event leaves it indexed) and
        # after (a claim that saw the terminal head meanwhile deleted the first marker)
        self.store.put_bytes(self._open_key(check_id(request_id)), b"")
        rec = self._update(request_id, "requeue", change, reason=reason)
        self.store.put_bytes(self._open_key(rec.id), b"")
        return rec

    def purge_image(self, request_id: str) -> RequestRecord:
        """Delete the stored image of a finished request; its record, evidence and ledger stay."""
        _, rec = self._require(request_id)
        if rec.state not in TERMINAL:
            raise RequestError(f"{rec.id} is {rec.state}; its image is still needed: purge it once it is done, "
                               "failed or invalid (or mark it invalid first)")
        self.store.delete(f"{self.prefix}/{rec.id}/image.png")  # first: a crash never leaves it behind

        def change(rec, now):
            return None if rec.image_key is None else {"image_key": None}
        return self._update(request_id, "purge_image", change)


def duplicate_notice(rec: RequestRecord, seed: int | None, note: str | None, prompt: str | None = None) -> str | None:
    """What a resubmission of an already queued picture did not change (None: nothing differs)."""
    parts = []
    seed, note, prompt = check_seed(seed), check_note(note), check_prompt(prompt)
    if prompt is not None and prompt != rec.prompt:
        parts.append(f"kept the first submission's prompt {rec.prompt!r} (this one gave {prompt!r})")
    if seed is not None and seed != rec.seed:
        parts.append(f"kept the first submission's seed {rec.seed} (this one gave {seed})")
    if note is not None and note != rec.note:
        parts.append("kept the first submission's note" + (f" {rec.note[:60]!r}" if rec.note else " (none)")
                     + "; this one's was not stored")
    if not parts:
        return None
    return "; ".join(parts)


def _json_dict(evidence: dict) -> dict:
    if not isinstance(evidence, dict):
        raise RequestError(f"evidence must be a dict, got {type(evidence).__name__}")
    try:
        return json.loads(json.dumps(evidence))  # a copy, and a clear error now rather than at write
    except (TypeError, ValueError) as err:
        raise RequestError(f"evidence must be JSON-serialisable: {err}") from None
