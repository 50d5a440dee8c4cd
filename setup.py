#!/usr/bin/env python
"""d2seg: semantic, instance and panoptic segmentation on top of detectron2."""
from setuptools import find_packages, setup

setup(
    name="d2seg",
    version="0.1.0",
    description="Detectron2 extension: U-Net, DeepLab, PSPNet, Dice/Focal/Tversky losses, "
    "synthetic catalogs, train_net for semantic, instance and panoptic segmentation",
    packages=find_packages(exclude=("tests", "tools", "configs")),
    python_requires=">=3.9",
    # torch, torchvision and detectron2 are installed separately (see README): none of them
    # has one PyPI name that works everywhere.
    install_requires=[
        "numpy",
        "opencv-python-headless",
        "pycocotools>=2.0.7",
        "fvcore>=0.1.5",
        "matplotlib",
        "Pillow",
        "tqdm",
    ],
    extras_require={"test": ["pytest>=7", "pytest-timeout"]},
)
