"""Model cards: ``README.md`` rendered from ``model_cards/elegant_model_card.md`` (Jinja2, through
``huggingface_hub.ModelCard``, so the YAML header carries ``base_model``, ``license``, ``tags`` and
``library_name`` as the Hub expects). The templates live in the repository's top-level ``model_cards/``; a wheel
ships them as ``hf_control_ft/model_cards/`` (see ``setup.py``), and both places are searched."""

from __future__ import annotations

import os

from huggingface_hub import ModelCard, ModelCardData

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # hf_control_ft/
TEMPLATE_DIR = next((d for d in (os.path.join(_PACKAGE_DIR, "model_cards"),  # installed wheel
                                 os.path.join(os.path.dirname(_PACKAGE_DIR), "model_cards"))  # source checkout
                     if os.path.isdir(d)), os.path.join(_PACKAGE_DIR, "model_cards"))
DEFAULT_TEMPLATE = os.path.join(TEMPLATE_DIR, "elegant_model_card.md")
DEFAULT_TAGS = ["hf_control_ft", "elegant", "reward-fine-tuning", "lora", "diffusers"]


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def render_model_card(config, reward: str, base_model: str | None = None, metrics: dict | None = None,
                      sample_grid: str | None = None, repo_id: str | None = None, conditional: bool = False,
                      guidance_scale: float | None = None, lora_rank: int | None = None,
                      lora_alpha: float | None = None, target_modules=None, license: str = "apache-2.0",
                      tags: list[str] | None = None, model_name: str | None = None,
                      template_path: str | None = None, card_info: dict | None = None) -> str:
    """Renders the model card of an ELEGANT run and returns it (YAML header + markdown).

    Args:
        config: the :class:`~hf_control_ft.ElegantConfig` of the run.
        reward: name / description of the reward.
        base_model: Hub id or path of the base model (``base_model`` in the YAML header when given).
        metrics: ``{name: value}`` shown as a table (floats with 6 significant digits).
        sample_grid: relative path of a sample image inside the repo (shown in the card).
        repo_id: the repo the card describes (used in the loading snippets; default ``"REPO_ID"``).
        conditional: Stable Diffusion (text-conditioned) card vs unconditional denoiser card.
        guidance_scale: classifier-free guidance scale used in training (conditional only).
        lora_rank / lora_alpha / target_modules: the adapter (default: from ``config``).
        license, tags, model_name, template_path: card metadata and an alternative template.
        card_info: what the process and the run add: ``prompts`` (list), ``num_prompts``, ``dataset``,
            ``negative_prompt``, ``family``, ``mixed_precision``, ``flow`` (a flow-matching family),
            ``control_end_timestep`` / ``control_end_level`` (where the trained chain's control ends) and, for
            SEIKO, ``seiko`` (``beta``, ``num_rounds``, ``queries_per_round``, ``optimism``, ``oracle``,
            ``total_queries``, ``feedback``).

    A local ``base_model`` path is shown by its directory name only: a card never carries an absolute local path.
    """
    info = dict(card_info or {})
    if base_model and (os.path.isabs(base_model) or base_model.startswith((".", "~"))):
        base_model = os.path.basename(os.path.normpath(base_model))
    family_tags = [] if not conditional else [info.get("family") or "stable-diffusion",
                                              *(["flow-matching"] if info.get("flow") else []), "text-to-image"]
    tags = list(dict.fromkeys([*(DEFAULT_TAGS if tags is None else tags), *family_tags]))
    on_hub = bool(base_model) and not os.path.isdir(base_model) and "/" in base_model
    data = ModelCardData(license=license, library_name="diffusers", tags=tags,
                         base_model=base_model if on_hub else None,
                         pipeline_tag="text-to-image" if conditional else "unconditional-image-generation")
    rank = lora_rank if lora_rank is not None else config.lora_rank
    targets = target_modules if target_modules is not None else config.lora_target_modules
    if targets is not None and not isinstance(targets, str):
        targets = ", ".join(f"`{t}`" for t in sorted(targets))
    card = ModelCard.from_template(
        data, template_path=template_path or DEFAULT_TEMPLATE,
        model_name=model_name or (repo_id.split("/")[-1] if repo_id else "ELEGANT reward fine-tuned adapter"),
        repo_id=repo_id or "REPO_ID", reward=reward, base_model=base_model, base_model_on_hub=on_hub,
        alpha=config.alpha, eta=config.eta,
        num_inference_steps=config.num_inference_steps, guidance_scale=guidance_scale if conditional else None,
        lora_rank=rank, lora_alpha=lora_alpha if lora_alpha is not None else (config.lora_alpha or rank),
        target_modules=targets or "(default)", learn_initial_noise=config.learn_initial_noise,
        train_steps=config.train_steps, batch_size=config.batch_size, learning_rate=config.learning_rate,
        truncate_backprop_steps=config.truncate_backprop_steps,
        metrics=[(k, _format_value(v)) for k, v in (metrics or {}).items()], sample_grid=sample_grid,
        conditional=conditional, license=license, prompts=info.get("prompts"),
        num_prompts=info.get("num_prompts"), dataset=info.get("dataset"), negative_prompt=info.get("negative_prompt"),
        family=info.get("family"), mixed_precision=info.get("mixed_precision"), seiko=info.get("seiko"),
        flow=bool(info.get("flow")), control_end_timestep=info.get("control_end_timestep"),
        control_end_level=info.get("control_end_level"))
    return str(card)
