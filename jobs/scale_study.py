"""Ray job entrypoint: `rms-ray scale-study` on a Ray cluster (same options; see `rms-ray scale-study --help`).

    ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/scale_study.py \
        --config judge-gpu-qwen2.5-vl-7b --train /mnt/shared/rms/v1 --sizes 1000,2000,5000,10000 --seeds 3 \
        --eval /mnt/shared/sets/mmsafeaware.parquet --output /mnt/shared/studies/scale1

Inside a submitted job ``RAY_ADDRESS`` is set, so the training runs and the judge actors join the cluster. Datasets
and the output folder must be on storage every node sees (workers write checkpoints and predictions there).
"""

import sys

from rms_ray.common.job_entry import run  # standard library only: explains a wrong interpreter in one line

if __name__ == "__main__":
    run("scale-study", sys.argv[1:], prog="jobs/scale_study.py")
