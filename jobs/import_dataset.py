"""Ray job entrypoint: convert a published safety dataset into the labelled format on a Ray cluster node.

    ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/import_dataset.py \
        vlguard /mnt/shared/VLGuard/test.json --output /mnt/shared/labelled/vlguard_test.parquet

Same arguments as ``rms-ray import-dataset`` (see ``--help``). The import runs in the job's driver process (no
Ray tasks: it is I/O bound and takes seconds), so SRC, the images and the output must be on a filesystem the
driver's node sees; write the output where ``evaluate`` jobs will read it.
"""

import sys

from rms_ray.common.job_entry import run  # standard library only: explains a wrong interpreter in one line

if __name__ == "__main__":
    run("import-dataset", sys.argv[1:], prog="jobs/import_dataset.py")
