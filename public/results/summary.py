"""Stage one's summary.csv read back: its rows, and the pick it recommends for stage two.

    rows = read_summary('multi-result/summary.csv')
    pick = recommended_pick(rows)        # {'model', 'lr', 'score', 'onnx_kb', 'result'} or None
    folder = teacher_folder(settings)    # DISTILL_FROM's folder ('auto': the pick's), or None
"""
import os

import pandas as pd

SUMMARY_CSV = 'summary.csv'


def read_summary(path):
    """The rows of a stage-one summary.csv as dicts ([] when there is none or it is empty)."""
    try:
        return pd.read_csv(path, dtype={'best_lr': str}).to_dict('records')
    except (OSError, pd.errors.EmptyDataError):
        return []


def recommended_pick(rows):
    """Stage one's pick from summary rows: the best score over models, ties to the smaller
    ONNX file; {'model', 'lr', 'score', 'onnx_kb', 'result'} or None (no trained model)."""
    def number(value):
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
        return None if value != value else value
    ranked = [r for r in rows if number(r.get('score')) is not None and r.get('best_lr') not in (None, '')
              and str(r.get('best_lr')) != 'nan']
    if not ranked:
        return None
    best = min(ranked, key=lambda r: (-number(r['score']), number(r.get('onnx_kb')) or 0.0))
    return {'model': best['model'], 'lr': str(best['best_lr']), 'score': number(best['score']),
            'onnx_kb': number(best.get('onnx_kb')), 'result': str(best.get('result', ''))}


def teacher_folder(settings):
    """The result folder DISTILL_FROM names: the value itself, or with 'auto' the folder of
    MODEL_SAVE_PATH/summary.csv's recommended pick (None when it lists no trained model).
    Whether the folder holds a saved.onnx is public.search.teacher's check."""
    if settings.DISTILL_FROM != 'auto':
        return settings.DISTILL_FROM
    pick = recommended_pick(read_summary(os.path.join(settings.MODEL_SAVE_PATH, SUMMARY_CSV)))
    return None if pick is None else os.path.join(settings.MODEL_SAVE_PATH, pick['model'],
                                                  pick['result'])
