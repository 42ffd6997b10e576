"""Ray job entrypoint: evaluate an OpenAI-compatible chat model on RMS data with a served judge.

    ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/eval_model.py \
        --endpoint http://vllm.internal:8000/v1 --model Qwen/Qwen2.5-VL-7B-Instruct \
        --dataset /mnt/shared/rms/v1 --judge-url http://judge.internal:8000 --output /mnt/shared/evals/qwen7b

Same options as ``rms-ray eval-model`` (see ``--help``). The job is an HTTP client (no engine of its own); the
output folder must be absolute (a job runs in a temporary copy of the working directory) and a rerun resumes.
"""

import sys

from rms_ray.common.job_entry import run  # standard library only: explains a wrong interpreter in one line

if __name__ == "__main__":
    run("eval-model", sys.argv[1:], prog="jobs/eval_model.py")
