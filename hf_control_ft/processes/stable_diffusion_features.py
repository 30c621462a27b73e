"""SEIKO on a diffusers ``StableDiffusionPipeline``: oracle feedback on decoded images, per-query prompts.

Built with :meth:`hf_control_ft.SeikoTrainer.from_pipeline`. The Stable Diffusion machinery is the one of
:mod:`hf_control_ft.processes.stable_diffusion` (the :class:`~hf_control_ft.processes.stable_diffusion.GuidedUNet` denoiser, the
differentiable VAE decode, prompt loading and encoding); the SEIKO rounds are those of
:class:`~hf_control_ft.SeikoTrainer`, with three differences:

* **Queries.** Each query draws its prompt uniformly from the prompt source (from the round's seeded
  generator), its latent ``(4, h, w)`` is sampled under that prompt, and both are written to the feedback dataset
  before the oracle is asked. The oracle receives the decoded images ``(B, 3, H, W)`` in ``[0, 1]`` and the
  prompts, ``oracle(images, prompts)``. On resume the pending queries are answered with their stored latents
  and prompts (nothing is redrawn, nothing asked twice).
* **Reward model.** The ensemble regresses the oracle values on ``image_features(decode(latent))``: a
  pluggable differentiable image embedding (a frozen CLIP / DINO image tower for real runs;
  :class:`PooledPixelFeatures` by default). The optimistic reward is therefore differentiable back to the
  latents through the VAE decoder, which is what the drift update backpropagates.
* **Conditioning.** Every rollout of a round (value rollouts of the initial-noise stage, drift iterations)
  draws a batch of prompts and conditions the UNet on them; both per-step KL terms (to the pretrained UNet and
  to the previous round's adapter) are between classifier-free-guided transitions.

Limitation: the reward model is prompt-agnostic (it sees the image only), as is the learned initial noise
(see :mod:`hf_control_ft.processes.stable_diffusion`). For prompt-dependent oracles pass a feature extractor whose
embedding captures what the oracle rewards.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..trainers.seiko_config import SeikoConfig
from ..trainers.seiko import SeikoTrainer
from .stable_diffusion import StableDiffusionElegantTrainer, StableDiffusionOptions, decode_latents


class PooledPixelFeatures(nn.Module):
    """Images ``(B, 3, H, W)`` -> per-channel average over a ``size x size`` grid, ``(B, 3 * size^2)``.

    A parameter-free, differentiable default embedding for the reward heads (colour layout at low resolution).
    Real runs should pass a pretrained image encoder instead.
    """

    def __init__(self, size: int = 4):
        super().__init__()
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"PooledPixelFeatures.size must be an int >= 1, got {size!r}")
        self.size = size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images, self.size).flatten(1)


class LatentFeatures:
    """``latents (B, 4, h, w) -> image_features(decode(latents)) (B, D)``, differentiable in the latents.

    Without autograd (fitting the heads, the Gram matrix, metrics over the whole feedback dataset) the latents
    are decoded in chunks of ``chunk_size`` to bound the VAE's activation memory.
    """

    def __init__(self, vae, image_features, autocast_dtype: torch.dtype | None = None, chunk_size: int = 8):
        self.vae, self.image_features = vae, image_features
        self.autocast_dtype, self.chunk_size = autocast_dtype, int(chunk_size)

    def _one(self, latents: torch.Tensor) -> torch.Tensor:
        features = self.image_features(decode_latents(self.vae, latents, self.autocast_dtype))
        if features.ndim != 2 or features.shape[0] != latents.shape[0]:
            raise ValueError(f"the feature extractor must return (B, D) features, got {tuple(features.shape)} "
                             f"for B={latents.shape[0]}")
        return features.float()

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or latents.shape[0] <= self.chunk_size:
            return self._one(latents)
        return torch.cat([self._one(chunk) for chunk in latents.split(self.chunk_size)])


class StableDiffusionSeikoTrainer(SeikoTrainer):
    """SEIKO on a ``StableDiffusionPipeline``; build it with :meth:`SeikoTrainer.from_pipeline`.

    Args:
        pipeline: the base pipeline (its UNet gets the ``"control"`` and ``"previous"`` LoRA adapters; UNet,
            VAE and text encoder are frozen).
        oracle: ``oracle(images, prompts) -> (B,)`` or an :class:`~hf_control_ft.feedback.oracle.Oracle` around one.
        config: :class:`SeikoConfig`.
        prompts: list of prompts, text file (one per line) or ``datasets`` dataset.
        options: :class:`~hf_control_ft.processes.stable_diffusion.StableDiffusionOptions`.
        accelerator: optional ``accelerate.Accelerator`` (single process).
        feature_extractor: differentiable ``images (B, 3, H, W) in [0, 1] -> (B, D)``; moved to the device and
            frozen. Default :class:`PooledPixelFeatures`.
        feature_dim: ``D``; inferred with one decode when omitted.

    Attributes ``pipeline``, ``prompts`` (the loaded prompt list) and ``options`` are set; :meth:`sample` takes
    ``prompts=`` like :meth:`StableDiffusionElegantTrainer.sample`, and :meth:`decode` turns latents into images.
    """

    def __init__(self, pipeline, oracle, config: SeikoConfig, prompts, options: StableDiffusionOptions | None = None,
                 accelerator=None, feature_extractor=None, feature_dim: int | None = None):
        if not isinstance(config, SeikoConfig):
            raise TypeError(f"config must be a SeikoConfig, got {type(config).__name__}")
        self.pipeline = pipeline
        self.options = options or StableDiffusionOptions()
        self._prompt_source = prompts
        super().__init__(config, model=None, scheduler=None, oracle=oracle, sample_shape=None,
                         accelerator=accelerator)
        self.prompts = self.elegant.prompts
        image_features = feature_extractor if feature_extractor is not None else PooledPixelFeatures()
        if isinstance(image_features, nn.Module):
            image_features.to(self.device).requires_grad_(False).eval()
        self.feature_extractor = LatentFeatures(pipeline.vae, image_features, self.options.dtype,
                                                chunk_size=config.batch_size)
        if feature_dim is None:
            with torch.no_grad():
                probe = torch.zeros((1, *self.sample_shape), device=self.device)
                feature_dim = int(self.feature_extractor(probe).shape[1])
        self.feature_dim = int(feature_dim)

    def _build_elegant(self, elegant_config, model, scheduler, sample_shape, accelerator, model_kwargs):
        return StableDiffusionElegantTrainer(self.pipeline, None, elegant_config, self._prompt_source, self.options,
                                             accelerator=accelerator)

    # ------------------------------------------------------------------ queries
    def _draw_queries(self, round_index: int, num_samples: int, generator: torch.Generator):
        """One prompt per query (uniform over the prompt source), then its latent under that prompt."""
        idx = torch.randint(len(self.prompts), (num_samples,), generator=generator).tolist()
        prompts = [self.prompts[i] for i in idx]
        latents = self.elegant.sample(num_samples, generator, batch_size=self.config.batch_size,
                                      controlled=round_index > 1, prompts=prompts)
        return latents, prompts

    @torch.no_grad()
    def _oracle_inputs(self, query_indices: list[int]):
        """Decoded images ``(B, 3, H, W)`` in ``[0, 1]`` (on CPU) of the stored latents, and the stored prompts."""
        latents = self.feedback.samples(query_indices).to(self.device)
        images = torch.cat([self.decode(chunk).cpu() for chunk in latents.split(self.config.batch_size)])
        return images, self.feedback.prompts(query_indices)

    # ------------------------------------------------------------------ inference
    def sample(self, num_samples: int | None = None, generator: torch.Generator | None = None,
               batch_size: int | None = None, controlled: bool = True, prompts: list[str] | None = None):
        """Latents ``(N, 4, h, w)``; with ``prompts`` one per prompt (in order), else prompts drawn from the
        training source. Decode with :meth:`decode`."""
        return self.elegant.sample(num_samples, generator, batch_size, controlled, prompts=prompts)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images ``(B, 3, H, W)`` in ``[0, 1]``."""
        return self.elegant.decode(latents)
