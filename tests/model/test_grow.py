"""Growing a trained model by a domain: existing domains' scores stay bit-identical (alone
and in mixed batches, before and after training the extension), the extension starts at
the parent's treatment of an unknown domain, only new parameters train, and the grown
model round-trips through its files."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from recsys_moe.model.grow import freeze, frozen_changes, grow
from recsys_moe.model.inputs import ExampleTensors, InputSpec
from recsys_moe.model.ranker import RankingModel
from recsys_moe.model.slicing import active_experts, domain_slice
from recsys_moe.training import loss_of, predict


def _child_spec(spec: InputSpec, domain: str, grow_items: int = 3) -> InputSpec:
    """The parent's spec plus one domain, the domain table and the item table grown."""
    sparse = []
    for f in spec.sparse:
        extra = 1 if f.column == spec.domain_column else grow_items if f.name == "item_id" else 0
        sparse.append(dataclasses.replace(f, vocab_size=f.vocab_size + extra))
    return dataclasses.replace(spec, sparse=sparse, domains=[*spec.domains, domain])


def _train_steps(child, params, data: ExampleTensors, steps: int = 3) -> None:
    """A few Adam steps on every row of ``data``, training ``params`` only."""
    opt = torch.optim.Adam(params, lr=0.05)
    child.train()
    b = data.batch(slice(0, len(data)))
    for _ in range(steps):
        opt.zero_grad()
        loss_of(child, child(b), b.labels).backward()
        opt.step()
    child.eval()


@pytest.fixture(scope="module", params=["star", "mmoe", "mmoe+gate_norm"])
def family(request, small_store):
    """(parent, child, spec, child spec, test rows) for a small trained-looking model."""
    from features.store import load_manifest, read_examples

    cfg, _ = small_store
    store = cfg.features.store_dir
    spec = InputSpec.from_manifest(load_manifest(store))
    torch.manual_seed(3)
    arch, _, norm = request.param.partition("+")
    mcfg = dataclasses.replace(cfg.model, arch=arch, n_experts=4, shared_experts=2,
                               specific_experts=1, expert_hidden=[16, 8],
                               gate_norm="batch" if norm else "none")  # fmt: skip
    parent = RankingModel(spec, mcfg).eval()
    with torch.no_grad():
        # every per-logit tensor drawn, so that a channel copied to the wrong place shows
        for t, kind in parent.gates.channels():
            t.uniform_(0.5, 1.5) if kind in ("scale", "stat") else t.normal_(0, 0.5)
    test = read_examples(store, "test")
    cspec = _child_spec(spec, "live")
    # rows of the new domain: the test rows with the new domain's index and a few new items
    live = test.head(600).with_columns(
        test.head(600)[spec.domain_column].clip(cspec.n_domains - 1, cspec.n_domains - 1)
    )
    item_col = next(f.column for f in spec.sparse if f.name == "item_id")
    vocab = next(f.vocab_size for f in spec.sparse if f.name == "item_id")
    live = live.with_columns(
        live[item_col].scatter(list(range(0, 600, 7)), vocab + 1)  # values new to the parent
    )
    child = grow(parent, cspec, 2, ExampleTensors(cspec, live).batch(slice(0, 600)))
    return parent, child, spec, cspec, test, live


def test_existing_domains_bit_identical(family):
    parent, child, spec, cspec, test, live = family
    old = ExampleTensors(spec, test)
    np.testing.assert_array_equal(predict(child, ExampleTensors(cspec, test), 512),
                                  predict(parent, old, 512))  # fmt: skip
    # in a batch mixed with rows of the new domain, the old rows are still the parent's
    mixed = test.head(400).vstack(live.head(200).select(test.columns))
    got = predict(child, ExampleTensors(cspec, mixed), 1024)[:400]
    want = predict(parent, ExampleTensors(spec, test.head(400).vstack(test.head(200))), 1024)[:400]
    np.testing.assert_array_equal(got, want)


