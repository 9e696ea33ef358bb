"""tune-mtard: hyperparameter search for B-MTARD (Balanced Multi-Teacher Adversarial Robustness Distillation)."""

__version__ = "0.1.0"
