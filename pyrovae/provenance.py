"""Where a figure came from: versions, device, processor, git commit and command line.

Every result pyrovae writes (a run's ``metrics.json``, every experiment's JSON) carries
:func:`provenance`, since a timing or a figure means little without the machine and code behind it.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import pyro
import torch

__all__ = ["provenance", "machine"]


def provenance(device: torch.device | str | None = None) -> dict:
    """Versions, device, git commit and command line, saved beside every result."""
    import torchvision

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "pyro": pyro.__version__, "torchvision": torchvision.__version__},
        "device": str(device) if device is not None else None,
        "cpu_threads": torch.get_num_threads(),
        "machine": machine(),
        "git_commit": commit,
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }


def machine() -> dict:
    """The processor (model name, logical cores) and the GPU, if any: what every timing depends on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "gpu": gpu}
