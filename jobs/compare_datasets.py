"""Ray job entrypoint: `rms-ray compare-datasets` on a Ray cluster (same options; see `rms-ray compare-datasets --help`).

    ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/compare_datasets.py \
        --config judge-gpu-qwen2.5-vl-7b --train /mnt/shared/rms/v1 /mnt/shared/sets/vlguard_train.parquet \
        --eval /mnt/shared/sets/mmsafeaware.parquet /mnt/shared/sets/siuo.parquet --output /mnt/shared/studies/s1

Inside a submitted job ``RAY_ADDRESS`` is set, so the training runs and the judge actors join the cluster. Datasets
and the output folder must be on storage every node sees (workers write checkpoints and predictions there).
"""

import sys

from rms_ray.common.job_entry import run  # standard library only: explains a wrong interpreter in one line

if __name__ == "__main__":
    run("compare-datasets", sys.argv[1:], prog="jobs/compare_datasets.py")
