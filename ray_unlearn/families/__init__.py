"""Model families by name (`model.family`). Each is imported on first use: the sd3 family pulls in
diffusers' SD3 pipelines and transformers' text encoders, which a DDPM run never needs."""

from __future__ import annotations

from importlib import import_module

FAMILIES: dict[str, str] = {
    "ddpm": "ray_unlearn.families.ddpm:DDPMFamily",
    "sd3": "ray_unlearn.families.sd3:SD3Family",
}


def family_class(name: str):
    if name not in FAMILIES:
        raise ValueError(f"unknown model family '{name}'; choose one of: {', '.join(FAMILIES)}")
    module, cls = FAMILIES[name].split(":")
    return getattr(import_module(module), cls)


def with_run_prompt(model_cfg, targets):
    """The sd3 family's run prompt: `model.sd3.prompt`, else the targets' one shared prompt."""
    if model_cfg.family != "sd3" or model_cfg.sd3.prompt is not None:
        return model_cfg
    prompts = sorted({t.prompt for t in targets if t.prompt is not None})
    if len(prompts) > 1:
        raise ValueError(f"the targets carry {len(prompts)} different prompts ({prompts}); an sd3 run unlearns "
                         "outputs of one prompt: split them into one run per prompt")
    if not prompts:
        return model_cfg
    sd3 = model_cfg.sd3.model_copy(update={"prompt": prompts[0]})
    return model_cfg.model_copy(update={"sd3": sd3})
