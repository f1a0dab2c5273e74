"""The single-process unlearning loop. Plain PyTorch: it knows nothing of Ray or MLflow.

Callers plug in through `report(metrics, step)` and, for data parallelism, `reduce_grads`, which
averages a list of gradients across workers. The forget and remember gradients are reduced
separately *before* surgery, so every worker projects the same global gradients and stays in sync
(DDP's reduce-after-backward would average already-projected local gradients, which is not the
same step: projection is not linear).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ray_unlearn.config import TrainConfig
from ray_unlearn.continual import add_pull
from ray_unlearn.families.base import DiffusionFamily
from ray_unlearn.methods.base import Method
from ray_unlearn.surgery import Grads

Report = Callable[[dict, int], None]


@dataclass
class UnlearnData:
    """Everything in the family's space: forget samples, their surrogates, the remember set."""

    forget: torch.Tensor  # [F, ...]
    surrogate: torch.Tensor  # [F, ...]
    remember: torch.Tensor  # [R, ...]
    # Per-sample conditions (a tensor or a dict of tensors, e.g. prompt embeddings), indexed like the
    # samples; None: unconditional, or the family conditions every sample alike (sd3's run prompt).
    forget_cond: dict | torch.Tensor | None = None
    remember_cond: dict | torch.Tensor | None = None
    forget_weights: torch.Tensor | None = None  # [F] sampling weights of the forget samples (None: uniform)
    # [F, ...] each target's initial noise in the family's space (its sampling path starts there), and
    # [F] bool: which targets have one (a seed, a noise file or an inversion); None: none known
    forget_noise: torch.Tensor | None = None
    forget_noise_known: torch.Tensor | None = None
    # [H, ...] hold samples (continual.replay_as 'hold'): done requests' outputs on the serving weights,
    # with [H, ...] the initial noise each was sampled from; the remember term keeps the model's
    # prediction on them where the frozen serving network has it. None: no hold term.
    hold: torch.Tensor | None = None
    hold_noise: torch.Tensor | None = None
    hold_cond: dict | torch.Tensor | None = None


GOLDEN = (5**0.5 - 1) / 2


def spread_indices(weights: torch.Tensor | None, n: int, k: int, draw: int) -> torch.Tensor:
    """`k` forget indices out of `n` for the `draw`-th micro-batch, by systematic sampling of the
    weights (uniform if None) at an offset that moves by the golden ratio from draw to draw: in each
    batch a sample gets the floor or the ceiling of its share k * w, and as the offsets fill [0, 1)
    evenly its visits come at evenly spaced draws instead of by chance (independent draws leave a
    sample of weight 1/20 out of 10 batches of 4 one time in eight)."""
    w = torch.ones(n) if weights is None else weights.float().cpu()
    cdf = torch.cumsum(w / w.sum(), 0)
    pos = (((draw + 1) * GOLDEN) % 1.0 + torch.arange(k, dtype=torch.float64)) / k
    return torch.searchsorted(cdf.double(), pos, right=True).clamp_(max=n - 1)


def index_cond(cond, idx: torch.Tensor):
    """The rows `idx` of a condition (None, a tensor, or a dict of tensors)."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: v[idx.to(v.device)] for k, v in cond.items()}
    return cond[idx.to(cond.device)]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but no CUDA device is visible; use train.device=cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device supports it ('auto': CUDA with bf16); None = fp32."""
    if precision == "fp32":
        return None
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16":
        if device.type == "cpu":
            return torch.bfloat16  # works on CPU, slower than fp32 on most; asked for explicitly
        if not supported:
            raise RuntimeError("train.precision=bf16 but this GPU has no bf16 support; use fp32")
        return torch.bfloat16
    return torch.bfloat16 if supported else None


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


class DivergedError(FloatingPointError):
    """Training produced a non-finite loss or gradient: the loop stops at that step, before the
    optimizer applies it, and nothing trained from it may be saved or shipped."""

    def __init__(self, step: int, kind: str, quantity: str, settings: str):
        self.step, self.kind, self.quantity, self.settings = step, kind, quantity, settings
        super().__init__(f"diverged ({kind} at step {step}): {quantity} is not finite ({settings}); "
                         "lower train.lr (and keep train.max_grad_norm set), then run again")


def materialize(logs: dict) -> dict[str, float]:
    """Logs as floats: values may be floats or 0-dim tensors (methods log detached tensors so a step
    costs no host sync); all tensors come to the host in ONE transfer, once per report."""
    keys = [k for k, v in logs.items() if isinstance(v, torch.Tensor)]
    out = {k: float(v) for k, v in logs.items() if k not in keys}
    if keys:
        vals = torch.stack([logs[k].detach().reshape(()).float() for k in keys]).cpu().tolist()
        out.update(zip(keys, vals))
    return {k: out[k] for k in logs}


def _add(acc: Grads | None, g: Grads) -> Grads:
    return list(g) if acc is None else [a + b for a, b in zip(acc, g)]


