"""The files of a result folder: saved.pth, saved.onnx (saved.int8.onnx), params_used.py,
result.json, evaluation_metrics.txt and per_subject.csv, written into the folder
public.core.atomic.replace_folder builds.

    replace_folder(parent, name, lambda folder: write_result_files(folder, result=..., ...))
    info = read_info(folder)                   # result.json, or None
    write_info(folder, info)                   # result.json + evaluation_metrics.txt

result.json holds everything evaluation_metrics.txt and the report are made from;
evaluation_metrics.txt keeps the original's lines (metrics, learning rate, model,
`ONNX file size: 87.60 KB`) and adds ATML's.
"""
import json
import os

import pandas as pd
import torch

from public.core.errors import DiskFullError, disk_full_cause, disk_full_reason
from public.core.settings import write_settings
from public.compress.graph_stats import format_stats
from public.train.metrics import PER_SUBJECT_COLUMNS, worst_subjects

# The model files of a result folder (saved.val.* only with REFIT: the validation-chosen
# model, while saved.* is the refit one that is delivered).
MODEL_FILES = ('saved.pth', 'saved.onnx', 'saved.int8.onnx', 'saved.val.pth', 'saved.val.onnx',
               'saved.val.int8.onnx', 'params_used.py', 'per_subject.csv')


def format_metrics(metrics):
    labels = (('F1 Score', 'f1'), ('Accuracy', 'accuracy'), ('Precision', 'precision'),
              ('Recall', 'recall'), ('ROC AUC', 'auc'), ('Abs-sum', 'abs_sum'))
    lines = [f"{label}: {metrics[m]:.4f}" for label, m in labels
             if m in metrics and not (m == 'abs_sum' and metrics[m] != metrics[m])]
    per_label = sorted({k.rsplit('_', 1)[0] for k in metrics
                        if '_' in k and k != 'abs_sum' and k.rsplit('_', 1)[1] in
                        ('f1', 'accuracy', 'precision', 'recall', 'auc')},
                       key=lambda n: list(metrics).index(f"{n}_f1") if f"{n}_f1" in metrics else 0)
    for name in per_label:         # multi-label: the figures above are macro averages
        lines.append(f"Label {name}: " + ', '.join(
            f"{label} {metrics[f'{name}_{m}']:.4f}" for label, m in labels[:5]
            if f"{name}_{m}" in metrics))
    return '\n'.join(lines)


def contest_lines(metrics, scoring, latency_ms=None, macs=None):
    """The contest figures' lines of evaluation_metrics.txt (binary tasks; none otherwise):
    'F-beta (beta=2): 0.9321', 'Subject-averaged F-beta: ...', 'Subjects with F-beta > 0.9:
    7 of 9 (0.78)', 'Contest score (iesd2024, normalised): ...'."""
    if 'fbeta' not in metrics or not scoring:
        return []
    def num(v):
        return 'n/a' if v is None or v != v else f"{v:.4f}"
    beta = f"{scoring['beta']:g}"
    lines = [f"F-beta (beta={beta}): {num(metrics['fbeta'])}",
             f"Subject-averaged F-beta: {num(metrics.get('subj_fbeta'))} (subjects without AF: "
             f"NO_AF_SUBJECT={scoring['no_af']!r})",
             f"Subject-averaged F1: {num(metrics.get('subj_f1'))}"]
    n, gen = metrics.get('gen_subjects'), metrics.get('gen')
    if n and gen == gen:
        lines.append(f"Subjects with F-beta > {scoring['threshold']:g}: {round(gen * n)} of "
                     f"{int(n)} ({gen:.2f})")
    if metrics.get('contest') is not None:
        if scoring.get('latency', 'measured') == 'macs':     # result.json before: measured
            measured = f" (latency {macs / scoring['macs_per_ms']:.3f} ms = {macs} MACs / " \
                f"MACS_PER_MS={scoring['macs_per_ms']:g})" if macs else ''
        else:
            measured = f" (latency {latency_ms:.3f} ms x LATENCY_SCALE=" \
                f"{scoring['latency_scale']:g})" if latency_ms is not None and \
                latency_ms == latency_ms else ''
        lines.append(f"Contest score ({scoring['contest']}, normalised): "
                     f"{num(metrics['contest'])}{measured}")
    return lines


