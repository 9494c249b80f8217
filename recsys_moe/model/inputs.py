"""Model inputs: what the model reads from a feature-store manifest, and batches of it.

:class:`InputSpec` is built from ``manifest.json`` (features, vocab sizes, normalisation
stats, tasks, domains). :class:`ExampleTensors` turns encoded example columns (Arrow /
Polars, as written by the feature pipeline or produced online) into tensors once, with
no per-row Python, and cuts :class:`Batch` es from them: sparse features as a torchrec
``KeyedJaggedTensor`` (multi-valued features supported), numeric features normalised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass(frozen=True)
class SparseFeature:
    name: str
    column: str
    vocab_size: int
    multi_valued: bool
    # where it comes from (the manifest's "source"): "id" for the user and item ids,
    # "domain", "user", "item", "context", "derived"
    source: str = ""


@dataclass(frozen=True)
class DenseFeature:
    name: str
    column: str
    mean: float
    std: float


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    funnel_parent: str
    weight: float
    column: str


@dataclass(frozen=True)
class InputSpec:
    """Everything the model needs to know about its inputs (from the manifest)."""

    sparse: list[SparseFeature]
    dense: list[DenseFeature]
    tasks: list[Task]
    domain_column: str
    domains: list[str]  # index 1.. in vocabulary order; index 0 is out-of-vocabulary

    @property
    def n_domains(self) -> int:
        """K, including the out-of-vocabulary slot 0."""
        return len(self.domains) + 1

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @classmethod
    def from_manifest(cls, m: dict[str, Any]) -> InputSpec:
        sparse = [
            SparseFeature(
                f["name"],
                f["column"],
                int(f["vocab_size"]),
                bool(f["multi_valued"]),
                f.get("source", ""),
            )
            for f in m["features"]["categorical"]
        ]
        dense = [
            DenseFeature(f["name"], f["column"], float(f["mean"]), float(f["std"]))
            for f in m["features"]["numeric"]
        ]
        tasks = [
            Task(
                t["name"],
                t["kind"],
                t.get("funnel_parent", ""),
                float(t.get("weight", 1.0)),
                t["column"],
            )
            for t in m["tasks"]
        ]
        dom = next(f for f in m["features"]["categorical"] if f["source"] == "domain")
        return cls(sparse, dense, tasks, dom["column"], list(m["domains"]))


@dataclass
class Batch:
    """One batch. sparse: KJT with F keys; dense: (B, N); domain: (B,); labels: (B, T) or None."""

    sparse: KeyedJaggedTensor
    dense: torch.Tensor
    domain: torch.Tensor
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.dense.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        if torch.device(device).type == "cpu" and self.dense.device.type == "cpu":
            return self
        labels = self.labels.to(device) if self.labels is not None else None
        return Batch(self.sparse.to(device), self.dense.to(device), self.domain.to(device), labels)


def _list_parts(arr: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, lengths) of a list column; null lists have length 0."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
    values = pc.list_flatten(arr).to_numpy(zero_copy_only=False)
    return np.array(values, dtype=np.int64), np.array(lengths, dtype=np.int64)


class ExampleTensors:
    """Encoded examples held as tensors; :meth:`batch` gathers any subset into a :class:`Batch`."""

    def __init__(
        self, spec: InputSpec, table: pa.Table | pl.DataFrame, with_labels: bool = True
    ) -> None:
        if isinstance(table, pl.DataFrame):
            table = table.to_arrow()
        n = table.num_rows
        columns: dict[str, Any] = {}
        for f in spec.sparse:
            col = table.column(f.column)
            columns[f.column] = _list_parts(col) if f.multi_valued else col.to_numpy()
        for f in spec.dense:
            columns[f.column] = table.column(f.column).to_numpy()
        if spec.domain_column not in columns:
            columns[spec.domain_column] = table.column(spec.domain_column).to_numpy()
        labels = None
        if with_labels:
            lab = [table.column(t.column).to_numpy().astype(np.float32) for t in spec.tasks]
            labels = np.stack(lab, axis=1)  # (n, T)
        self._set(spec, n, columns, labels)

    @classmethod
    def from_arrays(cls, spec: InputSpec, columns: dict[str, Any], n: int) -> ExampleTensors:
        """From encoded columns held as numpy arrays (``(values, lengths)`` for a
        multi-valued feature), as the online path produces them; no labels."""
        self = cls.__new__(cls)
        self._set(spec, n, columns, None)
        return self

    def _set(
        self, spec: InputSpec, n: int, columns: dict[str, Any], labels: np.ndarray | None
    ) -> None:
        self.spec, self.n = spec, n
        self.values: list[torch.Tensor] = []
        self.lengths: list[torch.Tensor] = []
        self.offsets: list[torch.Tensor] = []
        for f in spec.sparse:
            if f.multi_valued:
                v, ln = columns[f.column]
            else:
                v, ln = columns[f.column], np.ones(n, dtype=np.int64)
            lengths = torch.from_numpy(np.asarray(ln, dtype=np.int64))
            self.values.append(torch.from_numpy(np.asarray(v, dtype=np.int64)))
            self.lengths.append(lengths)
            self.offsets.append(torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]))
        if spec.dense:
            cols = [np.asarray(columns[f.column], dtype=np.float32) for f in spec.dense]
            dense = torch.from_numpy(np.stack(cols, axis=1))
            mean = torch.tensor([f.mean for f in spec.dense], dtype=torch.float32)
            std = torch.tensor([f.std for f in spec.dense], dtype=torch.float32)
            self.dense = (dense - mean) / std  # (n, N)
        else:
            self.dense = torch.zeros(n, 0)
        self.domain = torch.from_numpy(np.asarray(columns[spec.domain_column], dtype=np.int64))
        self.labels = torch.from_numpy(labels) if labels is not None else None

    def __len__(self) -> int:
        return self.n

    def _gather(self, idx: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per feature, the values and lengths of rows ``idx`` (bags kept whole)."""
        values, lengths = [], []
        for f, v, ln, off in zip(
            self.spec.sparse, self.values, self.lengths, self.offsets, strict=True
        ):
            if not f.multi_valued:
                values.append(v[idx])
                lengths.append(ln[idx])
                continue
            bl = ln[idx]  # (B,)
            starts = off[idx]
            total = int(bl.sum())
            # flat positions of the selected bags: start of each bag + position inside it
            bag_start_out = torch.cumsum(bl, 0) - bl
            pos = (
                torch.arange(total)
                - torch.repeat_interleave(bag_start_out, bl)
                + torch.repeat_interleave(starts, bl)
            )
            values.append(v[pos])
            lengths.append(bl)
        return values, lengths

    def _assemble(self, values, lengths, dense, domain, labels) -> Batch:
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=[f.name for f in self.spec.sparse],
            values=torch.cat(values),
            lengths=torch.cat(lengths),
        )
        return Batch(kjt, dense, domain, labels)

    def batch(self, idx: torch.Tensor | slice) -> Batch:
        """Gather rows ``idx`` (a slice or a 1-D index tensor) into a Batch."""
        if isinstance(idx, slice):
            idx = torch.arange(*idx.indices(self.n))
        values, lengths = self._gather(idx)
        labels = self.labels[idx] if self.labels is not None else None
        return self._assemble(values, lengths, self.dense[idx], self.domain[idx], labels)

    def batches(
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
    ):
        """Iterate over batches covering every row once (shuffled: in a random order).

        The rows are put in the epoch's order once (one gather per column) and batches
        are cut from contiguous ranges: the same batches as gathering each one from the
        shuffled indices, at a fraction of the cost (random gathers per batch were a
        large share of a small model's training step)."""
        if shuffle:
            order = torch.randperm(self.n, generator=generator)
            values, lengths = self._gather(order)
            dense, domain = self.dense[order], self.domain[order]
            labels = self.labels[order] if self.labels is not None else None
            offsets = [torch.cat([ln.new_zeros(1), ln.cumsum(0)]) for ln in lengths]
        else:
            values, lengths, offsets = self.values, self.lengths, self.offsets
            dense, domain, labels = self.dense, self.domain, self.labels
        multi = [f.multi_valued for f in self.spec.sparse]
        for start in range(0, self.n, batch_size):
            end = min(start + batch_size, self.n)
            vals = [
                v[int(off[start]) : int(off[end])] if m else v[start:end]
                for v, off, m in zip(values, offsets, multi, strict=True)
            ]
            yield self._assemble(
                vals, [ln[start:end] for ln in lengths], dense[start:end], domain[start:end],
                labels[start:end] if labels is not None else None,
            )  # fmt: skip