class UnlearnLoop:
    def __init__(
        self,
        family: DiffusionFamily,
        method: Method,
        data: UnlearnData,
        cfg: TrainConfig,
        reduce_grads: Callable[[Grads], Grads] | None = None,
        pull: tuple[float, list[torch.Tensor]] | None = None,
        shard: tuple[int, int] = (0, 1),
    ):
        self.family, self.method, self.data, self.cfg = family, method, data, cfg
        # (lambda, anchors): lambda * (theta - anchor) joins each step's gradient (continual.add_pull)
        self.pull = pull
        self.params = family.trainable_parameters()
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.optimizer = make_optimizer(self.params, cfg)
        method.optimizer = self.optimizer  # EraseDiff's inner passes step it, as its reference does
        self.reduce = reduce_grads or (lambda g: g)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step_count = 0
        self._micro = 0  # the micro-batch within the step (forget_sampling 'spread' counts draws)
        # (rank, world): with 'spread' the workers take interleaved draws of one sequence, so the
        # global batch covers the targets as one worker's would, instead of each repeating the same
        self.shard = shard
        dev = family.device
        self.forget = data.forget.to(dev)
        self.surrogate = data.surrogate.to(dev)
        self.forget_noise = None if data.forget_noise is None else data.forget_noise.to(dev)
        self.forget_noise_known = None if data.forget_noise is None else data.forget_noise_known.to(dev)
        self.remember = data.remember.to(dev)
        self.hold = None if data.hold is None else (data.hold.to(dev), data.hold_noise.to(dev))

    def batch(self) -> dict:
        if self.cfg.forget_sampling == "spread":
            rank, world = self.shard
            fi = spread_indices(self.data.forget_weights, len(self.forget), self.cfg.batch_forget,
                                (self.step_count * self.cfg.grad_accum + self._micro) * world + rank)
            self._micro = (self._micro + 1) % self.cfg.grad_accum
        elif self.data.forget_weights is None:
            fi = torch.randint(0, len(self.forget), (self.cfg.batch_forget,), generator=self.gen)
        else:  # anchored replay: the new target keeps its share of every batch
            fi = torch.multinomial(self.data.forget_weights.float(), self.cfg.batch_forget, replacement=True,
                                   generator=self.gen)
        ri = torch.randint(0, len(self.remember), (self.cfg.batch_remember,), generator=self.gen)
        fi, ri = fi.to(self.forget.device), ri.to(self.remember.device)
        forget = {"x0": self.forget[fi], "x_s": self.surrogate[fi], "cond": index_cond(self.data.forget_cond, fi)}
        if self.forget_noise is not None:
            forget |= {"noise": self.forget_noise[fi], "noise_known": self.forget_noise_known[fi]}
        out = {"forget": forget, "remember": {"x0": self.remember[ri], "cond": index_cond(self.data.remember_cond, ri)}}
        if self.hold is not None:  # as many hold samples as forget samples, drawn alike
            hi = torch.randint(0, len(self.hold[0]), (self.cfg.batch_forget,), generator=self.gen).to(self.hold[0].device)
            out["hold"] = {"x0": self.hold[0][hi], "noise": self.hold[1][hi], "cond": index_cond(self.data.hold_cond, hi)}
        return out

    def step(self) -> dict:
        t0 = time.perf_counter()
        g_f = g_r = None
        logs: dict = {}  # floats or 0-dim tensors; `materialize` makes them floats
        for _ in range(self.cfg.grad_accum):
            gf, gr, micro = self.method.gradients(self.batch(), self.gen, self.params)
            g_f, g_r = _add(g_f, gf), _add(g_r, gr)
            for k, v in micro.items():
                logs[k] = logs.get(k, 0.0) + v / self.cfg.grad_accum
        if self.cfg.grad_accum > 1:
            g_f = [g / self.cfg.grad_accum for g in g_f]
            g_r = [g / self.cfg.grad_accum for g in g_r]
        g_f, g_r = self.reduce(g_f), self.reduce(g_r)
        grads, combine_logs = self.method.combine(g_f, g_r)
        if self.pull is not None:
            grads = add_pull(grads, self.params, self.pull[1], self.pull[0])
        self._check_finite({**logs, **combine_logs}, grads)
        for p, g in zip(self.params, grads):
            p.grad = g.to(p.dtype)
        if self.cfg.max_grad_norm is not None:
            logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm).detach()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        logs.update(combine_logs)
        logs["step_seconds"] = time.perf_counter() - t0
        return logs

    def _check_finite(self, logs: dict, grads: Grads) -> None:
        """Raise DivergedError at the first non-finite logged loss or combined gradient: one host
        sync per step (every value on the device concatenated, one isfinite().all(); values on the
        CPU are checked there, which waits on no device); naming the culprit reads more, but only
        once it diverged."""
        values = {f"the logged {k!r}": torch.as_tensor(v, dtype=torch.float32).reshape(-1) for k, v in logs.items()}
        values["the combined gradient"] = torch.stack([g.detach().float().norm() for g in grads])
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for v in values.values():
            by_device.setdefault(v.device, []).append(v.float())
        if all(bool(torch.isfinite(torch.cat(vs)).all()) for vs in by_device.values()):
            return
        for what, v in values.items():
            if not bool(torch.isfinite(v).all()):
                c = self.cfg
                raise DivergedError(self.step_count + 1, "NaN" if bool(torch.isnan(v).any()) else "inf", what,
                                    f"method {self.method.name}, lr {c.lr}, optimizer {c.optimizer}, "
                                    f"max_grad_norm {c.max_grad_norm}, steps {c.steps}")

    def run(self, report: Report | None = None, progress: bool = True) -> dict:
        logs: dict = {}
        bar = tqdm(total=self.cfg.steps, initial=self.step_count, desc=f"unlearn ({self.method.name})", disable=not progress)
        while self.step_count < self.cfg.steps:
            logs = materialize(self.step())  # the step's one host transfer
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k.endswith("loss")})
            if report is not None:
                report(logs, self.step_count)
        bar.close()
        return logs

    # checkpoint / resume: weights of what trains, the optimizer, the step and the RNG
    def state_dict(self) -> dict:
        return {
            "params": [p.detach().cpu().clone() for p in self.params],
            "optimizer": self.optimizer.state_dict(),
            "step": self.step_count,
            "rng": self.gen.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"], strict=True):
                p.copy_(saved.to(p.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])
        self.gen.set_state(state["rng"])
