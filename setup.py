"""Packaging for megatron-terapipe: TeraPipe token-level pipeline parallelism for Megatron."""

import os

from setuptools import find_packages, setup

README = "README.md"

setup(
    name="megatron-terapipe",
    version="0.1.0",
    description="TeraPipe token-level pipeline parallelism as a plugin for megatron-core",
    long_description=open(README, encoding="utf-8").read() if os.path.exists(README) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_terapipe", "megatron_terapipe.*"]),
    install_requires=[
        # No upper bound: the private SDPA ops prefix attention calls are pinned by schema
        # (megatron_terapipe/compat/sdpa_ops.py), checked against the installed torch by a test.
        "torch>=2.4",
        # 0.17+ needs Python >= 3.12, so pip takes 0.16.1 on 3.10/3.11 and 0.19.x on 3.12+.
        "megatron-core>=0.16.1,<0.20",
        "numpy>=1.24",
        # megatron-core's async checkpoint writers need it (and hang without it); not declared
        # by megatron-core itself.
        "psutil>=5",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout>=2.1",
            "hypothesis>=6",
            "ruff>=0.4",
            "matplotlib>=3.7",
        ],
        "plot": ["matplotlib>=3.7"],
        # GPU-only; apex has no wheel: build it from source (see README).
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={
        "console_scripts": [
            "terapipe-simulate=megatron_terapipe.simulate.cli:main",
            "terapipe-plan=megatron_terapipe.slicing.cli:main",
        ]
    },
)