def kb2(size_bytes):
    """'87.60': KB (1024 bytes) with two decimals, as the original's evaluation_metrics.txt."""
    return f"{size_bytes / 1024:.2f}"


def evaluation_text(info):
    """evaluation_metrics.txt from a result folder's result.json: the original's lines
    (metrics, learning rate, model, `ONNX file size: 87.60 KB`) and ATML's additions."""
    select_on = info['select_on']
    other = 'test' if select_on == 'val' else 'val'
    lines = [format_metrics(info.get(f"{select_on}_metrics") or {}),
             f"Learning Rate: {info['lr']}", f"Model: {info['model']}",
             f"ONNX file size: {kb2(info['onnx_bytes'])} KB"]
    if 'channel_scale' in info:
        lines += [f"Channel scaling factor: {info['channel_scale']}",
                  f"FC scaling factor: {info['fc_scale']}"]
    if info.get('prune_fraction'):
        lines.append(f"Pruned: {100 * info['prune_fraction']:.0f} % of the channels and hidden "
                     f"units removed after training (smallest L1 norm), then fine-tuned. "
                     f"saved.pth loads into public.compress.channel_prune.prune_model("
                     f"build_from_config(config), "
                     f"{info['prune_fraction']}, example_input) (config: result.json)")
    int8 = info.get('int8')
    if int8:
        lines.append(f"INT8 ONNX file size: {kb2(int8['bytes'])} KB "
                     f"(saved.int8.onnx, the deliverable: QUANTIZE_INT8=True)")
    lines += contest_lines(info.get(f"{select_on}_metrics") or {}, info.get('scoring'),
                           info.get('latency_ms'), (info.get('graph') or {}).get('macs'))
    if info.get('graph'):
        lines.append("Deployment (exported graph, batch 1): " + format_stats(info['graph']))
    if 'decision_threshold' in info:
        lines.append(f"Decision threshold: class 1 when P(class 1) > "
                     f"{info['decision_threshold']:.6g} (CALIBRATE_THRESHOLD=True: chosen on "
                     f"the val split, folded into the last layer's bias; saved.onnx's argmax "
                     f"is this decision)")
    lines += [f"Metrics above are on the {select_on} split (SELECT_ON={select_on!r}).", '']
    if info.get(f"{other}_metrics"):
        lines += [f"{other} split:", format_metrics(info[f"{other}_metrics"]), '']
    if int8:
        lines += ["INT8 model (saved.int8.onnx, static quantization, QDQ):",
                  f"ONNX file size: {kb2(int8['bytes'])} KB"]
        lines += [f"{split} split: " + ', '.join(f"{m} {v:.4f}" for m, v in int8[split].items())
                  for split in ('val', 'test') if int8.get(split)]
        if int8.get('graph'):
            lines.append("INT8 deployment (exported graph, batch 1): " + format_stats(int8['graph']))
        if int8.get('method') == 'qat':
            ptq = int8.get('ptq') or {}
            lines.append(f"Quantization-aware training: {int8['epochs']} epoch(s) of fine-tuning "
                         f"with fake quantization (QAT_EPOCHS). Post-training INT8 of the same "
                         f"model, for comparison ({kb2(ptq['bytes'])} KB):" if ptq.get('bytes')
                         else f"Quantization-aware training: {int8['epochs']} epoch(s).")
            lines += [f"  {split} split: " + ', '.join(f"{m} {v:.4f}" for m, v in ptq[split].items())
                      for split in ('val', 'test') if ptq.get(split)]
        lines.append('')
    refit = info.get('refit')
    if refit:
        lines += [f"REFIT=True: saved.onnx is the model retrained on all training subjects "
                  f"(train + validation) for {refit['epochs']} epoch(s), the epochs validation "
                  f"chose; the metrics above are of the validation-chosen model, saved.val.onnx.",
                  f"Refit ONNX file size: {kb2(refit['onnx_bytes'])} KB"]
        if refit.get('test_metrics'):
            lines += ["refit model (saved.onnx) test split:", format_metrics(refit['test_metrics'])]
        if (refit.get('int8') or {}).get('test'):
            lines.append("refit INT8 model (saved.int8.onnx) test split: " + ', '.join(
                f"{m} {v:.4f}" for m, v in refit['int8']['test'].items()))
        lines.append('')
    if info.get('verdict'):
        lines += [info['verdict'], '']
    return '\n'.join(lines)


