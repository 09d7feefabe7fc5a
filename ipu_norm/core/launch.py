"""What the launcher says about this process: poprun's instances (environment variables only, no SDK import).

Below ``train/`` and ``ipu/`` so that both read the same answer: the trainer shards data per poprun instance
(train/distributed.py) and the PopTorch adapter builds popdist options (ipu/poptorch_adapter.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping


def under_poprun(environ: Mapping[str, str] | None = None) -> bool:
    """True when this process was launched by ``poprun`` (it exports POPDIST_* variables to every instance)."""
    env = os.environ if environ is None else environ
    return any(k.startswith("POPDIST_") for k in env)


def popdist_rank_and_size(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(instance index, number of instances) from OpenMPI's variables set by poprun's mpirun; (0, 1) otherwise."""
    env = os.environ if environ is None else environ
    return int(env.get("OMPI_COMM_WORLD_RANK", 0)), int(env.get("OMPI_COMM_WORLD_SIZE", 1))
