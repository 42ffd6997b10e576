"""Ray job entrypoint: serve a judge over HTTP on a Ray cluster (Ray Serve), until the job is stopped.

    ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/serve.py \
        --config serve-gpu-qwen2.5-vl-7b --judge /mnt/shared/judges/j1 --host 0.0.0.0 --port 8000

Same options as ``rms-ray serve`` (see ``--help``). Inside a submitted job ``RAY_ADDRESS`` is set, so the job joins
the cluster and Serve's proxy listens on the head node (``--host 0.0.0.0`` to reach it from elsewhere).
``ray job stop`` deletes the application. For a long-lived service, prefer ``serve deploy cluster/serve-judge.yaml``
or the KubeRay RayService in ``cluster/kuberay/`` (Serve keeps the application up without a driver).
"""

import sys

from rms_ray.common.job_entry import run  # standard library only: explains a wrong interpreter in one line

if __name__ == "__main__":
    run("serve", sys.argv[1:], prog="jobs/serve.py")
