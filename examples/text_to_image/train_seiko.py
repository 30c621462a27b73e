"""SEIKO (online feedback from an expensive oracle) on a text-to-image diffusers pipeline.

    accelerate launch examples/text_to_image/train_seiko.py \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --prompts_file examples/text_to_image/prompts.txt --oracle my_lab.py:score_images \\
        --num_rounds 4 --queries_per_round 256 --optimism ucb --alpha 0.1 --beta 0.1 \\
        --resolution 512 --output_dir seiko-sd15

Every SeikoConfig field is a flag of the same name (``--help``). The oracle is called as
``fn(images, prompts)`` on decoded images in ``[0, 1]``; every answer is stored in ``<output_dir>/feedback``
before it is used, and a restart with the same ``--output_dir`` resumes where the run stopped.
"""

import sys

from hf_control_ft.scripts import run_seiko

if __name__ == "__main__":
    sys.exit(run_seiko(sys.argv[1:]))
