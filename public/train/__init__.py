"""Train: one model trained and measured (nothing here exports or searches).

    loop.py     train_model, EarlyStopping, train_fixed (REFIT), seed_everything
    recipe.py   Augmenter, class_weights, add_normalization
    metrics.py  predictions, metrics, xx-yy digits, per-subject rows (public/test.py is its face)
    outcome.py  TrialResult and TrialStatus
"""
