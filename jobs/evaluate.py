"""Ray job entrypoint: evaluate a judge on labelled datasets on a Ray cluster.

    ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/evaluate.py \
        --config judge-gpu-qwen2.5-vl-7b --judge /mnt/shared/judges/j1 \
        --datasets /mnt/shared/eval/mmsafeaware.parquet /mnt/shared/eval/figstep.parquet --output /mnt/shared/evals/j1

Same options as ``rms-ray evaluate`` (see ``--help``). Inside a submitted job ``RAY_ADDRESS`` is set, so the job
joins the cluster. Datasets and the output folder must be on storage every node sees: judge actors read images
and write their prediction shards there directly.
"""

import sys

from rms_ray.common.job_entry import run  # standard library only: explains a wrong interpreter in one line

if __name__ == "__main__":
    run("evaluate", sys.argv[1:], prog="jobs/evaluate.py")
