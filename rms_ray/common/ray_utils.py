"""One way to start or join Ray, for every command (construct, evaluate, train, serve), and to leave nothing behind.

A local start gets a scratch folder of its own (``rms_ray_*`` in the system temp folder: Ray's session files and
logs, and the engines' scratch files, see :func:`rms_ray.engine.vllm_engine.engine_scratch_dir`);
:func:`shutdown_ray` removes it, at the end of a run and on failure. ``RMS_RAY_TMPDIR`` names a folder to use
instead; it is the caller's and is kept (set it to keep Ray's logs of a failed run).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

#: Environment variable naming a folder for engine scratch files (read by rms_ray.engine.vllm_engine).
SCRATCH_ENV = "RMS_RAY_RUN_TMP"

_session: dict[str, Any] = {}  # what init_ray set up in this process: tmp folder, env to restore, stderr filter


def configure_ray_data() -> None:
    """Ray Data settings of every rms_ray driver (called by :func:`init_ray`).

    * Quiet: our own tqdm bar reports progress; Ray Data's periodic progress logs would bury it. Ray Data also
      warns, once per process, that its progress bars are disabled: we disabled them on purpose.
    * ``use_datasource_v2 = False``: Ray 2.60's V2 Parquet path plans ``read_parquet`` as a ``ListFiles`` task
      that always asks for 1 CPU (``ray/data/_internal/planner/plan_list_files_op.py``: no way to pass
      ``num_cpus``). A study trains and evaluates side by side, and an evaluation's engine actor holds a whole
      CPU: on a 2-CPU cluster the 1-CPU listing task then never finds a free CPU and the run hangs (measured). The
      V1 path reads with the ``num_cpus`` we give (``resources.decode_num_cpus``).
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = False
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    from rms_ray.common.failures import one_line_ray_data_console

    one_line_ray_data_console()  # its warnings as one line each; a failure is rms_ray's one `error:` line


def init_ray(num_cpus: int | None = None, address: str | None = None) -> bool:
    """Connect to Ray: ``address`` (or ``RAY_ADDRESS``, e.g. inside ``ray job submit``) if given, else start a
    local one with ``num_cpus`` logical CPUs (None: detect). Returns True if this call started Ray; then call
    :func:`shutdown_ray` when done (it also removes the scratch folder this call created)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray prints every retry of a task (an engine actor's start-up probe, a batch whose actor died) with the whole
    # worker traceback. Retries are bounded by the config and a failure that remains is reported as one line with
    # a log file; the deaths themselves are still printed by Ray, one line each.
    os.environ.setdefault("RAY_enable_output_error_log_if_still_retry", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    configure_ray_data()
    _session.clear()
    if address:
        # Joining a cluster (e.g. inside `ray job submit`): the workers run on other machines, and their stdout /
        # stderr (engine start-up, vLLM's warnings, a worker's traceback) reach the user only through this driver,
        # i.e. the job's log. Ray's "connecting to ..." line stays: worth seeing.
        ray.init(address=address, log_to_driver=True)
        _filter_native_stderr()
        logging.getLogger("rms_ray").info("ray: joined the cluster at %s; its workers' output is shown here", address)
        return True
    given = os.environ.get("RMS_RAY_TMPDIR")
    tmp = given or tempfile.mkdtemp(prefix="rms_ray_")
    _session["tmp"] = None if given else tmp
    _session["env"] = {SCRATCH_ENV: os.environ.get(SCRATCH_ENV)}  # restored at shutdown
    # Ray turns token authentication on for a new local cluster and warns about it on every start, suggesting to
    # opt out of the protection: keep the protection, drop the warning.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # engine actors inherit the driver's environment on a local cluster: their scratch files go into ours
    os.environ[SCRATCH_ENV] = os.path.join(tmp, "engines")
    try:
        # A local start stays quiet (log_to_driver=False): each engine start prints dozens of vLLM lines per actor
        # that would bury the progress bar and rms_ray's milestones on a terminal. A failure's worker traceback still
        # reaches the user: it is inside the exception, written to the run's log file (rms_ray.common.failures).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, _temp_dir=tmp)
    except BaseException:
        _cleanup_session()
        raise
    _filter_native_stderr()
    logging.getLogger("rms_ray").info(
        "ray: started a local instance (%s CPUs); worker logs under %s%s", num_cpus or "all", tmp,
        "" if given else " until the run ends (set RMS_RAY_TMPDIR to keep them)")
    return True


def _filter_native_stderr() -> None:
    # After ray.init: Ray's own processes are spawned by then and keep the real stderr; only this driver's
    # native writes (its core worker's log lines) pass through the filter. See rms_ray.common.console.
    from rms_ray.common.console import NativeStderrFilter

    _session["filter"] = NativeStderrFilter().start()


def shutdown_ray() -> None:
    """``ray.shutdown()`` and remove the scratch folder :func:`init_ray` created (never one named by
    ``RMS_RAY_TMPDIR``). Safe to call on failure paths and more than once."""
    import ray

    try:
        ray.shutdown()
    finally:
        _cleanup_session()


def _cleanup_session() -> None:
    if not _session:
        return
    if _session.get("filter") is not None:
        _session["filter"].stop()
    for key, old in (_session.get("env") or {}).items():
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
    tmp = _session.get("tmp")
    _session.clear()
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
