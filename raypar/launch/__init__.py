"""Sending and following jobs elsewhere: the front ends' shared back half.

- ``submission``: ``raypar submit``, a job sent to a cluster's Jobs API with its runtime env.
- ``jobs_api``: the Jobs API HTTP client.
- ``kube``: ``raypar kube render``, a KubeRay RayJob for a spec.
- ``handles``: the Python API's job handles (``LocalJob``; ``SubmittedJob`` is in submission).
"""
