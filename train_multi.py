"""Stage one of ATML: train every model registered in public/model.py over the
learning-rate grid of params.py, prune bad rates through avoid.txt, export each model to
ONNX and record everything in multi-result/.

    python train_multi.py                 # settings from params.py
    python train_multi.py NUM_EPOCHS=5    # override a setting for this run

Ctrl+C (or SIGTERM) stops cleanly; run it again to resume where it stopped.
"""
import os
import sys

import pandas as pd

from public.cli import log, main, threads_note


def selected_models(settings):
    """MODELS by name (any registered model, seed models included), or public/model.py's."""
    from public.model import model_classes
    if not settings.MODELS:
        return model_classes
    import public.seed_models  # noqa: F401  (registers the seed systems' models)
    from public.config import SettingsError
    from public.registry import get_model_class
    try:
        return [get_model_class(name) for name in settings.MODELS]
    except KeyError as exc:
        raise SettingsError(f"params.py: MODELS={settings.MODELS!r}: {exc.args[0]}") from None


def run(settings, interrupts):
    from public.search import run_stage_one
    from public.trial import prepare_data
    model_classes = selected_models(settings)
    log(f"ATML stage one: {len(model_classes)} model(s): "
        f"{', '.join(m.__name__ for m in model_classes)}; {threads_note(settings)}")
    data = prepare_data(settings)
    log(data.summary)
    summary = run_stage_one(settings, data, model_classes, interrupts, log=log)
    with pd.option_context('display.width', 200, 'display.max_columns', 30):
        log("\nSummary (best trial per model; metrics on the "
            f"{settings.SELECT_ON} split decide):\n" + summary.to_string(index=False))
    log(f"\nAll trials: {os.path.join(settings.MODEL_SAVE_PATH, 'results.csv')}; summary: "
        f"{os.path.join(settings.MODEL_SAVE_PATH, 'summary.csv')}")


if __name__ == '__main__':
    sys.exit(main(run, name='train_multi.py'))
