"""Inference pipelines that sample what ELEGANT trained: the LoRA control *and* the learned initial noise.

* :class:`ControlledStableDiffusionPipeline`: a ``StableDiffusionPipeline`` plus :meth:`load_control`
  (adapter through diffusers' ``load_lora_weights``, initial-noise model, guidance / eta / steps of training).
* :class:`ControlledDiffusionPipeline`: the same for unconditional denoisers (``UNet2DModel`` and any module
  called as ``model(sample, t)``).

Both sample exactly as the trainer's ``sample`` does (same generator consumption: initial noise first, then
one Gaussian draw per stochastic step), so a saved model reproduces the trained samples under a fixed seed.
Stock diffusers can load the adapter too (``pipe.load_lora_weights(dir_or_repo)``) but then starts from
``N(0, I)`` and runs the adapter at every step, including the deterministic last one.
"""

from __future__ import annotations

import os

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

from ..core.control import CONTROL_ADAPTER, tuner_layers
from ..core.sampler import ControlledSampler
from ..core.scheduling import DiffusionSchedule, as_stochastic_scheduler
from ..models.initial_noise import InitialNoiseModel
from ..processes.sd_components import GuidedUNet, StableDiffusionOptions, decode_latents, encode_prompts, latent_shape
from ..serialization.lora_io import LORA_WEIGHTS_NAME, attach_lora_file
from ..serialization.saved import INITIAL_NOISE_DIR, OPTIONS_NAME, read_saved, resolve_directory
from ..trainers.elegant_config import ElegantConfig

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _format_images(images: torch.Tensor, output_type: str):
    """``(B, 3, H, W)`` in ``[0, 1]`` -> PIL list, NHWC numpy or the tensor."""
    if output_type == "pt":
        return images
    array = images.detach().permute(0, 2, 3, 1).float().cpu().numpy()
    if output_type == "np":
        return array
    from diffusers.utils import numpy_to_pil

    return numpy_to_pil(array)


def _check_output_type(output_type: str):
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")


def _draw(initial_noise, num: int, shape, generator, device, use_initial_noise: bool,
          condition: torch.Tensor | None = None) -> torch.Tensor:
    if use_initial_noise and initial_noise is not None:
        if initial_noise.cond_dim and condition is None:
            raise ValueError("this control learned a conditional start law; this pipeline cannot supply the "
                             "condition (use the pipeline of the trained process)")
        return initial_noise.sample(num, generator=generator, device=device,
                                    condition=condition if initial_noise.cond_dim else None)
    return torch.randn((num, *shape), generator=generator).to(device)


class _ControlMixin:
    """Shared loading of ``hf_control_ft`` save directories / Hub repos."""

    def _load_common(self, directory: str) -> dict:
        saved = read_saved(directory)
        self.control_config = ElegantConfig.from_dict(saved["config"])
        self.sample_shape = tuple(saved["sample_shape"])
        noise_dir = os.path.join(directory, INITIAL_NOISE_DIR)
        self.initial_noise = None
        if self.control_config.learn_initial_noise and os.path.isdir(noise_dir):
            self.initial_noise = InitialNoiseModel.from_pretrained(noise_dir).eval()
        return saved

    def to(self, *args, **kwargs):
        """Moves the pipeline's modules and the initial-noise model (not a registered component)."""
        result = super().to(*args, **kwargs)
        if self.initial_noise is not None:
            self.initial_noise.to(self.unet.device)
        return result

    def _sampler(self, denoiser, num_inference_steps, eta) -> ControlledSampler:
        cfg = self.control_config
        # a DDPM/DDIM copy of the pipeline's scheduler (same noise schedule); self.scheduler is left unchanged
        steps = int(num_inference_steps or cfg.num_inference_steps)
        schedule = DiffusionSchedule(as_stochastic_scheduler(self.scheduler), steps,
                                     float(eta if eta is not None else cfg.eta))
        return ControlledSampler(denoiser, schedule, gradient_checkpointing=False)


class ControlledDiffusionPipeline(DiffusionPipeline, _ControlMixin):
    """Unconditional sampling with a trained control (e.g. a ``UNet2DModel`` digits model).

    Build with :meth:`from_pretrained` (``control`` = a save directory or Hub repo, plus the base ``unet`` and
    ``scheduler``) or construct from the base components and call :meth:`load_control`.
    """

    def __init__(self, unet: torch.nn.Module, scheduler):
        super().__init__()
        as_stochastic_scheduler(scheduler)  # refuses schedulers the stochastic sampler cannot run
        self.register_modules(unet=unet, scheduler=scheduler)
        self.initial_noise = None
        self.control_config = None
        self.sample_shape = None

    @classmethod
    def from_pretrained(cls, control: str, unet: torch.nn.Module, scheduler, **hub_kwargs):
        """Base ``unet`` + ``scheduler`` with the control of ``control`` (directory or Hub repo id).
        ``hub_kwargs``: ``token``, ``revision``, ``endpoint``, ``cache_dir``."""
        pipe = cls(unet=unet, scheduler=scheduler)
        return pipe.load_control(control, **hub_kwargs)

    def load_control(self, control: str, **hub_kwargs) -> "ControlledDiffusionPipeline":
        """Adds the LoRA adapter to ``unet`` and loads the initial-noise model and sampling settings."""
        directory = resolve_directory(control, **hub_kwargs)
        saved = self._load_common(directory)
        if tuner_layers(self.unet):
            raise ValueError("the unet already has LoRA layers; pass a fresh copy of the base model")
        attach_lora_file(self.unet, saved["lora_path"], CONTROL_ADAPTER)
        self.unet.eval()
        if self.initial_noise is not None:
            self.initial_noise.to(self.unet.device)
        return self

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: torch.Generator | None = None,
                 num_inference_steps: int | None = None, eta: float | None = None, output_type: str = "pil",
                 use_initial_noise: bool = True, controlled: bool = True, return_dict: bool = True):
        """Draws ``batch_size`` samples: learned initial noise + controlled chain (``controlled=False`` and
        ``use_initial_noise=False``: the base model). Images are ``x / 2 + 0.5`` clamped to ``[0, 1]``
        (diffusers' pixel convention); ``output_type="latent"`` returns the raw samples."""
        if self.control_config is None:
            raise RuntimeError("no control loaded: call load_control(directory_or_repo) first")
        _check_output_type(output_type)
        device = self.unet.device
        sampler = self._sampler(self.unet, num_inference_steps, eta)
        x_T = _draw(self.initial_noise, batch_size, self.sample_shape, generator, device, use_initial_noise)
        x = sampler.sample(x_T, generator, controlled=controlled)
        if output_type == "latent":
            images = x
        else:
            if x.dim() != 4:
                raise ValueError(f"samples of shape {tuple(x.shape[1:])} are not images; use output_type='latent'")
            images = _format_images((x / 2 + 0.5).clamp(0, 1), output_type)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


