from abmll.evaluation.evaluate import (
    evaluate_unseen_tasks,
    predict_option_probs,
    sample_counts,
    sample_option_probs,
)
from abmll.evaluation.posterior import posterior_summary
from abmll.evaluation.predictions import read_predictions, write_predictions
from abmll.evaluation.pruning import num_pruned, prune_hidden_units
from abmll.evaluation.metrics import (
    accuracy,
    brier_score,
    classification_metrics,
    expected_calibration_error,
    negative_log_likelihood,
    option_probs,
)

__all__ = [
    "accuracy",
    "brier_score",
    "classification_metrics",
    "evaluate_unseen_tasks",
    "expected_calibration_error",
    "negative_log_likelihood",
    "option_probs",
    "predict_option_probs",
    "sample_counts",
    "sample_option_probs",
    "posterior_summary",
    "read_predictions",
    "write_predictions",
    "num_pruned",
    "prune_hidden_units",
]
