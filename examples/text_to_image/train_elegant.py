"""ELEGANT on a text-to-image diffusers pipeline (Stable Diffusion 1.x / 2.x), launched with accelerate.

    accelerate launch examples/text_to_image/train_elegant.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --prompts_file examples/text_to_image/prompts.txt --reward aesthetic --aesthetic_head camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth \\
        --alpha 0.1 --eta 1.0 --num_inference_steps 50 --train_steps 500 --batch_size 4 \\
        --resolution 512 --validation_prompt "a photo of a cat" --output_dir elegant-sd15-aesthetic

Every ElegantConfig field is a flag of the same name (``--help`` lists them with their help text);
``--config file.yaml`` reads them from YAML, flags win. ``--reward`` is a built-in (aesthetic, pickscore,
clipscore, brightness, saturation) or your own ``path/to/file.py:function`` taking ``(images, prompts)``.
"""

import sys

from hf_control_ft.scripts import run_elegant

if __name__ == "__main__":
    sys.exit(run_elegant(sys.argv[1:]))
