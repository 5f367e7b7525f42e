"""Shaped like Azure's tabular iris sample: ``--model_name`` in the arguments, the model file from
``Model.get_model_path``, the first four columns back with a predicted "variety"."""
import argparse
import json

import numpy as np
from azureml.core.model import Model


def init():
    global cut
    parser = argparse.ArgumentParser(description="Iris-like model serving")
    parser.add_argument("--model_name", dest="model_name", required=True)
    args, _ = parser.parse_known_args()
    with open(Model.get_model_path(args.model_name)) as f:
        cut = json.load(f)["petal_cut"]


def predict(frame):
    """What the sample's pickled scikit-learn model returns: a 1-D numpy string array."""
    return np.array(["setosa" if x < cut else "virginica" for x in frame["petal_length"]])


def run(input_data):
    # Azure's own lines: the prediction reshaped to a column, assigned as a new column
    num_rows, num_cols = input_data.shape
    pred = predict(input_data).reshape((num_rows, 1))
    result = input_data.drop(input_data.columns[4:], axis=1)
    result["variety"] = pred
    return result
