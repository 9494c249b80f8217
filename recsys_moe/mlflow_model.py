"""The MLflow pyfunc of a model bundle, logged from code (MLflow's models-from-code).

``recsys_moe.tracking`` logs this *file* as the model's code: ``mlflow.pyfunc.load_model``
(and ``mlflow models serve``) executes it to get the model object, and
:meth:`BundlePyfunc.load_context` rebuilds the model from the bundle artifact's
safetensors weights and JSON, so loading a registered model unpickles nothing.
"""

from __future__ import annotations

import mlflow.pyfunc
from mlflow.models import set_model


class BundlePyfunc(mlflow.pyfunc.PythonModel):
    """A table of raw request rows (``user_id, item_id, domain[, ts, context]``) -> one
    ``score_<task>`` column per task, scored by :class:`recsys_moe.scorer.Scorer`."""

    def load_context(self, context) -> None:
        from recsys_moe.scorer import Scorer

        self.scorer = Scorer.from_dir(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None):
        import polars as pl

        rows = model_input if isinstance(model_input, pl.DataFrame) else pl.from_pandas(model_input)
        return self.scorer.score_frame(rows).to_pandas()


set_model(BundlePyfunc())
