"""Results in sae-bench's output schema (sae-bench 0.6.0), so that SAEBench's tools read saekit's
figures beside their own: `core` (`saekit eval RUN --format saebench`) and the envelope that
every sae-bench result file shares (used by `saekit.analyze.absorption.saebench_output` too)."""

import time
import uuid

from saekit.runtime import VERSION
from saekit.sae import SAE

MISSING = -1.0  # sae-bench's own mark for a figure it has no value for (it writes NaN as -1)


def envelope(eval_type_id: str, config: dict, metrics: dict, details: list, sae: SAE,
             hookpoint: str | None, model_name: str | None, unstructured=None) -> dict:
    """One sae-bench result file: its eval type, config, metrics by category and per-item details,
    with the SAE named as sae-bench names an SAE it loaded (release "saekit", id the hookpoint)."""
    hookpoint = hookpoint or sae.cfg.hookpoint
    model_name = model_name or sae.cfg.model or ""
    return {
        "eval_type_id": eval_type_id,
        "eval_config": {"model_name": model_name, **config},
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": metrics,
        "eval_result_details": details,
        "sae_bench_commit_hash": f"saekit {VERSION}",
        "sae_lens_id": hookpoint or "",
        "sae_lens_release_id": "saekit",
        "sae_lens_version": None,
        "sae_cfg_dict": {"d_in": sae.d_in, "d_sae": sae.n_latents, "architecture": sae.cfg.architecture,
                         "k": sae.cfg.k, "hook_name": hookpoint, "model_name": model_name},
        "eval_result_unstructured": unstructured,
    }


def core(m: dict, ce: dict | None, sae: SAE, hookpoint: str | None = None, model_name: str | None = None,
         dataset: str = "", context_size: int = 0, n_contexts: int = 0, batch_size: int = 4) -> dict:
    """One hookpoint's evaluation in sae-bench's core schema (eval_type_id "core").

    `m` is the hookpoint's entry of eval.json (`saekit.pipeline.evaluate_run`); `ce` the CE and KL
    figures under SAEBench's convention (`downstream_metrics(convention="saebench")` on
    `n_contexts` contexts; None: no model, no downstream figures). Explained variance is SAEBench's
    (about zero, not the mean). Figures saekit does not measure, or measures under another
    definition (sae-bench's MSE divides each token's squared error by the tokens in its batch), are
    -1, sae-bench's mark for a missing figure; `m` itself rides along in `eval_result_unstructured`.
    """
    get = lambda d, k: float(d[k]) if d and k in d else MISSING  # noqa: E731
    kl_score = (ce["kl_zero"] - ce["kl_sae"]) / ce["kl_zero"] if ce and ce["kl_zero"] > 0 else MISSING
    metrics = {
        "model_behavior_preservation": {"kl_div_score": kl_score, "kl_div_with_ablation": get(ce, "kl_zero"),
                                        "kl_div_with_sae": get(ce, "kl_sae")},
        "model_performance_preservation": {"ce_loss_score": get(ce, "loss_recovered"),
                                           "ce_loss_with_ablation": get(ce, "ce_zero"),
                                           "ce_loss_with_sae": get(ce, "ce_sae"),
                                           "ce_loss_without_sae": get(ce, "ce_clean")},
        "reconstruction_quality": {"explained_variance": get(m, "explained_variance_saebench"),
                                   "explained_variance_legacy": MISSING, "mse": MISSING, "cossim": get(m, "cosine")},
        "shrinkage": {"l2_norm_in": MISSING, "l2_norm_out": MISSING, "l2_ratio": get(m, "l2_ratio"),
                      "relative_reconstruction_bias": MISSING},
        "sparsity": {"l0": get(m, "l0"), "l1": MISSING},
        "token_stats": {"total_tokens_eval_reconstruction": n_contexts * context_size if ce else 0,
                        "total_tokens_eval_sparsity_variance": int(m["n_tokens"])},
        "misc_metrics": {"freq_over_1_percent": get(m, "dense_fraction_1pct"),
                         "freq_over_10_percent": get(m, "dense_fraction"),
                         "normalized_freq_over_1_percent": MISSING, "normalized_freq_over_10_percent": MISSING,
                         "average_max_encoder_cosine_sim": MISSING, "average_max_decoder_cosine_sim": MISSING,
                         "frac_alive": 1 - float(m["dead_fraction"])},
    }
    config = {"llm_dtype": "float32", "batch_size_prompts": batch_size,
              "n_eval_reconstruction_batches": -(-n_contexts // batch_size) if ce else 0,
              "n_eval_sparsity_variance_batches": 1, "dataset": dataset, "context_size": context_size,
              "compute_kl": ce is not None, "compute_ce_loss": ce is not None, "compute_l2_norms": True,
              "compute_sparsity_metrics": True, "compute_variance_metrics": True,
              "compute_featurewise_density_statistics": False, "compute_featurewise_weight_based_metrics": False,
              "exclude_special_tokens_from_reconstruction": False, "verbose": False}
    return envelope("core", config, metrics, [], sae, hookpoint, model_name, unstructured=m)
