"""The ranking service (Ray Serve). Importing it imports :mod:`recsys_moe.cluster` first:
Ray reads its authentication setting when it is imported, and every module here imports
Ray."""

import recsys_moe.cluster  # noqa: F401
