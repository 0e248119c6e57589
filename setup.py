"""Build clipforge: `clipforge` from engine/, `clipforge.kernels` from kernels/, and the C++ extension
`clipforge._C` from csrc/ (pybind11 through torch.utils.cpp_extension).

Install with `pip install --no-build-isolation -e .`: an isolated build would download its own torch
and compile the extension against it.
"""
import glob
import os

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as exc:  # pragma: no cover - clear message instead of a stack trace
    raise SystemExit(
        "clipforge builds its C++ extension against the installed torch: install torch first "
        "(pip install torch==2.13.0) and build with `pip install --no-build-isolation -e .`"
    ) from exc

HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
    scope = {}
    with open(os.path.join(HERE, "engine", "version.py")) as f:
        exec(f.read(), scope)
    return scope["__version__"]


def _extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return []
    extra = ["-O3", "-std=c++17"]
    link = []
    if os.environ.get("CLIPFORGE_NO_OPENMP") != "1":
        extra.append("-fopenmp")
        link.append("-fopenmp")
    return [
        CppExtension(
            name="clipforge._C",
            sources=sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": extra},
            extra_link_args=link,
        )
    ]


setup(
    name="clipforge",
    version=_version(),
    description="Fast CLIP training and serving: Triton kernels, chunked contrastive loss, DeepSpeed, DALI",
    # the data folders are listed as packages so that setuptools ships them without deprecation warnings
    packages=["clipforge", "clipforge.model", "clipforge.data", "clipforge.train", "clipforge.serve",
              "clipforge.kernels", "clipforge.assets", "clipforge.assets.templates"],
    package_dir={"clipforge": "engine", "clipforge.kernels": "kernels"},
    package_data={"clipforge.assets": ["*.gz", "*.txt", "*.yaml"], "clipforge.assets.templates": ["*.json"]},
    include_package_data=True,
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
    python_requires=">=3.10",
    # torch is deliberately not pinned here: the set-up script pins it for this machine, and GPU
    # clusters bring their own CUDA build.
    install_requires=["torch>=2.1", "numpy", "pyyaml", "ftfy", "regex", "tqdm", "safetensors", "pillow"],
    extras_require={
        "train": ["deepspeed>=0.14", "tensorboard", "matplotlib"],
        "data": ["nvidia-dali-cuda120"],
        "kernels": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "open-clip-torch"],
    },
    entry_points={"console_scripts": ["clipforge=clipforge.cli:main"]},
    zip_safe=False,
)