class ControlledStableDiffusionPipeline(StableDiffusionPipeline, _ControlMixin):
    """``StableDiffusionPipeline`` that samples with the trained control and learned initial noise.

    ``ControlledStableDiffusionPipeline.from_control(dir_or_repo)`` loads the base model recorded at training
    time; or ``ControlledStableDiffusionPipeline.from_pretrained(base).load_control(dir_or_repo)``.
    Inference only.
    """

    initial_noise = None
    control_config = None
    control_options = None
    sample_shape = None

    @classmethod
    def from_control(cls, control: str, base_model: str | None = None, token: str | None = None,
                     revision: str | None = None, endpoint: str | None = None, **pipeline_kwargs):
        """Loads ``base_model`` (default: the one recorded in ``stable_diffusion.json``) and the control."""
        directory = resolve_directory(control, token=token, revision=revision, endpoint=endpoint)
        options = StableDiffusionOptions.load(os.path.join(directory, OPTIONS_NAME))
        base = base_model or options.base_model
        if not base:
            raise ValueError(f"{control} records no base model; pass base_model=")
        pipeline_kwargs.setdefault("safety_checker", None)
        pipe = cls.from_pretrained(base, token=token, **pipeline_kwargs)
        return pipe.load_control(directory)

    def load_control(self, control: str, **hub_kwargs) -> "ControlledStableDiffusionPipeline":
        """Loads the adapter (``load_lora_weights``, adapter name ``"control"``), the initial-noise model and
        the training's guidance scale / negative prompt / size / eta / steps."""
        directory = resolve_directory(control, **hub_kwargs)
        self._load_common(directory)
        self.control_options = StableDiffusionOptions.load(os.path.join(directory, OPTIONS_NAME)).for_family(
            "stable-diffusion", {"guidance_scale": 7.5})  # unset fields: StableDiffusionPipeline's defaults
        as_stochastic_scheduler(self.scheduler)  # refuses schedulers the stochastic sampler cannot run
        # the exact file: diffusers would otherwise pick any *.safetensors in the directory
        self.load_lora_weights(directory, weight_name=LORA_WEIGHTS_NAME, adapter_name=CONTROL_ADAPTER)
        for module in (self.unet, self.vae, self.text_encoder):  # inference: no dropout / train-mode paths
            module.eval()
        if self.initial_noise is not None:
            self.initial_noise.to(self.unet.device)
        return self

    @torch.no_grad()
    def __call__(self, prompt, num_images_per_prompt: int = 1, generator: torch.Generator | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 negative_prompt: str | None = None, eta: float | None = None, output_type: str = "pil",
                 use_initial_noise: bool = True, controlled: bool = True, return_dict: bool = True):
        """Samples one image per prompt (times ``num_images_per_prompt``) with the trained control.

        Defaults (guidance, negative prompt, eta, steps, size, autocast dtype) are the training's. Returns a
        ``ImagePipelineOutput``; ``output_type="latent"`` gives the latents.
        """
        if self.control_config is None:
            raise RuntimeError("no control loaded: call load_control(directory_or_repo) first")
        _check_output_type(output_type)
        opts = self.control_options
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        device = self.unet.device
        scale = opts.guidance_scale if guidance_scale is None else guidance_scale
        denoiser = GuidedUNet(self.unet, scale, opts.dtype)
        embeds, pooled = encode_prompts(self.tokenizer, self.text_encoder, prompts, device, return_pooled=True)
        negative = None
        if denoiser.do_guidance:
            neg_prompt = opts.negative_prompt if negative_prompt is None else negative_prompt
            negative = encode_prompts(self.tokenizer, self.text_encoder, [neg_prompt], device)
        denoiser.set_condition(embeds, negative)
        shape = latent_shape(self, opts.height, opts.width)
        x_T = _draw(self.initial_noise, len(prompts), shape, generator, device, use_initial_noise, pooled)
        latents = self._sampler(denoiser, num_inference_steps, eta).sample(x_T, generator, controlled=controlled)
        if output_type == "latent":
            images = latents
        else:
            images = _format_images(decode_latents(self.vae, latents, opts.dtype), output_type)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


__all__ = ["ControlledDiffusionPipeline", "ControlledStableDiffusionPipeline", "as_stochastic_scheduler"]
