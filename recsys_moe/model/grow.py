"""Growing a trained model: a new domain with its own experts and gates, the rest frozen.

:func:`grow` builds the child of a trained MMoE / STAR model for a manifest that has one
more domain (and possibly longer vocabularies, new values appended at the end):

- every parent tensor is copied; embedding tables gain rows for the new values, each
  started as a copy of its table's out-of-vocabulary row 0;
- a :class:`~recsys_moe.model.ranker.DomainExtension` adds ``n_experts`` experts and one
  gate per output over the parent experts the out-of-vocabulary domain could reach plus
  the new ones; with ``cross`` (and crosses in the model) also the domain's own crosses,
  ``(A_p left_p) * right_p`` with a learned D x D ``A_p`` per interaction, read only by
  its experts (a domain that sees users through another lens than the parent's domains). It starts as the parent's treatment of an unknown domain: the new experts
  are copies of the parent experts that gate weighs most on the new domain's rows, and
  each copied expert and its copies share its gate logit (``- log(copies + 1)``), so the
  child's first predictions for the new domain equal the parent's exactly (softmax
  routing) and training can only move away from there.

:func:`freeze` leaves only the new parameters trainable (and, by default, the new
embedding rows); rows of the existing domains are computed by the parent's code path with
the parent's weights, so their scores stay bit-identical. :func:`frozen_changes` checks it.
"""

from __future__ import annotations

from collections.abc import Iterable

import polars as pl
import torch

from recsys_moe.model.cores import Extension
from recsys_moe.model.inputs import Batch, ExampleTensors, InputSpec
from recsys_moe.model.ranker import ModelOutput, RankingModel

# what `freeze` may leave trainable besides the new domain's experts and gates
UNFREEZABLE = ("embeddings", "experts", "gates", "towers")


@torch.no_grad()
def grow(
    parent: RankingModel,
    spec: InputSpec,
    n_experts: int,
    sample: Batch | None = None,
    cross: bool = True,
    existing: str | None = None,
) -> RankingModel:
    """The child model of ``parent`` for ``spec`` (``parent.spec`` plus one domain, longer
    vocabularies allowed), or with ``existing``, the child whose domain ``existing`` (one
    the parent was trained on; ``spec`` is then the parent's) gains ``n_experts`` experts
    of its own, under gates of its own that start as its parent gates; ``sample``: rows of
    that domain (encoded with ``spec``) used to pick which parent experts the new ones
    start from."""
    core = parent.require_extendable()
    if n_experts < 1:
        raise ValueError("an extension needs at least one expert")
    if existing is not None:
        if existing not in parent.spec.domains or spec.domains != parent.spec.domains:
            raise ValueError(
                f"add experts: domain {existing!r} must be one of the parent's "
                f"{parent.spec.domains} (and the spec the parent's)"
            )
        k = parent.spec.domains.index(existing) + 1
        if core.extension_of(k) is not None:
            raise ValueError(
                f"add experts: domain {existing!r} was itself added or grown by an extension; "
                "growing it again is not supported"
            )
    elif spec.domains[:-1] != parent.spec.domains:
        raise ValueError(
            f"the child's domains {spec.domains} must be the parent's {parent.spec.domains} "
            "plus one"
        )
    for old, new in zip(parent.spec.sparse, spec.sparse, strict=True):
        if old.name != new.name or new.vocab_size < old.vocab_size:
            raise ValueError(f"feature {new.name!r}: vocabularies may only grow")
    # the parent gates the extension starts from: the domain's own, or for a new domain
    # the unknown domain's (index 0); the parent experts those can use (all for MMoE)
    k = 0 if existing is None else parent.spec.domains.index(existing) + 1
    reach = tuple(core.reachable_experts(k))
    ext = Extension(
        existing or spec.domains[-1], n_experts, reach,
        cross=cross and bool(parent.cfg.interactions), grows=existing is not None,
    )  # fmt: skip
    child = RankingModel(spec, parent.cfg, extensions=[*parent.extension_specs, ext])
    state = child.state_dict()
    for name, t in parent.state_dict().items():
        if state[name].shape == t.shape:
            state[name] = t.clone()
        else:  # an embedding table that grew: new rows at the end
            state[name] = _rows_as_known(t, state[name].shape[0], torch.arange(t.shape[0]))
    child.load_state_dict(state)
    _warm_start(parent, child, sample, k)
    return child.eval()


def _rows_as_known(table: torch.Tensor, rows: int, where: torch.Tensor) -> torch.Tensor:
    """A table of ``rows`` rows: row ``where[i]`` is the parent's row ``i`` (-1: dropped),
    every other row starts as the parent's out-of-vocabulary row 0, the row the parent
    scored an unknown value with."""
    out = table[:1].expand(rows, -1).clone()
    keep = where >= 0
    out[where[keep]] = table[keep]
    return out


