"""Builds sparserl's sparse kernel (sparserl/csrc/sparse_matmul.cc) with the package.

``pip install .`` and ``pip install -e .`` (``make install``) both compile it against the XLA FFI
headers of the installed JAX (``jax.ffi.include_dir()``; jax/jaxlib are build requirements). The
extension is optional: a missing compiler or a failed build prints one line and the install goes on;
``sparsity.compute=sparse`` then tries once more to build on first use (sparserl/sparse_kernel.py)
and otherwise falls back to masked-dense compute with a warning. Everything else is in pyproject.toml.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildSparseKernel(build_ext):
    def build_extension(self, ext):
        try:
            import jax.ffi

            ext.include_dirs.append(jax.ffi.include_dir())
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001  (any failure: install without the kernel, say so in one line)
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            print(f"sparserl: warning: sparse kernel not built ({reason}); "
                  "sparsity.compute=sparse will fall back to masked")


setup(
    ext_modules=[Extension(
        "sparserl._sparse_matmul", ["sparserl/csrc/sparse_matmul.cc"], language="c++", optional=True,
        # -march=native: built where it runs (an install or the first-use build on each machine)
        extra_compile_args=["-O3", "-march=native", "-std=c++17"])],
    cmdclass={"build_ext": BuildSparseKernel},
)
