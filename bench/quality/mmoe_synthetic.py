"""The MMoE paper's synthetic experiment (Ma et al., KDD 2018, section 4):
shared-bottom vs one-gate MoE (OMoE) vs MMoE as the tasks' correlation falls.

Data: x ~ N(0, I_100); unit vectors u1 ⟂ u2; w1 = u1, w2 = p u1 + sqrt(1 - p^2) u2;
y_i = w_i·x + sum_{j<10} sin(a_j w_i·x + b_j) + N(0, 0.01), with a, b ~ N(0, 1) shared by
both tasks, so p (the Pearson correlation of the weight vectors) controls how related the
tasks are. The paper's finding: every model does worse as p falls, and MMoE degrades least.

    python -m bench.quality.mmoe_synthetic [--seeds 3] [--epochs 30]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.common import machine, write_section
from bench.quality.common import dense_spec, dense_tensors, fmt_mean_std
from recsys_moe.config import ModelConfig, TrainingConfig
from recsys_moe.model.ranker import RankingModel
from recsys_moe.training import fit, predict

D, M_SINES = 100, 10
_MOE = {
    "arch": "mmoe",
    "gate_by_domain": False,
    "n_experts": 8,
    "expert_hidden": [16],
    "tower_hidden": [8],
    "embedding_dim": 1,
}
MODELS = {
    "shared-bottom": ModelConfig(
        arch="shared_bottom", expert_hidden=[128], tower_hidden=[8], embedding_dim=1
    ),
    "OMoE (one gate)": ModelConfig(**_MOE, gates="one"),
    "MMoE": ModelConfig(**_MOE, gates="task"),
}


def make_data(p: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(D, 2)))
    u1, u2 = q[:, 0], q[:, 1]
    w = np.stack([u1, p * u1 + np.sqrt(1 - p * p) * u2])  # (2, D)
    a, b = rng.normal(size=M_SINES), rng.normal(size=M_SINES)
    x = rng.normal(size=(n, D))
    z = x @ w.T  # (n, 2)
    y = z + np.sin(a[None, None, :] * z[..., None] + b).sum(-1) + rng.normal(0, 0.1, size=z.shape)
    return x, y


def run(p: float, seed: int, epochs: int, n_train: int, n_test: int) -> dict[str, float]:
    x, y = make_data(p, n_train + n_test + n_test, seed)
    spec = dense_spec(D, [("y1", "regression"), ("y2", "regression")])
    tr = dense_tensors(spec, x[:n_train], y[:n_train])
    va = dense_tensors(spec, x[n_train : n_train + n_test], y[n_train : n_train + n_test])
    te = dense_tensors(spec, x[n_train + n_test :], y[n_train + n_test :])
    out = {}
    for name, mc in MODELS.items():
        torch.manual_seed(seed)
        model = RankingModel(spec, mc)
        tc = TrainingConfig(
            epochs=epochs,
            batch_size=256,
            lr=2e-3,
            embedding_lr=2e-3,
            embedding_optimizer="adam",
            early_stopping_patience=epochs,
            seed=seed,
        )
        fit(model, tr, va, tc, metric="loss", progress=False)
        pred = predict(model, te)
        out[name] = float(np.mean((pred - te.labels.numpy()) ** 2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--train", type=int, default=20_000)
    ap.add_argument("--test", type=int, default=4_000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    corrs = [1.0, 0.9, 0.8, 0.5]
    results: dict[float, dict[str, list[float]]] = {}
    t0 = time.perf_counter()
    for p in corrs:
        results[p] = {m: [] for m in MODELS}
        for s in range(args.seeds):
            r = run(p, s, args.epochs, args.train, args.test)
            for m, v in r.items():
                results[p][m].append(v)
            print(f"p={p} seed={s}: " + ", ".join(f"{m} {v:.4f}" for m, v in r.items()), flush=True)
    lines = [
        f"Machine: {machine()}. {args.seeds} seeds x {len(corrs)} correlations, {args.train:,} train / "
        f"{args.test:,} valid / {args.test:,} test samples, {args.epochs} epochs, Adam 2e-3, batch 256; "
        f"{time.perf_counter() - t0:.0f} s in all.",
        "Models: shared-bottom (bottom 128, towers 8); OMoE and MMoE (8 experts of 16 units, towers 8;",
        "OMoE has one gate for both tasks, MMoE one gate per task). Metric: test MSE averaged over",
        "the two regression tasks (lower is better), mean ± std over seeds.",
        "",
        "| task correlation p | " + " | ".join(MODELS) + " |",
        "|---:|" + "---:|" * len(MODELS),
    ]
    for p in corrs:
        lines.append(f"| {p} | " + " | ".join(fmt_mean_std(results[p][m]) for m in MODELS) + " |")
    deg = {m: np.mean(results[0.5][m]) - np.mean(results[1.0][m]) for m in MODELS}
    lines += [
        "",
        "Degradation from p = 1.0 to p = 0.5 (MSE increase): "
        + ", ".join(f"{m} {v:+.4f}" for m, v in deg.items())
        + ".",
    ]
    least = min(deg, key=deg.get)
    lines.append(f"Least degradation: {least}.")
    write_section(
        "Quality: MMoE paper synthetic experiment (bench/quality/mmoe_synthetic.py)",
        "\n".join(lines),
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
