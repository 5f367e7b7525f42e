"""Azure ML style run(mini_batch, mini_batch_context) with partition_keys: the key values of the
batch come in mini_batch_context.partition_key_value (v1's total_file_size sample does the same)."""
import os

from azureml_user.parallel_run import EntryScript


def init():
    EntryScript().logger.info("init: partitioned input")


def run(mini_batch, mini_batch_context):
    key_value = mini_batch_context.partition_key_value
    EntryScript().logger.info("run: partition %s, %d file(s)", key_value, len(mini_batch))
    return ["{} {} {} {}".format(key_value["region"], key_value["year"], os.path.basename(path), os.path.getsize(path))
            for path in mini_batch]
