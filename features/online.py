"""Online feature assembly: request rows + the feature store's lookup tables -> the same
feature columns the training examples have, computed with the same functions.

Used by serving and batch scoring. Unknown users and items are not errors: their
attributes are null (encoded as the out-of-vocabulary index, numerics as the training
mean) and their history is empty (count 0, the task prior as rate, maximal recency).
"""

from __future__ import annotations

import polars as pl

from features.history import derive_history
from features.spec import FeatureSpec


def assemble(
    requests: pl.DataFrame, tables: dict[str, pl.DataFrame], spec: FeatureSpec
) -> pl.DataFrame:
    """Join the lookup tables onto request rows and derive the history features.

    Args:
        requests: one row per (user, item, domain, timestamp [, context]) to score;
            the timestamp is "now" for recency.
        tables: ``users``, ``items``, ``user_domain``, ``item_domain`` as written by the
            feature pipeline (attributes + raw aggregates).
    Returns:
        the rows with every raw feature column, ready for ``features.examples.encode``.
    """
    df = requests.join(tables["users"], on=spec.user_id, how="left", maintain_order="left")
    df = df.join(tables["items"], on=spec.item_id, how="left", maintain_order="left")
    if spec.history_features:
        df = df.join(
            tables["user_domain"], on=[spec.user_id, spec.domain], how="left", maintain_order="left"
        )
        df = df.join(
            tables["item_domain"], on=[spec.item_id, spec.domain], how="left", maintain_order="left"
        )
        df = derive_history(df, spec)
    return df
