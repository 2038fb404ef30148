"""The model file of the MLflow Model that :func:`trainables.serving.save_pyfunc` writes.

MLflow's "models from code": the saved model holds this file and runs it when it loads, instead
of unpickling a Python object. Nothing imports it.
"""

from mlflow.models import set_model

from trainables.serving import FusionModel

set_model(FusionModel())
