"""Validation videos reach TensorBoard as an animated GIF image summary (what its add_video writes, without
moviepy), one frame of the grid per video frame at the run's fps."""

import io

import torch
from accelerate import Accelerator

from hf_control_ft.scripts.validation import Validation


def test_validation_videos_are_logged_to_tensorboard_as_an_animated_gif(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accelerator = Accelerator(log_with="tensorboard", project_dir=str(tmp_path / "logs"))
    accelerator.init_trackers("run")
    validation = Validation(["a cat"], num_images=2, every=1, output_dir=str(tmp_path))
    videos = torch.rand(2, 5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    validation.log_videos(accelerator, videos, step=3, fps=10)
    accelerator.end_training()
    files = list((tmp_path / "logs").rglob("events.out.tfevents*"))
    acc = EventAccumulator(str(files[0].parent), size_guidance={"images": 0})
    acc.Reload()
    (event,) = acc.Images("validation")
    gif = Image.open(io.BytesIO(event.encoded_image_string))
    assert event.step == 3 and gif.format == "GIF" and gif.n_frames == 5 and gif.info["duration"] == 100
    assert gif.size == (2 * 9 + 1, 9 + 1)  # two videos side by side, 1-pixel borders
    assert (event.width, event.height) == gif.size  # the summary states the grid's size
