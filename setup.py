from setuptools import find_packages, setup

setup(
    name="lmcache-kvtc",
    version="0.1.0",
    description="KV Cache Transform Coding (KVTC) as an LMCache extension",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    packages=find_packages(include=["lmcache_kvtc", "lmcache_kvtc.*", "calibration", "calibration.*", "benchmarks"]),
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "tqdm",
        "lmcache==0.5.6",  # pinned: its serde/L2/plugin APIs move between versions
        "redis",
        "cryptography",  # sealed blobs (AES-GCM); LMCache's key providers import it too
    ],
    extras_require={
        "gpu": ["nvidia-nvcomp-cu12==6.0.0.12"],
        "calibrate": ["transformers>=5.0", "gguf", "accelerate", "matplotlib"],
        "test": ["pytest", "ruff"],
    },
    entry_points={"console_scripts": ["kvtc=lmcache_kvtc.cli:main",
                                     "kvtc-lmcache-server=lmcache_kvtc.lmcache.launcher:main"]},
)
