"""The job spec, from YAML to what a run needs.

- ``models``: the pydantic models of Azure ML's ``type: parallel`` YAML and raypar's own keys.
- ``loading``: a spec from a file, a string or a dict, validated, its local paths made absolute.
- ``binding``: a validated spec bound to argv, the append-row file and the worker's plan.
- ``components``: command and parallel components (Azure's component YAML) as specs.
- ``datastores``: ``azureml://datastores/...`` paths resolved to folders or URLs.
- ``runtime_env``: the spec's environment (pip, env vars, credentials) as a Ray runtime env.

Nothing here touches Ray or storage beyond reading the YAML it is given.
"""
