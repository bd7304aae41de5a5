"""The pyfunc entry point MLflow stores with every registered Astromer ("models from code").

MLflow copies this file into the logged model and runs it on load, so the pyfunc wrapper is never
pickled; the weights themselves are the ``model_dir`` artifact (safetensors + config.json).
"""
import mlflow

from astromer.registry import AstromerEmbedder

mlflow.models.set_model(AstromerEmbedder())
