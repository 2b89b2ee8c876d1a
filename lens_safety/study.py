"""The probe study end to end: prompts -> residuals -> layer probes -> harmful direction.

Fits probes on the training split (cross-validated scores per layer, binary and three-class),
checks the binary probes on the held-out split, extracts the harmful direction at the best
layer, and writes everything (scores JSON, direction, figure) to ``out_dir``. Activations are
stored with safetensors, so a rerun reuses them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, roc_auc_score

from .caching import cache_residuals
from .directions import harmful_direction, save_direction
from .probes import LayerProbes, binary_labels
from .prompts import PromptSet


def run_probe_study(model, tokenizer, *, model_name: str = "model", data_dir=None,
                    n_per_class: int | None = 100, test_size: float = 0.25, hook: str = "resid_post",
                    pool: str = "last", method: str = "mean_diff", seed: int = 0,
                    out_dir=None, batch_size: int = 8, progress: bool = True) -> dict:
    """Run the study on ``model`` (HookBridge or HookedTransformer); return a summary dict.

    The summary holds per-layer cross-validated scores (binary and three-class), per-layer
    held-out accuracy/AUROC of the binary probes, the best layer, and the direction's path.
    """
    out = Path(out_dir) if out_dir is not None else None
    prompts = PromptSet.load(data_dir, n_per_class=n_per_class, seed=seed)
    train, test = prompts.split(test_size=test_size, seed=seed)

    def store(name: str):
        return out / f"acts_{name}_{hook}_{pool}.safetensors" if out else None

    train_acts = cache_residuals(model, tokenizer, train.texts, hook=hook, pool=pool,
                                 batch_size=batch_size, progress=progress, store=store("train"))
    test_acts = cache_residuals(model, tokenizer, test.texts, hook=hook, pool=pool,
                                batch_size=batch_size, progress=progress, store=store("test"))
    binary = LayerProbes(task="binary", seed=seed).fit(train_acts, train.labels)
    three = LayerProbes(task="multiclass", seed=seed).fit(train_acts, train.labels)
    y_test = binary_labels(test.labels)
    held_out = []
    for layer in binary.layers_:
        score = binary.predict_proba(test_acts[layer].numpy(), layer)[:, 1]
        held_out.append({"layer": layer, "accuracy": float(accuracy_score(y_test, score > 0.5)),
                         "auroc": float(roc_auc_score(y_test, score))})
    layer = binary.best_layer_
    direction = harmful_direction(train_acts, train.labels, layer, method=method, seed=seed)
    projection = (test_acts[layer] @ direction).numpy()
    summary = {
        "model": model_name, "hook": hook, "pool": pool, "method": method, "seed": seed,
        "n_train": len(train), "n_test": len(test), "counts": prompts.counts(),
        "best_layer": layer, "chance_binary": binary.chance_, "chance_three": three.chance_,
        "cv_binary": binary.scores_.to_dict("records"),
        "cv_three_class": three.scores_.to_dict("records"),
        "held_out_binary": held_out,
        "held_out_projection_auroc": float(roc_auc_score(y_test, projection)),
        "mean_projection": {label: float(np.mean(projection[np.array(test.labels) == label]))
                            for label in ("neutral", "biased", "toxic")},
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"direction_{hook}_L{layer}_{method}.safetensors"
        save_direction(path, direction, model=model_name, hook=hook, layer=layer, method=method)
        summary["direction_path"] = str(path)
        (out / "probe_study.json").write_text(json.dumps(summary, indent=2))
    summary["direction"] = direction
    summary["probes"] = binary
    return summary
