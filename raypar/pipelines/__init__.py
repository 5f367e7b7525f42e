"""Pipelines: Azure ML pipeline YAML (``type: pipeline``) of parallel and command steps.

- ``loading``: the pipeline YAML read, its steps bound to each other's outputs.
- ``run``: the steps run in order on one Ray, each step a job dir of its own, resumable.
"""
