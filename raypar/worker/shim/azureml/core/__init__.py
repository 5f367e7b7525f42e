"""``azureml.core`` as raypar's workers offer it: ``Model`` only (``from azureml.core import Model``)."""

from .model import Model

__all__ = ["Model"]
