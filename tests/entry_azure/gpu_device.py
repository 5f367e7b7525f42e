"""Logs the GPU Azure's runtime (here Ray) gives this worker process."""
import os

from azureml_user.parallel_run import EntryScript


def init():
    entry_script = EntryScript()
    entry_script.logger.info("gpu: %s CUDA_VISIBLE_DEVICES=%s AZ_BATCHAI_GPU_COUNT_FOUND=%s",
                             entry_script.agent_name, os.environ.get("CUDA_VISIBLE_DEVICES"),
                             os.environ.get("AZ_BATCHAI_GPU_COUNT_FOUND"))


def run(mini_batch):
    return [os.path.basename(path) for path in mini_batch]
