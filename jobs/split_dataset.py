"""Ray job entrypoint: split a labelled file into train and test files (by image hash) on a Ray cluster node.

    ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/split_dataset.py \
        /mnt/shared/labelled/mmsafeaware.parquet --output /mnt/shared/labelled/mmsafeaware --test-fraction 0.3

Same arguments as ``rms-ray split-dataset`` (see ``--help``). It streams in the job's driver process (no Ray
tasks: I/O bound), so the input and the output folder must be on a filesystem the driver's node sees.
"""

import sys

from rms_ray.common.job_entry import run  # standard library only: explains a wrong interpreter in one line

if __name__ == "__main__":
    run("split-dataset", sys.argv[1:], prog="jobs/split_dataset.py")
