"""One way to start or join Ray, for every command (construct, evaluate, train, serve)."""

from __future__ import annotations

import os
import tempfile


def quiet_ray_data() -> None:
    """Our own tqdm bar reports progress; Ray Data's periodic progress logs would bury it."""
    import logging

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def init_ray(num_cpus: int | None = None, address: str | None = None) -> bool:
    """Connect to Ray: ``address`` (or ``RAY_ADDRESS``, e.g. inside ``ray job submit``) if given, else start a
    local one with ``num_cpus`` logical CPUs (None: detect). Returns True if this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    quiet_ray_data()
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 _temp_dir=os.environ.get("RMS_RAY_TMPDIR") or tempfile.mkdtemp(prefix="rms_ray_"))
    return True