def _index_map(parent: pl.DataFrame, child: pl.DataFrame, rows: int) -> torch.Tensor:
    """For each parent row (index 0..rows-1) the child's index of the same value (-1:
    none); row 0, out of vocabulary, is 0 in both."""
    joined = parent.select("value", pl.col("index").alias("p")).join(
        child.select(pl.col("value").cast(parent.schema["value"]), pl.col("index").alias("c")),
        on="value",
        how="inner",
    )
    where = torch.full((rows,), -1, dtype=torch.long)
    where[0] = 0
    where[torch.as_tensor(joined["p"].to_numpy(), dtype=torch.long)] = torch.as_tensor(
        joined["c"].to_numpy(), dtype=torch.long
    )
    return where


@torch.no_grad()
def warm_state(
    parent: RankingModel,
    parent_vocabs: dict[str, pl.DataFrame],
    child: RankingModel,
    child_vocabs: dict[str, pl.DataFrame],
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The weights a retrain (``recsys-moe train --warm-start``) starts ``child`` from:
    ``parent``'s, a model of the same settings on a store of the same features. Every
    dense tensor is copied; each embedding table is matched by value, so a value the
    parent knew keeps its row wherever the new vocabulary puts it, and a new value starts
    as the parent's out-of-vocabulary row (as :func:`grow`'s new rows do). Returns the
    state and, per feature, how many of the child's values had a row in the parent.

    Raises:
        ValueError: the two models differ in more than their vocabularies (the message
            names the tensors), or the parent was grown by ``extend``.
    """
    if parent.extension_specs:
        raise ValueError(
            "the model was grown by `recsys-moe extend` (added domains or experts): a warm "
            "start of such a model is not supported; train it from scratch"
        )
    tables = {f"{EMBEDDINGS}t_{f.name}.weight": f.name for f in child.spec.sparse}
    mine, theirs = child.state_dict(), parent.state_dict()
    differ = sorted(set(mine) ^ set(theirs)) + [
        f"{k} {tuple(theirs[k].shape)} -> {tuple(v.shape)}"
        for k, v in mine.items()
        if k in theirs and k not in tables and v.shape != theirs[k].shape
    ]
    if differ:
        raise ValueError(f"the models differ beyond their vocabularies: {', '.join(differ[:6])}")
    state, known = {}, {}
    for k, v in mine.items():
        if k not in tables:
            state[k] = theirs[k].clone()
            continue
        f = tables[k]
        where = _index_map(parent_vocabs[f], child_vocabs[f], theirs[k].shape[0])
        state[k] = _rows_as_known(theirs[k], v.shape[0], where)
        known[f] = int((where[1:] >= 0).sum())
    return state, known


EMBEDDINGS = "embedding.ebc.embedding_bags."  # the tables' parameter names: t_<feature>.weight


def _warm_start(parent: RankingModel, child: RankingModel, sample: Batch | None, k: int) -> None:
    """The newest extension starts as the parent's gates of domain index ``k`` (0: the
    unknown domain): its experts are copies of the parent experts those gates use most
    on ``sample`` (the busiest first), and each copied expert shares its logit with its
    copies, so the child's first predictions equal the parent's."""
    ext = child.extensions[-1]
    gp, ge = parent.gates, ext.gates
    O, E, P = gp.O, gp.E, ext.experts.n_experts
    reach = ext.reach
    k = k if gp.K > 1 else 0
    offset = gp.offset
    # how much the parent's gates use each expert on the domain's rows
    if sample is not None and len(sample):
        x = child.inputs(sample)
        r = child.core.gate(gp, x, torch.full_like(sample.domain, k))[0]
        use = r.weights.mean((0, 1))  # (E,)
    else:
        use = offset.detach().view(gp.K, O, E)[k].mean(0)
    order = sorted(reach, key=lambda e: -float(use[e]))
    src = [order[j % len(order)] for j in range(P)]
    for w_new, w_old in zip(ext.experts.weights, parent.experts.weights, strict=True):
        w_new.zero_()  # the first layer's rows for the domain's own crosses start at zero
        w_new[:, : w_old.shape[1]] = w_old[src]
    for b_new, b_old in zip(ext.experts.biases, parent.experts.biases, strict=True):
        b_new.copy_(b_old[src])
    copies = torch.zeros(E)
    for e in src:
        copies[e] += 1
    shift = torch.log(copies + 1)  # (E,): 0 for experts not copied

    def cols(t: torch.Tensor, bias: bool) -> torch.Tensor:
        """(..., K*O*E) parent gate tensor -> (..., O*(E+P)) for the new domain."""
        lead = t.shape[:-1]
        own = t.reshape(*lead, gp.K, O, E)[..., k, :, :]  # the gates it starts from
        if bias:
            own = own - shift
        return torch.cat([own, own[..., src]], dim=-1).reshape(*lead, O * (E + P))

    for (old, _), (new, _) in zip(gp.channels(), ge.channels(), strict=True):
        new.data.copy_(cols(old.detach(), old is offset))


EXTENSIONS = "core.extensions."  # parameter names of the added domains


def _module_of(name: str) -> str:
    if name.startswith("embedding."):
        return "embeddings"
    if name.startswith("towers."):
        return "towers"
    if name.startswith("core.gates."):
        return "gates"
    return "experts"


def freeze(
    child: RankingModel, parent: RankingModel, unfreeze: Iterable[str] = (), new_rows: bool = True
) -> list[torch.nn.Parameter]:
    """Make only the newest extension (plus ``unfreeze`` parts of the parent, and with
    ``new_rows`` the embedding rows added by :func:`grow`) trainable; returns the trainable
    parameters. Embedding tables are trained row-masked: old rows get a zero gradient.

    The new domain's own row of the domain table stays the out-of-vocabulary row it was
    copied from (its gates and experts carry the domain): so when no other table grew,
    nothing upstream of the experts needs a gradient and the parent's experts run
    forward-only, about half the cost of a training step through them."""
    unfreeze = set(unfreeze)
    bad = unfreeze - set(UNFREEZABLE)
    if bad:
        raise ValueError(f"unfreeze: unknown part(s) {sorted(bad)}; choose from {UNFREEZABLE}")
    old = dict(parent.named_parameters())
    domain_feature = next(f.name for f in child.spec.sparse if f.column == child.spec.domain_column)
    newest = f"{EXTENSIONS}{len(child.extensions) - 1}."
    out = []
    for name, p in child.named_parameters():
        if name.startswith(newest):
            p.requires_grad_(True)
        elif name.startswith(EXTENSIONS):  # an earlier extension: part of the parent
            p.requires_grad_(False)
        elif _module_of(name) in unfreeze:
            p.requires_grad_(True)
        elif (
            name.startswith("embedding.")
            and new_rows
            and p.shape[0] > old[name].shape[0]
            and f".t_{domain_feature}." not in name
        ):
            p.requires_grad_(True)
            n_old = old[name].shape[0]

            def keep_old_rows(g: torch.Tensor, n: int = n_old) -> torch.Tensor:
                g = g.clone()
                g[:n] = 0
                return g

            p.register_hook(keep_old_rows)
        else:
            p.requires_grad_(False)
        if p.requires_grad:
            out.append(p)
    return out


def frozen_changes(
    child: RankingModel, parent: RankingModel, unfreeze: Iterable[str] = ()
) -> list[str]:
    """Names of parent tensors the child changed outside ``unfreeze`` (grown embedding
    tables compared on their parent rows); empty when the parent is intact."""
    unfreeze = set(unfreeze)
    state = child.state_dict()
    changed = []
    for name, t in parent.state_dict().items():
        if _module_of(name) in unfreeze and not name.startswith(EXTENSIONS):
            continue
        mine = state[name][: t.shape[0]] if t.dim() else state[name]  # norms' step counts: 0-d
        if not torch.equal(mine, t):
            changed.append(name)
    return changed


class ActivationCache:
    """The parent's part of every training row of the newest domain, computed once: the
    expert input, both cross sides and the parent experts' outputs. While only the newest
    extension trains, these are constants, so a training step computes only the new
    domain's experts, gates and the towers on them.

    Use :meth:`build` (None where the cache does not apply) and :meth:`output`.
    """

    def __init__(self, x, sides, base, labels) -> None:
        self.x, self.sides, self.base, self.labels = x, sides, base, labels

    @classmethod
    @torch.no_grad()
    def build(cls, child: RankingModel, data: ExampleTensors, limit_gb: float):
        """The cache of ``data``'s rows, or None when it would not be exact (something
        upstream of the parent's experts trains, dropout, rows of other domains) or would
        exceed ``limit_gb``."""
        newest = f"{EXTENSIONS}{len(child.extensions) - 1}."
        upstream = any(
            p.requires_grad for n, p in child.named_parameters() if not n.startswith(newest)
        )
        dom = child.require_extendable().extension_domains[-1]
        if upstream or child.cfg.dropout > 0 or not bool((data.domain == dom).all()):
            return None
        ex = child.experts
        width = ex.d_in + 2 * len(child.cfg.interactions) * child.cfg.embedding_dim
        width += ex.n_experts * ex.d_out
        if len(data) * width * 4 > limit_gb * 2**30:
            return None
        child.eval()
        xs, ss, bs = [], [], []
        for b in data.batches(8192):
            x, sides = child.expert_inputs(b)
            xs.append(x)
            ss.append(sides)
            bs.append(child.experts(x))
        sides = torch.cat(ss, dim=1) if ss[0] is not None else None
        return cls(torch.cat(xs), sides, torch.cat(bs), data.labels)

    def __len__(self) -> int:
        return self.x.shape[0]

    def output(self, child: RankingModel, idx: torch.Tensor) -> ModelOutput:
        """The child's output for cached rows ``idx`` (the newest extension's rows)."""
        sides = self.sides[:, idx] if self.sides is not None else None
        core = child.require_extendable()
        reps = core.extension_mixture(child.extensions[-1], self.x[idx], sides, self.base[idx])
        return child.head(reps)


def trainable_count(params: list[torch.nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


__all__ = ["UNFREEZABLE", "ActivationCache", "freeze", "frozen_changes", "grow", "trainable_count"]
