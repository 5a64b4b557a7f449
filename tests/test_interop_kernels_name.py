"""The repository root on sys.path must not break transformers (the folder kernels/ vs the PyPI `kernels`).

transformers imports its hub-kernels integration (`from kernels import CUDAProperties, ...`) when the PyPI
package `kernels` is installed (a dependency of transformers 5); with the repository root first on sys.path the
import used to find this repository's kernels/ folder instead and fail.
"""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pypi_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_transformers_imports_in_process():
    """Under pytest (pythonpath = ["."]) transformers' modelling code, which pulls hub_kernels, imports."""
    assert str(ROOT) in [os.path.realpath(p or os.curdir) for p in sys.path]
    from transformers import AutoModelForMaskedLM, LlamaForCausalLM  # noqa: F401
    from transformers.integrations import hub_kernels  # noqa: F401

    import kernels

    assert Path(kernels.__file__).resolve().parent != ROOT / "kernels"
    if _pypi_kernels_installed():
        assert kernels.__version__ == importlib.metadata.version("kernels")


@pytest.mark.multiprocess
def test_transformers_imports_from_the_root_in_a_subprocess():
    """`python -c` from the root: the root is sys.path[0], as for `python -m scripts.<name>`."""
    code = (
        "import transformers\n"
        "from transformers import LlamaForCausalLM\n"
        "from transformers.integrations import hub_kernels\n"
        "import kernels, dlm_kernels\n"
        "print(kernels.__file__)\n"
        "print(dlm_kernels.masked_linear_cross_entropy.__module__)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    kernels_file, dlm_module = out.stdout.split()
    assert Path(kernels_file).resolve().parent != ROOT / "kernels"
    assert dlm_module == "dlm_kernels.masked_ce"


@pytest.mark.multiprocess
def test_without_the_pypi_package_the_folder_name_is_an_empty_module():
    """`python -S` hides site-packages: `import kernels` then finds only the folder, which must export nothing
    and carry no __version__ (transformers then reports hub kernels unavailable instead of importing them)."""
    code = (
        "import sys; sys.path.insert(0, '.')\n"
        "import kernels\n"
        "print(hasattr(kernels, '__version__'), hasattr(kernels, 'masked_linear_cross_entropy'))\n"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"]
