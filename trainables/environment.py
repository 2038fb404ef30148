"""Where a run ran: software versions, hardware, threads, determinism settings, code version.

:func:`collect_environment` is called in the process that trains (a trial's Ray worker, the
report's re-runs) and in the driver (the search's parent run): a trial on a GPU node of a
cluster records that node's GPU and CUDA, not the driver's. The driver stores the values as
MLflow tags with the prefix ``env.`` (:mod:`tuner.tracking`); this module imports nothing of the
project, so a trial needs no driver code for it.

Every value is a short string; what cannot be found reads ``unknown`` and what does not apply
(the CUDA version of a CPU-only torch, the GPU model on a CPU node) reads ``none``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

import torch

__all__ = ["PACKAGES", "collect_environment", "cpu_model", "cuda_environment", "git_state"]

#: the packages whose versions are recorded (``<name>_version``)
PACKAGES = ("torch", "ray", "optuna", "mlflow", "transformers", "numpy")


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware")) and ":" in line:
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str, str]:
    """``(commit, dirty)`` of the checkout this code runs from (``unknown`` outside git):
    dirty is ``true`` when tracked files differ from the commit."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"
    if commit.returncode != 0 or status.returncode != 0:
        return "unknown", "unknown"
    return commit.stdout.strip(), "true" if status.stdout.strip() else "false"


def cuda_environment(cuda=None) -> dict[str, str]:
    """CUDA, cuDNN and the GPUs this process sees (after Ray's ``CUDA_VISIBLE_DEVICES``).

    ``cuda``: the ``torch.cuda`` module (tests pass a stand-in where no GPU is lent)."""
    cuda = cuda if cuda is not None else torch.cuda
    out = {"cuda_version": str(torch.version.cuda or "none"), "cudnn_version": "none",
           "gpu_count": "0", "gpu_model": "none"}
    try:
        if torch.backends.cudnn.is_available():
            out["cudnn_version"] = str(torch.backends.cudnn.version())
    except Exception:  # noqa: BLE001 - a broken CUDA install must not stop a trial
        out["cudnn_version"] = "unknown"
    try:
        if cuda.is_available():
            count = int(cuda.device_count())
            names = sorted({str(cuda.get_device_name(i)) for i in range(count)})
            out["gpu_count"] = str(count)
            out["gpu_model"] = ", ".join(names) or "none"
    except Exception:  # noqa: BLE001
        out["gpu_count"], out["gpu_model"] = "unknown", "unknown"
    return out


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def collect_environment(cuda=None) -> dict[str, str]:
    """The environment of this process, as short strings (keys without a prefix).

    ``threads`` is torch's intra-op thread count now (call it after the trial has set it);
    the determinism keys are torch's settings and the environment variables that change
    results (``PYTHONHASHSEED``, ``CUBLAS_WORKSPACE_CONFIG``)."""
    env = {
        "python": platform.python_version(),
        **{f"{name}_version": _version(name) for name in PACKAGES},
        **cuda_environment(cuda),
        "cpu_model": cpu_model(),
        "cpu_count": str(os.cpu_count() or "unknown"),
        "threads": str(torch.get_num_threads()),
        "platform": platform.platform(terse=True),
        "deterministic_algorithms": str(torch.are_deterministic_algorithms_enabled()).lower(),
        "cudnn_deterministic": str(bool(torch.backends.cudnn.deterministic)).lower(),
        "cudnn_benchmark": str(bool(torch.backends.cudnn.benchmark)).lower(),
        "tf32_matmul": str(bool(torch.backends.cuda.matmul.allow_tf32)).lower(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "pythonhashseed": os.environ.get("PYTHONHASHSEED", "unset"),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG", "unset"),
    }
    env["git_commit"], env["git_dirty"] = git_state()
    return env
