"""The README as a user reads it: the quick start runs as written, every file it names exists, the accelerate
configs and the example YAML load."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def test_every_repository_path_the_readme_names_exists():
    paths = set(re.findall(r"(?<![\w/.-])((?:examples|benchmarks|docs|hf_control_ft|tests|model_cards)/[\w./-]*\w)",
                           README))
    assert len(paths) > 20
    missing = sorted(p for p in paths if not os.path.exists(os.path.join(ROOT, p)))
    assert not missing, missing


def test_accelerate_configs_and_the_example_yaml_load():
    from accelerate.commands.config.config_args import load_config_from_file

    from hf_control_ft import ElegantConfig
    from hf_control_ft.scripts import ElegantScriptArguments
    from hf_control_ft.utils.config_cli import parse_dataclasses

    expected = {"single_gpu": (1, 1), "multi_gpu": (8, 1), "multi_node": (16, 2)}
    for name, (processes, machines) in expected.items():
        config = load_config_from_file(os.path.join(ROOT, "examples", "accelerate", f"{name}.yaml"))
        assert (config.num_processes, config.num_machines, config.mixed_precision) == (processes, machines, "bf16")
    yaml_path = os.path.join(ROOT, "examples", "text_to_image", "sd15_aesthetic.yaml")
    args, config = parse_dataclasses((ElegantScriptArguments, ElegantConfig),
                                     ["--config", yaml_path, "--prompts_file", "prompts.txt", "--alpha=0.2"])
    assert (args.reward, args.resolution, config.alpha, config.gradient_accumulation_steps) == ("aesthetic", 512, 0.2, 2)


@pytest.mark.slow
def test_quick_start_runs_as_written(tmp_path):
    section = README[README.index("## Quick start"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"pretrained ([\d.]+), ELEGANT ([\d.]+)", done.stdout)
    pretrained, elegant = float(found.group(1)), float(found.group(2))
    assert elegant < 0.1 < pretrained  # the README prints 0.459 -> 0.059
    assert os.path.isfile(tmp_path / "quickstart-out" / "pytorch_lora_weights.safetensors")
