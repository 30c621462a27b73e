"""Validation images during training: sampled with the trained sampler, saved as a grid, logged to the trackers.

:class:`Validation` is the ``callback`` of :meth:`~hf_control_ft.ElegantTrainer.train` (called after every drift
step; it acts every ``validation_steps`` steps and at the last one) and of
:meth:`~hf_control_ft.SeikoTrainer.train` (called after every round). On the main process it samples
``num_validation_images`` images per validation prompt with a fixed seed (learned initial noise + LoRA control:
the distribution being trained), writes ``<output_dir>/validation/step-<N>.png`` and logs the images to every
tracker that takes images (TensorBoard ``add_images``; others through their ``log_images``), at the tracker step
of the drift step. Sampling uses its own generator, so validation never changes the training randomness.
"""

from __future__ import annotations

import io
import logging
import os

import torch

from ..rewards.image_rewards import call_reward
from ..trainers.distributed import run_on_main_patiently
from ..utils.images import image_grid, save_animation, video_grid

logger = logging.getLogger(__name__)

VALIDATION_DIR = "validation"


class Validation:
    """Validation images of a text-to-image run (module docstring).

    Args:
        prompts: validation prompts; ``num_images`` images each.
        every: act every ``every`` drift steps (0: only at the last step); SEIKO: every round.
        output_dir: where ``validation/step-<N>.png`` grids go.
        reward_fn: optional ``fn(images, prompts)``; its mean on the validation images is logged
            (tracker key ``validation/reward``). ``None`` for SEIKO, whose true reward is the expensive oracle.
        seed: the validation generator's seed (the same images at every validation, up to the training).
    """

    def __init__(self, prompts: list[str], num_images: int, every: int, output_dir: str, reward_fn=None,
                 seed: int = 0, batch_size: int | None = None):
        self.prompts = [p for p in prompts for _ in range(num_images)]
        self.num_images = int(num_images)
        self.every = int(every)
        self.output_dir = output_dir
        self.reward_fn = reward_fn
        self.seed = int(seed)
        self.batch_size = batch_size
        self.last_grid = None
        self.last_metrics: dict = {}

    # ------------------------------------------------------------------ callbacks
    def __call__(self, trainer, step: int) -> dict:
        """ELEGANT callback: validation every ``every`` drift steps and at the last one."""
        last = step == trainer.config.train_steps
        if last or (self.every and step % self.every == 0):
            return self.run(trainer, step, trainer.log_step(step))
        return {}

    def round_callback(self, trainer, round_index: int) -> dict:
        """SEIKO callback: validation after every ``every``-th round (``every`` 0: the last round only)."""
        last = round_index == trainer.config.num_rounds
        if last or (self.every and round_index % self.every == 0):
            return self.run(trainer, round_index, trainer.global_step, name=f"round-{round_index:03d}")
        return {}

    # ------------------------------------------------------------------ work
    @torch.no_grad()
    def images(self, trainer, controlled: bool = True) -> torch.Tensor:
        """Decoded validation images ``(N, 3, H, W)`` in ``[0, 1]`` (CPU, fp32)."""
        gen = torch.Generator().manual_seed(self.seed)
        latents = trainer.sample(prompts=self.prompts, generator=gen, controlled=controlled,
                                 batch_size=self.batch_size)
        return trainer.decode(latents).float().clamp(0, 1).cpu()

    def run(self, trainer, step: int, tracker_step: int, name: str | None = None) -> dict:
        """Samples, saves and logs one validation on the main process (the others wait in short collectives,
        however long it takes, and get its metrics or its error); returns its metrics. With a sharded denoiser
        (``--fsdp``) every process samples the same images (each denoiser call is a collective)."""
        images = self.images(trainer) if getattr(trainer, "sharded", False) else None
        return run_on_main_patiently(trainer.accelerator, self._run, trainer, step, tracker_step, name, images)

    def _run(self, trainer, step: int, tracker_step: int, name: str | None, images=None) -> dict:
        images = self.images(trainer) if images is None else images
        directory = os.path.join(self.output_dir, VALIDATION_DIR)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{name or f'step-{step:06d}'}.png")
        if images.dim() == 5:  # videos: an animated PNG grid, which the card shows too
            save_animation(video_grid(images, nrow=self.num_images), path, self.fps(trainer))
            self.last_grid = path
        else:
            grid = image_grid(images, nrow=self.num_images, value_range=(0.0, 1.0))
            grid.save(path)
            self.last_grid = grid
        metrics = {}
        if self.reward_fn is not None:
            device = trainer.device
            values = call_reward(self.reward_fn, images.to(device), self.prompts)
            metrics[f"validation reward (mean of {len(self.prompts)} images)"] = \
                float(torch.as_tensor(values).float().mean())
        if images.dim() == 5:
            self.log_videos(trainer.accelerator, images, tracker_step, self.fps(trainer))
        else:
            self.log_images(trainer.accelerator, images, tracker_step)
        if metrics:
            trainer.accelerator.log({"validation/reward": next(iter(metrics.values()))}, step=tracker_step)
        self.last_metrics = metrics
        return metrics

    def log_images(self, accelerator, images: torch.Tensor, step: int, trackers=None) -> None:
        """Logs to every open tracker that takes images (or to ``trackers``)."""
        for tracker in accelerator.trackers if trackers is None else trackers:
            try:
                if tracker.name == "tensorboard":
                    tracker.writer.add_images("validation", images.numpy(), global_step=step, dataformats="NCHW")
                    tracker.writer.flush()
                elif hasattr(type(tracker), "log_images"):
                    hwc = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
                    tracker.log_images({"validation": list(hwc)}, step=step)
            except Exception as err:  # noqa: BLE001 - a tracker's failure must not stop training
                logger.warning("could not log validation images to %s: %s", tracker.name, err)

    @staticmethod
    def fps(trainer) -> int:
        options = getattr(trainer.process, "options", None)
        return int(getattr(options, "fps", None) or 16)

    def log_videos(self, accelerator, videos: torch.Tensor, step: int, fps: int) -> None:
        """Logs validation videos ``(N, F, 3, H, W)``: TensorBoard as an animated GIF image summary of the grid (what
        its ``add_video`` writes, without moviepy), wandb as ``wandb.Video`` of that GIF, other trackers the first
        frames as images. The GIF is encoded once."""
        trackers = list(accelerator.trackers)
        if not trackers:
            return
        frames = video_grid(videos, nrow=self.num_images)
        gif = io.BytesIO()
        save_animation(frames, gif, fps, format="GIF")
        others = []
        for tracker in trackers:
            try:
                if tracker.name == "tensorboard":
                    from tensorboard.compat.proto.summary_pb2 import Summary

                    image = Summary.Image(height=frames[0].height, width=frames[0].width, colorspace=3,
                                          encoded_image_string=gif.getvalue())
                    tracker.writer._get_file_writer().add_summary(
                        Summary(value=[Summary.Value(tag="validation", image=image)]), global_step=step)
                    tracker.writer.flush()
                elif tracker.name == "wandb":
                    import wandb

                    path = os.path.join(self.output_dir, VALIDATION_DIR, f"step-{step:06d}.gif")
                    with open(path, "wb") as fh:
                        fh.write(gif.getvalue())
                    tracker.log({"validation": wandb.Video(path, format="gif")}, step=step)
                else:
                    others.append(tracker)
            except Exception as err:  # noqa: BLE001 - a tracker's failure must not stop training
                logger.warning("could not log validation videos to %s: %s", tracker.name, err)
        if others:
            self.log_images(accelerator, videos[:, 0], step, trackers=others)


__all__ = ["Validation", "VALIDATION_DIR"]
