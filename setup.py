from setuptools import find_packages, setup

setup(
    name="hf_control_ft",
    version="0.1.0",
    description=(
        "Entropy-regularised reward fine-tuning of diffusion models (ELEGANT, SEIKO) "
        "for the Hugging Face stack"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # the card templates live in the top-level model_cards/ and ship inside the wheel as hf_control_ft/model_cards
    packages=find_packages(include=["hf_control_ft", "hf_control_ft.*"]) + ["hf_control_ft.model_cards"],
    package_dir={"hf_control_ft.model_cards": "model_cards"},
    package_data={"hf_control_ft.model_cards": ["*.md"], "hf_control_ft.feedback": ["*.html", "*.js"]},
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.35,<0.43",
        "peft>=0.17,<0.22",
        "accelerate>=1.0,<1.16",
        "transformers>=4.50,<5.24",
        "huggingface_hub>=0.30,<2.5",
        "datasets>=3.0,<5.3",
        "safetensors>=0.4",
        "numpy",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "scikit-learn",
        "matplotlib",
        "pillow",
        "jinja2>=3.0",
    ],
    extras_require={"dev": ["pytest>=8", "pytest-timeout", "playwright"], "wandb": ["wandb"], "mlflow": ["mlflow"]},
    entry_points={"console_scripts": ["hf-control-ft=hf_control_ft.cli:main"]},
)