def write_result_files(folder, *, result, name, model_name, lr, settings, onnx_bytes,
                       info=None, int8_onnx=None):
    """The files of a result folder, as the original wrote them plus the settings used:
    saved.pth (state dict), saved.onnx, evaluation_metrics.txt, params_used.py, result.json
    (everything evaluation_metrics.txt and the report are made from). A full disk is a
    DiskFullError with the bytes the folder needs (replace_folder removes what was written
    and names the final folder)."""
    try:
        _write_result_files(folder, result=result, name=name, model_name=model_name, lr=lr,
                            settings=settings, onnx_bytes=onnx_bytes, info=info,
                            int8_onnx=int8_onnx)
    except BaseException as exc:
        cause = disk_full_cause(exc)
        if cause is None or isinstance(cause, DiskFullError):
            raise
        raise DiskFullError(folder, disk_full_reason(cause),
                            needed=_result_bytes(result, int8_onnx)) from None


def _result_bytes(result, int8_onnx):
    """About the bytes a result folder takes: its weights and ONNX files, plus 16 KB for
    result.json, params_used.py, per_subject.csv and the zip framing of saved.pth."""
    def weights(state):
        return sum(v.numel() * v.element_size() for v in (state or {}).values()
                   if hasattr(v, 'numel'))
    refit = getattr(result, 'refit', None) or {}
    total = weights(result.state_dict) + len(result.onnx or b'') + len(int8_onnx or b'')
    total += weights(refit.get('state_dict')) + len(refit.get('onnx') or b'')
    total += len(refit.get('int8_onnx') or b'')
    return total + 16 * 1024


