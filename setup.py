from setuptools import find_packages, setup

setup(
    name="lmcache-kvtc",
    version="0.4.0",  # 0.4: default ratio 12 (was 16); 0.3: default calibration on State of the Union prose + code
    description="KV Cache Transform Coding (KVTC) as an LMCache extension",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    # only the library: calibration/ (offline models, texts, the main job) and benchmarks/ are checkout tools
    packages=find_packages(include=["lmcache_kvtc", "lmcache_kvtc.*"]),
    install_requires=["torch>=2.4", "numpy", "safetensors"],  # the codec, blobs and calibration files
    extras_require={
        # the serde, classic plugin, loader adapter and sealed blobs
        "lmcache": ["lmcache==0.5.6", "redis", "cryptography"],  # 0.5.6 pinned: its serde/L2/plugin APIs move
        "calibrate": ["transformers>=5.0", "tqdm", "matplotlib"],  # lmcache_kvtc.calibrate
        "gpu": ["nvidia-nvcomp-cu12==6.0.0.12"],
        # LMCache's `valkey` L2 adapter (Valkey / Redis Cluster); the plain `valkey-glide` is async-only
        "valkey": ["valkey-glide-sync==2.6.0"],
        "test": ["pytest", "ruff", "gguf", "accelerate"],  # + the checkout's offline models (GGUF parts)
    },
    entry_points={"console_scripts": ["kvtc=lmcache_kvtc.cli:main",
                                     "kvtc-lmcache-server=lmcache_kvtc.lmcache.launcher:main"]},
)
