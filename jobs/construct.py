"""Ray job entrypoint: build an RMS dataset on a Ray cluster.

    ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/construct.py \
        --config configs/gpu-qwen2.5-vl-7b.yaml --input s3://bucket/photos --output /mnt/shared/rms/run1

Same options as ``rms-ray construct`` (see ``--help``). Inside a submitted job ``RAY_ADDRESS`` is set, so the
pipeline joins the cluster instead of starting a local Ray. The output folder must be on a filesystem every node
sees (NFS/EFS/Lustre): engine actors commit their shards there directly.
"""

import sys

from rms_ray.common.job_entry import run  # standard library only: explains a wrong interpreter in one line

if __name__ == "__main__":
    run("construct", sys.argv[1:], prog="jobs/construct.py")
