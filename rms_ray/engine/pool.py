"""The Ray Data actor-pool stage around the engine: one place decides how engine actors are scheduled.

Construction (:class:`rms_ray.construct.pipeline.ConstructUDF`) and evaluation
(:class:`rms_ray.judge.evaluate.JudgeUDF`) both call ``ds.map_batches(UDF, **engine_map_kwargs(resources))``.

Why several calls per actor: each actor owns one vLLM engine whose stepping thread batches every request in flight
(see :class:`rms_ray.engine.vllm_engine.VLMEngine`). With ``batches_in_flight`` calls running concurrently in the
actor (``enable_true_multi_threading``), the next batch's requests join the engine while the last candidates of the
previous batch finish, so the engine is not left under-filled at batch boundaries.

Why bounded restarts: Ray Data restarts a dead actor and retries its tasks without limit by default
(``max_restarts=-1``, ``max_task_retries=-1``); an engine that cannot start, or an input that keeps killing it,
would then loop until an outside timeout. Every bound comes from the config (:func:`engine_bounds`):

* ``max_engine_restarts``: Ray restarts an actor whose process died (killed by Ray's memory monitor, SIGKILL,
  a crash), during start-up or later, at most this many times.
* ``max_task_retries``: a batch whose actor died is retried at most this many times, then the job fails.
* ``max_engine_init_deaths``: an actor that is dead before its engine is up (its restarts used up, or vLLM refused
  to start, which Ray never restarts) is replaced by a fresh one at most this many times in a row, then the job
  fails (Ray Data ``max_consecutive_actor_init_deaths``; the count resets when an engine comes up).
* ``engine_init_retries``: an engine start that raised is retried in the same process this many times (Ray Data
  ``actor_init_retry_on_errors``/``actor_init_max_retries``; default 0: vLLM refuses a setting the same way twice).

So an engine actor killed at every start is started at most ``(1 + max_engine_restarts) * (1 +
max_engine_init_deaths)`` times before the job fails (measured: ``tests/test_failures.py``).
"""

from __future__ import annotations

from typing import Any

from rms_ray.common.config import ResourcesConfig


def engine_map_kwargs(resources: ResourcesConfig) -> dict[str, Any]:
    """Keyword arguments of ``Dataset.map_batches`` for an engine actor-pool stage.

    Returns ``compute`` (a fixed-size ``ActorPoolStrategy`` of ``engine_replicas`` actors, ``batches_in_flight``
    concurrent calls each), ``batch_size``, ``num_cpus``/``num_gpus`` per actor, and bounded ``max_restarts`` /
    ``max_task_retries``.
    """
    import ray.data

    k = resources.batches_in_flight
    return {
        "compute": ray.data.ActorPoolStrategy(size=resources.engine_replicas, max_tasks_in_flight_per_actor=k,
                                              max_concurrent_calls_per_actor=k, enable_true_multi_threading=k > 1),
        "batch_size": resources.batch_size,
        "num_cpus": resources.num_cpus_per_engine,
        "num_gpus": resources.num_gpus_per_engine,
        "max_restarts": resources.max_engine_restarts,
        "max_task_retries": resources.max_task_retries,
    }


def engine_bounds(resources: ResourcesConfig) -> dict[str, Any]:
    """The Ray Data ``DataContext`` settings that bound engine start-up failures (see the module docstring)."""
    return {
        "max_consecutive_actor_init_deaths": resources.max_engine_init_deaths,
        "actor_init_retry_on_errors": resources.engine_init_retries > 0,
        "actor_init_max_retries": resources.engine_init_retries,
    }


def map_engine(ds: Any, udf: type, resources: ResourcesConfig, **kwargs: Any) -> Any:
    """``ds.map_batches(udf, **engine_map_kwargs(resources), **kwargs)``: the engine actor-pool stage, with the
    start-up bounds of :func:`engine_bounds` set on the returned dataset's own ``DataContext``.

    Ray 2.60 has no named parameter for ``max_restarts`` / ``max_task_retries`` yet and warns that passing them
    as remote args is deprecated; the bound matters more than the warning, which is silenced here only.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        out = ds.map_batches(udf, **engine_map_kwargs(resources), **kwargs)
    # A Dataset snapshots the process's DataContext when it is created and executes with its own copy; setting the
    # process-wide one here would miss a dataset made earlier (and leak into unrelated ones).
    for key, value in engine_bounds(resources).items():
        setattr(out.context, key, value)
    return out
