"""Shaped like Azure's tabular iris sample: ``--model_name`` in the arguments, the model file from
``Model.get_model_path``, the first four columns back with a predicted "variety"."""
import argparse
import json

from azureml.core.model import Model


def init():
    global cut
    parser = argparse.ArgumentParser(description="Iris-like model serving")
    parser.add_argument("--model_name", dest="model_name", required=True)
    args, _ = parser.parse_known_args()
    with open(Model.get_model_path(args.model_name)) as f:
        cut = json.load(f)["petal_cut"]


def run(input_data):
    result = input_data.drop(input_data.columns[4:], axis=1)
    result["variety"] = ["setosa" if x < cut else "virginica" for x in input_data["petal_length"]]
    return result
