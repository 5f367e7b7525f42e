"""The folder a raypar worker appends to ``sys.path``: it holds ``azureml_user`` only.

(This file makes the folder a package of raypar, so a non-editable install ships it.)
"""
