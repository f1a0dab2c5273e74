"""The deletion-request record, its errors, and checks on what callers hand in (ids, notes, holders)."""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

State = Literal["pending", "claimed", "done", "failed", "not_produced", "invalid"]
STATES: tuple[str, ...] = ("pending", "claimed", "done", "failed", "not_produced", "invalid")
# not_produced: the model does not generate the picture (base SSCD below the threshold): nothing to remove
TERMINAL = frozenset({"done", "failed", "not_produced", "invalid"})
REQUEUABLE = frozenset({"failed", "not_produced"})
ID_RE = re.compile(r"req-[0-9a-f]{16}")  # always used with fullmatch
NOTE_MAX = 1000
REASON_MAX = 2000
HOLDER_MAX = 200
# A prompt is kept verbatim (it conditions the model); SD3's encoders read at most 77 CLIP + 256 T5 tokens.
PROMPT_MAX = 2000
SEED_MAX = 2**63 - 1
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def now_iso() -> str:
    """The one timestamp format of the request path's records (UTC, milliseconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class RequestError(ValueError):
    """A request, id or argument that cannot be accepted; the message says what to do instead."""


class RequestNotFound(RequestError, KeyError):
    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else "request not found"


class BatchAborted(RuntimeError):
    """The batch stops and ships nothing (a lease was lost, the lineage moved, a gate failed)."""


class LeaseLost(RuntimeError):
    """The caller no longer holds the request's lease (another processor took it, or it ended).

    Whoever gets this must stop working on the request and must not apply its result.
    """


class RequestRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="'req-' + first 16 hex digits of content_sha256.")
    content_sha256: str = Field(description="sha256 of the normalised pixels (mode, size, bytes).")
    state: State = "pending"
    seed: int | None = Field(None, description="Seed of the base-model output, when the requester knows it.")
    prompt: str | None = Field(None, description="The prompt that produced the picture (text-to-image models such as "
                               "sd3: a request is (prompt, seed) or (prompt, picture)); None for unconditional models.")
    note: str | None = Field(None, description="The requester's note, plain text, never interpreted.")
    width: int
    height: int
    mode: Literal["RGB", "L"]
    source_format: str = Field(description="Format of the submitted file (PNG, JPEG, ...).")
    created_at: datetime
    updated_at: datetime
    lease_holder: str | None = None
    lease_expires_at: datetime | None = None
    attempts: int = Field(0, description="How many times the request has been claimed.")
    reason: str | None = Field(None, description="Why it failed or is invalid.")
    evidence: dict[str, Any] = Field(default_factory=dict, description="Filled by the processor.")
    image_key: str | None = Field(None, description="Storage key of the normalised PNG; None once purged.")
    original_sha256: str | None = Field(None, description="sha256 of the submitted picture's pixels when it was "
                                        "downscaled at the door (content_sha256 is then that of the stored copy).")
    original_size: tuple[int, int] | None = Field(None, description="(width, height) before the door's downscale.")
    produced_override: str | None = Field(None, description="An operator's reason to train although the model "
                                          "does not produce the picture (`requests requeue --train-anyway`).")

    def public(self) -> dict:
        return self.model_dump(mode="json")


def check_id(request_id: str) -> str:
    """Ids name storage keys: only the exact shape we mint is accepted, before any store access."""
    if not isinstance(request_id, str) or not ID_RE.fullmatch(request_id):  # `$` would let "...\n" through
        shown = repr(request_id)[:80]
        raise RequestError(f"invalid request id {shown}: ids look like 'req-' + 16 hex digits (see `requests list`)")
    return request_id


def check_state(state: str | None) -> str | None:
    if state is not None and state not in STATES:
        raise RequestError(f"unknown state '{state}': one of {', '.join(STATES)}")
    return state


def _plain_text(value: str, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{what} must be text, got {type(value).__name__}")
    value = unicodedata.normalize("NFC", value).strip()
    if len(value) > limit:
        raise RequestError(f"{what} is {len(value)} characters; the limit is {limit}: shorten it")
    # control characters (ESC, NUL, ...) could rewrite an operator's terminal when shown
    # (and so could bidi overrides, which can make a shown id or reason read backwards)
    bad = sorted({f"U+{ord(c):04X}" for c in value
                  if (unicodedata.category(c) == "Cc" and c not in "\n\t") or c in _BIDI})
    if bad:
        raise RequestError(f"{what} contains control characters ({', '.join(bad[:5])}): send plain text")
    return value


def check_note(note: str | None) -> str | None:
    return (_plain_text(note, "the note", NOTE_MAX) or None) if note is not None else None


def check_reason(reason: str) -> str:
    reason = _plain_text(reason, "the reason", REASON_MAX)
    if not reason:
        raise RequestError("give a reason (it is shown to operators and kept in the ledger)")
    return reason


def check_holder(holder: str) -> str:
    if not isinstance(holder, str) or not holder.strip():
        raise RequestError("a holder name is required (unique per processor process, e.g. host-pid-uuid)")
    return _plain_text(holder, "the holder name", HOLDER_MAX)


def check_seed(seed: int | None) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise RequestError(f"seed must be an integer in [0, 2**63-1], got {seed!r}")
    return seed


def check_prompt(prompt: str | None) -> str | None:
    """The prompt as the model will read it (NFC, stripped, plain text); None when not given."""
    if prompt is None:
        return None
    prompt = _plain_text(prompt, "the prompt", PROMPT_MAX)
    if not prompt:
        raise RequestError("the prompt is empty: give the text that produced the picture, or leave --prompt out "
                           "for an unconditional model")
    return prompt


def family_prompt(cfg) -> str | None:
    """The prompt a batch on `cfg` (an UnlearnConfig) unlearns outputs of: model.sd3.prompt (sd3), else None."""
    return cfg.model.sd3.prompt if cfg.model.family == "sd3" else None


def with_batch_prompt(cfg, records: list[RequestRecord]):
    """An sd3 batch unlearns outputs of one prompt, as one run does (docs/sd3.md): model.sd3.prompt
    when set, else the prompt of the oldest request that carries one. Other families: unchanged."""
    if cfg.model.family != "sd3" or cfg.model.sd3.prompt is not None:
        return cfg
    prompt = next((r.prompt for r in records if r.prompt is not None), None)
    if prompt is None:
        return cfg
    return cfg.model_copy(update={"model": cfg.model.model_copy(
        update={"sd3": cfg.model.sd3.model_copy(update={"prompt": prompt})})})


def prompt_problem(rec: RequestRecord, cfg) -> tuple[str, bool] | None:
    """Why this request cannot be unlearned by a batch on `cfg`, and whether a batch with other
    settings could take it (True: return it to the queue) or it must be fixed by the requester
    (False: fail it); None when the prompt fits. A text-to-image model (sd3) needs the request's
    prompt, and a batch takes one prompt; an unconditional model takes none."""
    family = cfg.model.family
    if family != "sd3":
        if rec.prompt is not None:
            return (f"the model is unconditional ({family}): it takes no prompt, but the request carries "
                    f"{rec.prompt[:80]!r}; if the picture came from this model, submit it without --prompt"), False
        return None
    if rec.prompt is None:
        return ("the model is text-to-image (sd3): a request needs the prompt that produced the picture; "
                "submit it with --prompt (and --seed when known)"), False
    batch = family_prompt(cfg)
    if batch is not None and rec.prompt != batch:
        return (f"this batch unlearns outputs of the prompt {batch[:80]!r} (one prompt per batch, as per run); the "
                f"request's is {rec.prompt[:80]!r}: returned for a batch of that prompt "
                "(`requests process --set model.sd3.prompt=...`)"), True
    return None


def screen_prompts(cfg, records: list[RequestRecord], moves) -> tuple[object, list[RequestRecord]]:
    """Before a batch loads its model: its settings with the batch's prompt (`with_batch_prompt`)
    and the requests it can take. Each one whose prompt does not fit (`prompt_problem`) is failed
    with the reason (the requester must fix it) or returned to the queue for a batch of its prompt
    (`moves`: the batch's queue transitions)."""
    cfg = with_batch_prompt(cfg, records)
    keep = []
    for rec in records:
        problem = prompt_problem(rec, cfg)
        if problem is None:
            keep.append(rec)
        elif problem[1]:
            moves.release_or_fail(rec, problem[0])
        else:
            moves.fail(rec.id, problem[0])
    return cfg, keep