def test_extension_starts_at_the_parents_unknown_domain(family):
    parent, child, spec, cspec, _test, live = family
    as_unknown = live.with_columns(live[spec.domain_column] * 0)  # domain index 0 for the parent
    item_col = next(f.column for f in spec.sparse if f.name == "item_id")
    as_unknown = as_unknown.with_columns(
        as_unknown[item_col].clip(
            0, next(f.vocab_size for f in spec.sparse if f.name == "item_id") - 1
        )
    )
    new_items = (
        live[item_col] >= next(f.vocab_size for f in spec.sparse if f.name == "item_id")
    ).to_numpy()
    as_unknown = as_unknown.with_columns(as_unknown[item_col].scatter(np.flatnonzero(new_items), 0))
    np.testing.assert_allclose(
        predict(child, ExampleTensors(cspec, live), 512),
        predict(parent, ExampleTensors(spec, as_unknown), 512),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip


def test_training_moves_only_new_parameters(family):
    parent, child, spec, cspec, test, live = family
    child = copy.deepcopy(child)
    params = freeze(child, parent)
    newest = {id(p) for p in child.extensions[-1].parameters()}
    assert newest <= {id(p) for p in params}
    assert all(n.startswith(("core.extensions.", "embedding.")) for n, p in child.named_parameters()
               if p.requires_grad)  # fmt: skip
    data = ExampleTensors(cspec, live)
    before = predict(child, data, 600)
    _train_steps(child, params, data)
    assert frozen_changes(child, parent) == []
    assert not np.allclose(predict(child, data, 600), before)  # the new domain learned
    # new embedding rows moved, old rows did not
    name = next(n for n, p in child.named_parameters() if "t_item_id" in n)
    w_old = dict(parent.named_parameters())[name]
    w_new = dict(child.named_parameters())[name]
    assert torch.equal(w_new[: w_old.shape[0]], w_old)
    assert not torch.equal(w_new[w_old.shape[0] :], w_old[:1].expand(3, -1))
    np.testing.assert_array_equal(
        predict(child, ExampleTensors(cspec, test), 512),
        predict(parent, ExampleTensors(spec, test), 512),
    )
    with pytest.raises(ValueError, match="unknown part"):
        freeze(child, parent, ["bogus"])


def test_grown_model_round_trips_and_slices(family, small_store, tmp_path):
    from features.store import load_manifest
    from recsys_moe.bundle import load_model, write_bundle

    _parent, child, spec, cspec, test, live = family
    manifest = load_manifest(small_store[0].features.store_dir)
    sizes = {f.name: f.vocab_size for f in cspec.sparse}
    for f in manifest["features"]["categorical"]:
        f["vocab_size"] = sizes[f["name"]]
    manifest["domains"] = cspec.domains
    write_bundle(child, tmp_path / "m", manifest)
    loaded, meta = load_model(tmp_path / "m")
    assert [e["domain"] for e in meta["extensions"]] == ["live"]
    for rows in (live, test):
        data = ExampleTensors(cspec, rows)
        np.testing.assert_array_equal(predict(loaded, data, 512), predict(child, data, 512))
    k = cspec.n_domains - 1
    E = child.experts.n_experts
    assert active_experts(child, k)[-2:] == [E, E + 1] and domain_slice(child, k) is child
    for d in range(1, spec.n_domains):  # existing domains' slices still equal the full model
        rows = np.flatnonzero(ExampleTensors(cspec, test).domain.numpy() == d)[:100]
        sub = ExampleTensors(cspec, test[rows])
        np.testing.assert_allclose(predict(domain_slice(child, d), sub, 512),
                                   predict(child, sub, 512), rtol=1e-5, atol=1e-6)  # fmt: skip


def test_grow_rejects_what_it_cannot_extend(small_store):
    from features.store import load_manifest

    cfg, _ = small_store
    spec = InputSpec.from_manifest(load_manifest(cfg.features.store_dir))
    ple = RankingModel(spec, dataclasses.replace(cfg.model, arch="ple", expert_hidden=[8]))
    with pytest.raises(ValueError, match="only mmoe and star"):
        grow(ple, _child_spec(spec, "live"), 1)
    mmoe = RankingModel(spec, dataclasses.replace(cfg.model, expert_hidden=[8]))
    with pytest.raises(ValueError, match="plus one"):
        grow(mmoe, spec, 1)


def test_cached_and_uncached_extension_training_agree(family):
    """train_extension with the parent's activations cached (ActivationCache) goes where
    training through the parent's experts every step goes: the cache gives the child's
    own output for any rows, and training on it gives the same loss and validation AUC
    every epoch, the same best epoch and the same scores."""
    from recsys_moe.config import ExtendConfig
    from recsys_moe.model.grow import ActivationCache
    from recsys_moe.training import train_extension

    parent, child, _spec, cspec, _test, live = family
    data = ExampleTensors(cspec, live)
    # the cache itself: any rows, in any order, give what the child's forward pass gives
    c = copy.deepcopy(child)
    freeze(c, parent, new_rows=False)  # only the extension trains: cacheable
    cache = ActivationCache.build(c, data, 4.0)
    assert cache is not None and ActivationCache.build(c, data, 0.0) is None
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:128]
    c.train()
    with torch.no_grad():
        got, want = cache.output(c, idx), c(data.batch(idx))
    for name in ("logits", "preds"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
    results = []
    for cache_gb in (4.0, 0.0):
        c = copy.deepcopy(child)
        params = freeze(c, parent, new_rows=False)
        cfg = ExtendConfig(epochs=2, batch_size=128, lr=0.01, cache_gb=cache_gb)
        fitres = train_extension(c, params, data, data, cfg, progress=False)
        results.append((c, fitres))
    (c0, fit0), (c1, fit1) = results
    assert fit0["best_epoch"] == fit1["best_epoch"] and len(fit0["history"]) == 2
    for h0, h1 in zip(fit0["history"], fit1["history"], strict=True):
        for key in ("train/loss", "valid/auc_mean"):
            assert h0[key] == pytest.approx(h1[key], rel=1e-3), key
    # the same scores. Not bit-for-bit, nor weight for weight: the cache runs the parent's
    # experts at batch 8192, training at 128, and Adam turns that rounding into whole
    # steps of lr on weights whose gradient is near zero (seen: 0.007 on one weight after
    # 10 steps, in the full suite's thread layout), weights the scores barely depend on
    np.testing.assert_allclose(predict(c0, data, 512), predict(c1, data, 512), atol=0.01)
    # it trained: the epochs' losses differ, and the state moved unless the start was kept
    assert fit0["history"][0]["train/loss"] != fit0["history"][1]["train/loss"]
    state0 = c0.state_dict()
    moved = any(not torch.equal(state0[k], child.state_dict()[k]) for k in state0)
    assert moved == (fit0["best_epoch"] >= 0)


@pytest.fixture(scope="module")
def grown(family):
    """A parent whose existing domain 1 gains 2 experts (``extend --add-experts``)."""
    parent, _child, spec, _cspec, test, _live = family
    parent = copy.deepcopy(parent)
    dom = ExampleTensors(spec, test).domain.numpy()
    mine = test[np.flatnonzero(dom == 1)]
    child = grow(parent, spec, 2, ExampleTensors(spec, mine).batch(slice(0, 400)),
                 existing=spec.domains[0])  # fmt: skip
    return parent, child, spec, test, mine


def test_added_experts_start_at_the_domains_scores_and_leave_others_bit_identical(grown):
    parent, child, spec, test, mine = grown
    ext = child.extension_specs[-1]
    assert ext.grows and ext.domain == spec.domains[0]
    assert child.core.extension_domains == [1]
    # the grown domain starts where the parent's scores are (its new experts are copies
    # of its busiest experts, sharing their logits)
    np.testing.assert_allclose(predict(child, ExampleTensors(spec, mine), 512),
                               predict(parent, ExampleTensors(spec, mine), 512),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    # train the new experts and the domain's gates only
    params = freeze(child, parent)
    assert all(n.startswith("core.extensions.") for n, p in child.named_parameters()
               if p.requires_grad)  # fmt: skip
    data = ExampleTensors(spec, mine)
    before = predict(child, data, 512)
    _train_steps(child, params, data)
    assert frozen_changes(child, parent) == []
    assert not np.allclose(predict(child, data, 512), before)  # the domain learned
    # every other domain: bit-identical, alone and in batches mixed with the grown one
    every = ExampleTensors(spec, test)
    other = every.domain.numpy() != 1
    np.testing.assert_array_equal(predict(child, every, 512)[other],
                                  predict(parent, every, 512)[other])  # fmt: skip
    # slices: the grown domain reads its reach plus the new experts; the others' slices
    # still equal the full model
    E = child.experts.n_experts
    assert active_experts(child, 1)[-2:] == [E, E + 1] and domain_slice(child, 1) is child
    for d in range(2, spec.n_domains):
        sub = ExampleTensors(spec, test[np.flatnonzero(every.domain.numpy() == d)[:100]])
        np.testing.assert_allclose(predict(domain_slice(child, d), sub, 512),
                                   predict(child, sub, 512), rtol=1e-5, atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="growing it again"):
        grow(child, spec, 1, existing=spec.domains[0])
    with pytest.raises(ValueError, match="must be one of"):
        grow(parent, spec, 1, existing="nope")


def test_warm_state_matches_embedding_rows_by_value(small_store):
    """A retrain's start (``train --warm-start``): a child on a store whose vocabulary
    orders values differently, lacks some and has new ones scores every row as the parent
    does, a dropped or new value as the parent's unknown one; a model of other settings
    or one grown by ``extend`` is refused with the reason."""
    import polars as pl

    from features.store import load_manifest, read_examples, read_vocabs
    from recsys_moe.model.grow import warm_state

    cfg, _ = small_store
    store = cfg.features.store_dir
    manifest = load_manifest(store)
    spec = InputSpec.from_manifest(manifest)
    mcfg = dataclasses.replace(cfg.model, n_experts=4, expert_hidden=[16, 8])
    torch.manual_seed(5)
    parent = RankingModel(spec, mcfg).eval()
    with torch.no_grad():
        for p in parent.embedding.parameters():
            p.normal_(0, 0.5)  # rows that differ, so a row read from the wrong place shows
    vocabs = read_vocabs(store, manifest)
    item = vocabs["item_id"]
    # the child's item vocabulary: the parent's values in reverse order, every 5th dropped,
    # and 7 values the parent never saw appended
    kept = item.reverse().filter(pl.int_range(pl.len()) % 5 != 0)
    top = int(item["value"].max()) + 1000  # ids the parent never saw
    new = pl.DataFrame({"value": [top + i for i in range(7)], "count": [1] * 7})
    child_item = pl.concat(
        [kept.select("value", "count"), new.cast(kept.select("value", "count").schema)]
    )
    child_item = child_item.with_columns(
        pl.int_range(1, pl.len() + 1, dtype=pl.Int32).alias("index")
    )
    child_vocabs = {**vocabs, "item_id": child_item}
    cspec = dataclasses.replace(spec, sparse=[
        dataclasses.replace(f, vocab_size=child_item.height + 1) if f.name == "item_id" else f
        for f in spec.sparse
    ])  # fmt: skip
    child = RankingModel(cspec, mcfg)
    state, known = warm_state(parent, vocabs, child, child_vocabs)
    child.load_state_dict(state)
    child.eval()
    assert known["item_id"] == kept.height and known["user_id"] == vocabs["user_id"].height

    test = read_examples(store, "test")
    col = next(f.column for f in spec.sparse if f.name == "item_id")
    to_child = dict(zip(kept["index"].to_list(), child_item["index"].head(kept.height).to_list(),
                        strict=True))  # fmt: skip
    as_child = test.with_columns(
        pl.col(col).replace_strict(to_child, default=0, return_dtype=pl.Int32)
    )
    # the parent's view of the same rows: a dropped value is unknown (index 0) to the child
    as_parent = test.with_columns(
        pl.when(pl.col(col).is_in(list(to_child))).then(pl.col(col)).otherwise(0).cast(pl.Int32)
    )
    assert (as_child[col] == 0).sum() > (test[col] == 0).sum()  # some rows lost their item
    np.testing.assert_allclose(predict(child, ExampleTensors(cspec, as_child), 512),
                               predict(parent, ExampleTensors(spec, as_parent), 512),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    # a row with a new value scores as the parent's unknown item
    new_rows = as_child.head(20).with_columns(pl.lit(child_item.height, dtype=pl.Int32).alias(col))
    unknown = as_parent.head(20).with_columns(pl.lit(0, dtype=pl.Int32).alias(col))
    np.testing.assert_allclose(predict(child, ExampleTensors(cspec, new_rows), 512),
                               predict(parent, ExampleTensors(spec, unknown), 512),
                               rtol=1e-5, atol=1e-6)  # fmt: skip

    other = RankingModel(cspec, dataclasses.replace(mcfg, n_experts=6))
    with pytest.raises(ValueError, match="differ beyond their vocabularies"):
        warm_state(parent, vocabs, other, child_vocabs)
    grown = grow(parent, _child_spec(spec, "live"), 1)
    with pytest.raises(ValueError, match="extend"):
        warm_state(grown, vocabs, child, child_vocabs)
