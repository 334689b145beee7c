"""setuptools entry point. Metadata lives in pyproject.toml; this file adds the optional ahead-of-time build of
the C++/CUDA extension:

    PTV2_FAST_BUILD_EXT=1 pip install . --no-build-isolation

(--no-build-isolation so the build sees the installed torch). CUDA sources are compiled when torch has CUDA
and nvcc is found (archs: PTV2_FAST_CUDA_ARCHS, default 8.0 and 9.0). Without the variable nothing is
compiled here and the extension is JIT-built on first use (ptv2_fast/_ext.py).
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def _ext_helpers():
    # ptv2_fast/_ext.py by path: the package itself need not be importable while it is being built
    spec = importlib.util.spec_from_file_location("_ptv2_fast_ext_build", HERE / "ptv2_fast" / "_ext.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def extension_kwargs() -> dict:
    if os.environ.get("PTV2_FAST_BUILD_EXT", "0") != "1":
        return {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    ext = _ext_helpers()
    with_cuda = ext.cuda_wanted()
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ";".join(ext.cuda_archs()))
    sources = [str(p.relative_to(HERE)) for p in ext.sources(with_cuda)]
    cxx = ext.cxx_flags() + (["-DPTV2_FAST_WITH_CUDA"] if with_cuda else [])
    kwargs = dict(name=f"ptv2_fast.{ext.EXT_NAME}", sources=sources, include_dirs=[str(HERE / "csrc")],
                  extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-DPTV2_FAST_WITH_CUDA"]},
                  extra_link_args=["-fopenmp"])
    module = CUDAExtension(**kwargs) if with_cuda else CppExtension(**kwargs)

    class BuildWithTag(BuildExtension):
        """Also writes which torch the library was built against: _ext uses it only with that torch."""

        def run(self):
            super().run()
            for e in self.extensions:
                out = Path(self.get_ext_fullpath(e.name))
                out.with_suffix(".torch").write_text(torch.__version__ + "\n")

    return {"ext_modules": [module], "cmdclass": {"build_ext": BuildWithTag.with_options(no_python_abi_suffix=True)}}


setup(**extension_kwargs())
