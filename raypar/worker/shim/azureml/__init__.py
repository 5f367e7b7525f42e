"""raypar's stand-in for the ``azureml`` namespace (only ``azureml.core.Model``), for entry scripts.

The folder holding it is appended last to a worker's ``sys.path``, so an
installed azureml-core wins. The namespace is extended, as azureml's own
packages do, so an installed ``azureml.*`` package without ``azureml.core``
still imports next to this one.
"""

__path__ = __import__("pkgutil").extend_path(__path__, __name__)
