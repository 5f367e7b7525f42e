"""Shaped like Azure's partition-per-folder sample: reads ``mini_batch_context.partition_key_value``
and ``mini_batch_context.dataset``; one "<file>,<size>,<user>,<genres>,<dataset name>" row per file."""
import os


def init():
    pass


def run(mini_batch, mini_batch_context):
    key = mini_batch_context.partition_key_value
    dataset = mini_batch_context.dataset
    assert os.path.isdir(dataset.path), dataset  # an input raypar made (an MLTable folder)
    return [f"{os.path.basename(p)},{os.path.getsize(p)},{key['user']},{key['genres']},{dataset.name}"
            for p in sorted(mini_batch)]
