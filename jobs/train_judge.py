"""Ray job entrypoint: fine-tune a safety judge with Ray Train on a Ray cluster.

    ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/train_judge.py \
        --config judge-gpu-qwen2.5-vl-3b --train /mnt/shared/data/rms-train.parquet \
        --val /mnt/shared/data/rms-val.parquet --output /mnt/shared/judges/j1

Same options as ``rms-ray train-judge`` (see ``--help``). Inside a submitted job ``RAY_ADDRESS`` is set, so the
job joins the cluster. The data and the output folder must be on storage every node sees: Ray Data reads the rows
on any node, and every Ray Train worker writes its checkpoints under ``<output>/_ray``. Resubmitting the same
command resumes from the latest checkpoint; the judge is ``<output>/model``.
"""

import sys

from rms_ray.common.job_entry import run  # standard library only: explains a wrong interpreter in one line

if __name__ == "__main__":
    run("train-judge", sys.argv[1:], prog="jobs/train_judge.py")
