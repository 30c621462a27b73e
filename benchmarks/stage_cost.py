"""Network sample evaluations per stage, before anything runs, as JSON (``hf_control_ft.trainers.costs``).

For the library defaults on Stable Diffusion 1.5 (50 steps, classifier-free guidance), for docs/text_to_image.md's
text-to-image command (``examples/text_to_image/sd15_aesthetic.yaml``) and for the configs of the example scripts, it prints the sample evaluations of stage 1 (pretrained rollouts for the value), the per-step
values, the drift stage (forward and backward), and the share of the stages before the drift.

    python benchmarks/stage_cost.py
"""

from __future__ import annotations

import json
import os

from hf_control_ft import ElegantConfig, SeikoConfig
from hf_control_ft.trainers.costs import network_evaluations
from hf_control_ft.utils.config_cli import read_yaml_mapping

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    rows = {"sd15_defaults_cfg": network_evaluations(ElegantConfig(report_to=None), guidance_factor=2)}
    for name in ("digits_elegant", "mixture_elegant"):
        path = os.path.join(ROOT, "examples", "configs", f"{name}.yaml")
        if os.path.exists(path):
            rows[name] = network_evaluations(ElegantConfig.from_yaml(path, report_to=None))
    sd15 = os.path.join(ROOT, "examples", "text_to_image", "sd15_aesthetic.yaml")  # the command line of the README and docs/text_to_image.md
    if os.path.exists(sd15):
        values = read_yaml_mapping(sd15)
        fields = {k: v for k, v in values.items() if k in ElegantConfig.field_names()}
        rows["readme_sd15_aesthetic_cfg"] = network_evaluations(ElegantConfig.from_dict(fields, report_to=None),
                                                                guidance_factor=2)
    seiko = os.path.join(ROOT, "examples", "configs", "seiko_digits.yaml")
    if os.path.exists(seiko):  # per SEIKO round (every round runs stage 1 and a drift stage)
        rows["seiko_digits_per_round"] = network_evaluations(SeikoConfig.from_yaml(seiko, report_to=None))
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
