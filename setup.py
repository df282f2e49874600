from setuptools import setup

setup(
    name="snnadv",
    version="0.1.0",
    description="Adversarial robustness of deep spiking neural networks, on snnTorch (Sharmin et al., ECCV 2020)",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=["snnadv", "snnadv.models", "snnadv.kernels", "snnadv.analysis", "snnadv.attacks", "snnadv.paths", "snnadv.cli"],
    package_dir={"snnadv.cli": "cli"},
    install_requires=["torch>=2.2", "torchvision>=0.17", "snntorch>=0.9", "numpy", "scipy", "click>=8.1", "rich>=13", "psutil>=5.9"],
    extras_require={"dev": ["pytest>=7", "torchattacks>=3.5", "matplotlib>=3.7"],
                    "plots": ["matplotlib>=3.7"], "attacks": ["torchattacks>=3.5"],
                    # the SpikingJelly peer of `snnadv bench`: what its layers and neurons import;
                    # SpikingJelly itself goes in with --no-deps (its wheel's dependencies would pull
                    # torchaudio, tensorboard and more, and can replace torch: see the README)
                    "peers": ["loguru>=0.7,<1"]},
    entry_points={"console_scripts": ["snnadv=snnadv.cli.main:main"]},
)
