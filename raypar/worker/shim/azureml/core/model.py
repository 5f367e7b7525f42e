"""``azureml.core.model.Model``: only ``Model.get_model_path``, resolved through raypar's model mapping.

Azure looks the name up in its workspace registry; raypar looks it up in the
mapping the user set once (``raypar.models`` in the spec, or ``RAYPAR_MODELS``;
see raypar/azureml/compat/models.py and docs/entry-scripts.md).
"""

from __future__ import annotations

from raypar.azureml.compat.models import model_path


class Model:
    """A registered model; raypar offers only the static ``get_model_path``."""

    @staticmethod
    def get_model_path(model_name: str, version=None, _workspace=None) -> str:
        """The local path of ``model_name`` (a file or a folder), as the model mapping gives it.

        Args:
            model_name: the name the model was registered under in Azure.
            version: looked up as ``name:version`` first, then as ``name``.
            _workspace: accepted and ignored (raypar has no workspace).

        Raises:
            raypar.errors.ModelNotFoundError: the name is not in the mapping.
        """
        return model_path(model_name, version)