def _write_result_files(folder, *, result, name, model_name, lr, settings, onnx_bytes,
                        info=None, int8_onnx=None):
    refit = getattr(result, 'refit', None)
    stem = 'saved.val' if refit else 'saved'     # REFIT: saved.* is the refit model
    torch.save(result.state_dict, os.path.join(folder, f'{stem}.pth'))
    with open(os.path.join(folder, f'{stem}.onnx'), 'wb') as f:
        f.write(result.onnx)
    if int8_onnx:
        with open(os.path.join(folder, f'{stem}.int8.onnx'), 'wb') as f:
            f.write(int8_onnx)
    if refit:
        torch.save(refit['state_dict'], os.path.join(folder, 'saved.pth'))
        with open(os.path.join(folder, 'saved.onnx'), 'wb') as f:
            f.write(refit['onnx'])
        if refit.get('int8_onnx'):
            with open(os.path.join(folder, 'saved.int8.onnx'), 'wb') as f:
                f.write(refit['int8_onnx'])
    select_on = settings.SELECT_ON
    other = 'test' if select_on == 'val' else 'val'
    record = {'folder': name, 'model': model_name, 'lr': lr, 'onnx_bytes': onnx_bytes,
              'select_on': select_on,
              f"{select_on}_metrics": result.selected(select_on),
              f"{other}_metrics": result.selected(other),
              'latency_ms': result.latency_ms, 'params': result.params, 'epochs': result.epochs,
              'best_epoch': result.best_epoch, 'stop_reason': result.stop_reason,
              'history': [list(h) for h in (result.history or [])],
              'confusion': result.confusion or {},
              'scoring': {'beta': settings.FBETA_BETA, 'no_af': settings.NO_AF_SUBJECT,
                          'threshold': settings.GEN_THRESHOLD, 'contest': settings.CONTEST,
                          'latency_scale': settings.LATENCY_SCALE,
                          'latency': settings.CONTEST_LATENCY,
                          'macs_per_ms': settings.MACS_PER_MS},
              'graph': getattr(result, 'graph', None), **(info or {})}
    if settings.CALIBRATE_THRESHOLD:
        record['decision_threshold'] = getattr(result, 'threshold', 0.5)
    if refit:
        record['refit'] = {k: v for k, v in refit.items()
                           if k not in ('state_dict', 'onnx', 'int8_onnx', 'per_subject', 'model')}
    write_settings(settings, os.path.join(folder, 'params_used.py'))
    write_info(folder, record)
    rows = list(getattr(result, 'per_subject', None) or []) + list((refit or {}).get('per_subject', []))
    if rows:
        pd.DataFrame(rows, columns=list(PER_SUBJECT_COLUMNS)).to_csv(
            os.path.join(folder, 'per_subject.csv'), index=False)


def write_info(folder, info):
    """result.json and the evaluation_metrics.txt made from it (their one writer)."""
    with open(os.path.join(folder, 'result.json'), 'w') as f:
        json.dump(info, f, indent=2, default=_json_default)
    with open(os.path.join(folder, 'evaluation_metrics.txt'), 'w') as f:
        f.write(evaluation_text(info))


def read_info(folder):
    try:
        with open(os.path.join(folder, 'result.json')) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _json_default(value):
    if hasattr(value, 'item'):
        return value.item()
    if hasattr(value, 'tolist'):
        return value.tolist()
    return str(value)


WORST_BELOW = 0.9     # a subject is named where its accuracy is below this
WORST_COUNT = 5       # at most this many subjects per folder


def worst_subjects_note(folders, below=WORST_BELOW, count=WORST_COUNT, width=100):
    """One short line per result folder naming its subjects with accuracy below `below`
    (test split, else val; worst first, at most `count`), e.g.
    `  AFNet/98-70 (test): S204 0.50, S201 0.60 (of 40 segments each)`; no line for a folder
    whose subjects all reach it (per_subject.csv holds every subject)."""
    lines = []
    for folder in folders:
        path = os.path.join(str(folder), 'per_subject.csv')
        if not os.path.exists(path):
            continue
        rows = pd.read_csv(path, dtype={'subject': str}).to_dict('records')
        for split in ('test', 'val'):
            mine = [r for r in rows if r['split'] == split]
            if not mine:
                continue
            weak = sorted((r for r in mine if float(r['accuracy']) < below),
                          key=lambda r: float(r['accuracy']))[:count]
            if weak:
                name = os.path.join(*os.path.normpath(str(folder)).split(os.sep)[-2:])
                sizes = {int(r['segments']) for r in weak}
                tail = ('' if len(sizes) > 1 else f" ({sizes.pop()} segments)" if len(weak) == 1
                        else f" (of {sizes.pop()} segments each)")
                line = ''
                for shown in range(len(weak), 0, -1):     # as many as fit in `width`
                    subjects = ', '.join(
                        f"{r['subject']} {float(r['accuracy']):.2f}"
                        + ('' if tail else f" ({int(r['segments'])})") for r in weak[:shown])
                    more = f" +{len(weak) - shown}" if shown < len(weak) else ''
                    line = f"  {name} ({split}): {subjects}{more}{tail}"
                    if len(line) <= width:
                        break
                lines.append(line)
            break
    return lines
