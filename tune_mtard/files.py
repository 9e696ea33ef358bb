"""Names of the files runs and searches write, in one place (docs/search.md, "Files")."""

# A run's folder (train, compare, a search's trial checkpoints)
STUDENT = "student.pt"
TRACE_CSV = "balance_trace.csv"
TRACE_PNG = "balance_trace.png"
METRICS_JSON = "metrics.json"
RUN_CONFIG = "config.yaml"
CHECKPOINT = "checkpoint.pt"  # the whole loop state, every epoch (train --resume)
RUN_ID = "mlflow_run_id"
TRIAL_STATE = "state.pt"  # the whole loop state inside a trial's Ray checkpoint

# A search's folder, <storage>/<name>
BEST_CONFIG = "best_config.yaml"
SPACE = "search_space.yaml"
SUMMARY_JSON = "summary.json"
TRIALS_CSV = "trials.csv"
TRIALS_PLOT = "trials_clean_vs_robust.png"
OPTUNA_DB = "optuna.db"
PARENT_RUN_ID = "mlflow_parent_run_id"
FINAL_EVAL_CSV = "final_eval.csv"
TEACHERS_JSON = "teachers.json"  # the teacher files the search used (path, sha256) and their quality
PARETO_CSV = "pareto.csv"  # the front of full-budget trials (docs/search.md, "Pareto front")
PARETO_PNG = "pareto.png"
PLAN_JSON = "plan.json"  # search --plan: the forecast of its epochs, device-hours and wall time
BUDGET_JSON = "budget.json"  # search.budget: the limits, what each session spent, the trials it stopped
CONFIRM_FOLDER = "confirm"  # the Ray experiment of the seed-confirmation trials
CONFIRM_CSV = "confirm.csv"  # each candidate's value on every seed
RECORDS_JOURNAL = "records.jsonl"  # every MLflow record of the search, journaled before it is sent
RECORDS_ARTIFACTS = "records"  # the files of journaled artifact records, until they are sent
TUNER_STATE = "tuner.pkl"  # written by Ray Tune when a search starts: the search exists from then on
SENSITIVITY_MD = "sensitivity.md"  # the sensitivity analysis (docs/sensitivity.md) and its plots
IMPORTANCES_PNG = "importances.png"
SLICE_PNG = "slice_{}.png"  # SLICE_PNG.format("balance.beta"): one per searched key
CONTOUR_PNG = "contour.png"
SENSITIVITY_ARTIFACTS = "sensitivity"  # their folder among the parent run's artifacts

# A trial's folder (beside its Ray checkpoints)
DIVERGED_JSON = "diverged.json"  # where the trial diverged: a restart fails at once instead of training again

# A comparison's folder
COMPARISON_CSV = "comparison.csv"
COMPARISON_SUMMARY_CSV = "comparison_summary.csv"
COMPARISON_MD = "comparison.md"
TUNED_STATE = "tuned_comparison.json"  # compare --tune: what was asked and each search's wall time (--resume)
TUNED_SEARCHES = "searches"  # compare --tune: the folder of the per-method searches
