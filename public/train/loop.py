"""The training loop of one trial and the original's early-stopping rule.

    stopper = EarlyStopping(patience=5, overfit_gap=0.01)
    outcome = train_model(model, data, lr, settings, device)

EarlyStopping answers one question per epoch: stop now, and why. The original ATML's rule:
stop when validation loss has not improved for `patience` epochs AND the model is
overfitting (train loss < val loss - overfit_gap). The best-validation weights are kept.

Data is served from memory: the training tensors live on the device and each epoch draws a
seeded permutation, so there is no DataLoader, no worker processes and no re-parsing.

Two recipe levers, off by default (docs/settings.md): LR_SCHEDULE='cosine' (cosine annealing
over NUM_EPOCHS, stepped per epoch, instead of ReduceLROnPlateau) and WEIGHT_AVERAGING='ema'
/ 'swa' (WeightAverager: what is validated, kept as the best weights and returned is the
averaged model); with DISTILL_FROM the loss also follows a teacher's logits
(public/train/distill.py).
"""
import copy
import io
import math
import os
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from tqdm import tqdm

from public.core.atomic import write_atomic
from public.data.prepare import TrialData
from public.train.distill import DistillLoss
from public.train.recipe import Augmenter, class_weights


# Why a trial stopped: the values of the results table's `stop_reason` column.
STOP_EARLY = 'early-stop'
STOP_MAX_EPOCHS = 'max-epochs'
STOP_DIVERGED = 'diverged'
STOP_BUDGET = 'rung-budget'     # SCHEDULER='halving': trained the epochs of its rung, may go on

# WEIGHT_AVERAGING='ema': the average's decay per batch, warmed up as min(EMA_DECAY,
# (1 + t) / (10 + t)) after t updates (so a short run is not dominated by the initial weights).
EMA_DECAY = 0.999
# WEIGHT_AVERAGING='swa': the epochs after int(SWA_START * NUM_EPOCHS) are averaged (equal
# weight per epoch, the weights at each epoch's end), BatchNorm statistics recomputed.
SWA_START = 0.5


class EarlyStopping:
    """Told each epoch's (train_loss, val_loss); answers (stop?, reason)."""

    def __init__(self, patience, overfit_gap):
        self.patience = patience
        self.overfit_gap = overfit_gap
        self.best_val_loss = math.inf
        self.best_epoch = -1
        self.epochs_without_improvement = 0

    def step(self, epoch, train_loss, val_loss):
        """Record one epoch; returns (improved, stop, reason)."""
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
            return False, True, STOP_DIVERGED
        improved = val_loss < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_epoch = val_loss, epoch
            self.epochs_without_improvement = 0
            return True, False, None
        self.epochs_without_improvement += 1
        if (self.epochs_without_improvement >= self.patience
                and train_loss < val_loss - self.overfit_gap):
            return False, True, STOP_EARLY
        return False, False, None


@dataclass
class TrainOutcome:
    state_dict: dict
    epochs: int
    best_epoch: int
    stop_reason: str
    history: list = field(default_factory=list)   # (epoch, train_loss, val_loss, lr)
    seconds: float = 0.0
    resumed_at: int = 0        # the last finished epoch a checkpoint resumed from (0: fresh)


def num_classes_of(model, data):
    """The model's number of outputs (its last Linear layer), else the labels' count."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else int(data.y_train.max()) + 1


def seed_everything(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


@torch.inference_mode()
def _mean_loss(model, x, y, criterion, batch_size=1024):
    model.eval()
    total = 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].unsqueeze(-1)
        total += criterion(model(xb), y[i:i + batch_size]).item() * len(xb)
    return total / max(1, len(x))


def _epoch_batches(n, batch_size, generator):
    # A last batch of one sample would break BatchNorm; it joins the next epoch's draw instead.
    order = torch.randperm(n, generator=generator)
    stop = n if n % batch_size != 1 else n - 1
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]


def swa_start_epoch(num_epochs):
    """WEIGHT_AVERAGING='swa': the last epoch before averaging starts (0: every epoch)."""
    return int(SWA_START * num_epochs)


class WeightAverager:
    """WEIGHT_AVERAGING's running average of the weights, a dict with exactly the keys and
    shapes of model.state_dict() (so export, INT8, pruning and the result files take it as
    they take the plain weights).

    'ema': updated after every optimizer step, state <- lerp(state, weights, 1 - decay) for
    every float entry (parameters and BatchNorm running statistics alike; integer entries
    such as num_batches_tracked are copied), decay = min(EMA_DECAY, (1 + t) / (10 + t)),
    starting from the initial weights.
    'swa': updated at the end of every epoch after swa_start_epoch(NUM_EPOCHS): the equal
    average of those epochs' weights; its BatchNorm statistics are recomputed on the
    training data (recompute_batchnorm) whenever the average is validated or used.
    Nothing depends on a halving budget: only NUM_EPOCHS."""

    def __init__(self, kind, model, num_epochs):
        self.kind = kind
        self.start = swa_start_epoch(num_epochs)
        self.steps = 0               # ema: optimizer steps averaged; swa: epochs averaged
        self.state = ({k: v.detach().clone() for k, v in model.state_dict().items()}
                      if kind == 'ema' else None)
        self._live = None

    def _pairs(self, model):
        # The model's tensors (a state_dict shares their storage; training updates them in
        # place), paired with the average's, split float / other: built once.
        if self._live is None or self._live[0] is not model:
            live = model.state_dict()
            floats = [k for k, v in live.items() if v.is_floating_point()]
            others = [k for k in live if k not in set(floats)]
            self._live = (model, [self.state[k] for k in floats], [live[k] for k in floats],
                          [self.state[k] for k in others], [live[k] for k in others])
        return self._live[1:]

    def after_step(self, model):
        if self.kind != 'ema':
            return
        decay = min(EMA_DECAY, (1 + self.steps) / (10 + self.steps))
        avg_f, live_f, avg_o, live_o = self._pairs(model)
        with torch.no_grad():
            if avg_f:
                torch._foreach_lerp_(avg_f, live_f, 1.0 - decay)
            for a, v in zip(avg_o, live_o):
                a.copy_(v)
        self.steps += 1

    def after_epoch(self, model, epoch):
        """SWA: add the weights of a finished epoch of the averaging phase; True when added."""
        if self.kind != 'swa' or epoch <= self.start:
            return False
        current = model.state_dict()
        with torch.no_grad():
            if self.state is None:
                self.state = {k: v.detach().clone() for k, v in current.items()}
            else:
                for k, v in current.items():
                    if v.is_floating_point():
                        self.state[k] += (v - self.state[k]) / (self.steps + 1)
                    else:
                        self.state[k].copy_(v)
        self.steps += 1
        return True

    @property
    def ready(self):
        """Whether there is an average to validate (SWA: from its first averaged epoch)."""
        return self.state is not None

    def averaged_state(self, model, x_train, batch_size):
        """The averaged weights as a state dict (SWA: BatchNorm statistics recomputed on
        x_train ((N, C, L, 1)); the model is used for that and left as it was)."""
        if self.kind == 'ema':
            return {k: v.clone() for k, v in self.state.items()}
        raw = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.state)
        recompute_batchnorm(model, x_train, batch_size)
        averaged = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(raw)
        return averaged

    def to_checkpoint(self):
        return dict(kind=self.kind, steps=self.steps, state=self.state)

    def restore(self, saved, device):
        self.steps = saved['steps']
        state = saved['state']
        self.state = {k: v.to(device) for k, v in state.items()} if state is not None else None
        self._live = None


@torch.no_grad()
def recompute_batchnorm(model, x, batch_size=256):
    """Recompute every BatchNorm's running statistics on x ((N, C, L, 1)) with the model's
    current weights: a cumulative average over fixed-order batches (as
    torch.optim.swa_utils.update_bn; only the BatchNorm layers in train mode, so dropout
    draws nothing). The model is left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    stop = len(x) if len(x) % batch_size != 1 else len(x) - 1
    for i in range(0, stop, batch_size):
        model(x[i:i + batch_size])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
        m.eval()
    model.eval()


def _averager(model, settings):
    kind = settings.WEIGHT_AVERAGING
    return WeightAverager(kind, model, settings.NUM_EPOCHS) if kind != 'none' else None


def _scheduler(optimizer, settings):
    """LR_SCHEDULE: 'plateau' = ReduceLROnPlateau on val loss (patience 3, factor 0.5);
    'cosine' = lr * (1 + cos(pi * (e - 1) / NUM_EPOCHS)) / 2 in epoch e (1-based), stepped
    per epoch; it depends on NUM_EPOCHS only (never on a halving budget)."""
    if settings.LR_SCHEDULE == 'cosine':
        epochs = settings.NUM_EPOCHS
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: 0.5 * (1.0 + math.cos(math.pi * e / epochs)))
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode='min', patience=3,
                                                      factor=0.5)


def make_criterion(settings, y_train, num_outputs):
    """The loss of a task: cross-entropy for one label per segment (y int64 (N,)), with
    CLASS_WEIGHTS='balanced' class weights; BCE-with-logits for multi-label (y float (N, K)
    multi-hot), with 'balanced' per-label positive weights (negatives / positives)."""
    balanced = settings.CLASS_WEIGHTS == 'balanced'
    if y_train.dim() == 2:
        pos_weight = None
        if balanced:
            positives = y_train.sum(0)
            pos_weight = torch.where(positives > 0, (len(y_train) - positives)
                                     / positives.clamp_min(1), torch.ones_like(positives))
        return nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    return nn.CrossEntropyLoss(weight=class_weights(y_train, num_outputs) if balanced else None)


def _optimizer(model, lr, settings, device):
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=settings.WEIGHT_DECAY,
                             **({'fused': True} if device.type in ('cpu', 'cuda') else {}))


def _train_epoch(model, x_train, y_train, optimizer, criterion, augment, generator, settings,
                 device, progress, desc, teacher=None, distill=None, averager=None):
    """One epoch over x_train ((N, C, L, 1)) in seeded batches; returns the mean train loss
    (the task loss: with distillation (`teacher` logits aligned with x_train, `distill` a
    DistillLoss) the optimized loss mixes in the teacher term, the reported one does not).
    `averager` (WeightAverager) is updated after every optimizer step."""
    model.train()
    batches = _epoch_batches(len(x_train), settings.BATCH_SIZE, generator)
    running = torch.zeros((), device=device)
    seen = 0
    for idx in tqdm(batches, desc=desc, unit='batch', disable=None if progress else True,
                    leave=False, mininterval=0.5):
        idx = idx.to(device, non_blocking=True)
        xb, yb = x_train.index_select(0, idx), y_train.index_select(0, idx)
        if augment is not None:
            xb = augment(xb.squeeze(-1)).unsqueeze(-1)
        optimizer.zero_grad(set_to_none=True)
        if distill is not None:
            loss, task = distill(model(xb), yb, teacher.index_select(0, idx))
        else:
            loss = task = criterion(model(xb), yb)
        loss.backward()
        optimizer.step()
        if averager is not None:
            averager.after_step(model)
        running += task.detach() * len(idx)
        seen += len(idx)
    return running.item() / max(1, seen)


def train_model(model, data, lr, settings, device, progress=True, desc='train', on_epoch=None,
                checkpoint=None, budget=0):
    """Train `model` (freshly initialised) on data; return the best-validation weights.
    `on_epoch(epoch, max_epochs, train_loss, val_loss)`, when given, is called after each
    epoch (the live progress of a search: public/search/progress.py).

    AdamW (weight decay WEIGHT_DECAY), LR_SCHEDULE ('plateau': ReduceLROnPlateau on val loss,
    patience 3, factor 0.5; 'cosine': annealed over NUM_EPOCHS), cross-entropy (BCE for
    multi-label), up to NUM_EPOCHS epochs of BATCH_SIZE, EarlyStopping. Ctrl+C arrives as
    KeyboardInterrupt (public/core/interrupts.py) and abandons the trial.

    WEIGHT_AVERAGING ('ema', 'swa'): the averaged model is what each epoch validates (its val
    loss drives early stopping and ReduceLROnPlateau), what is kept as the best weights and
    what is returned and left in `model` (same state-dict keys and shapes). 'swa' validates
    the plain model until its averaging starts (swa_start_epoch), then the average; early
    stopping's best is reset there, so the best averaged model is returned; a trial that
    stops before the averaging starts keeps its plain best weights. The train loss is the
    plain model's running loss in both.

    data.teacher_logits (DISTILL_FROM, aligned with data.x_train): the optimized loss is
    (1 - DISTILL_WEIGHT) * task + DISTILL_WEIGHT * T^2 * KL(teacher/T || student/T); train
    and validation losses reported are the task loss.

    `checkpoint`, a file path: after every epoch the whole state (model, optimizer, scheduler,
    early stopping, best weights, weight average, history, every RNG) is written there
    atomically, and a call that finds a checkpoint of the same trial (same learning rate,
    recipe settings, teacher, model shapes and data sizes) resumes after its last finished
    epoch, ending exactly as an uninterrupted run would on the CPU (outcome.resumed_at says
    where it resumed).

    `budget` (SCHEDULER='halving', 0 = none): train at most this many epochs in all, counting
    those of the checkpoint; a trial that reaches it without stopping ends with stop reason
    'rung-budget', and its checkpoint lets a later call with a larger budget go on exactly
    as one uninterrupted run of that budget (nothing in the recipe depends on the budget)."""
    start = time.perf_counter()
    model.to(device)
    optimizer = _optimizer(model, lr, settings, device)
    scheduler = _scheduler(optimizer, settings)
    plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    criterion = make_criterion(settings, data.y_train, num_classes_of(model, data))
    teacher = data.teacher_logits
    distill = None
    if teacher is not None and settings.DISTILL_WEIGHT > 0:
        teacher = teacher.to(device)
        distill = DistillLoss(criterion, settings.DISTILL_TEMPERATURE, settings.DISTILL_WEIGHT)
    augment = (Augmenter(settings.SEED, device, settings.AUGMENT) if settings.AUGMENT
               else None)
    stopper = EarlyStopping(settings.PATIENCE, settings.OVERFIT_GAP)
    generator = torch.Generator().manual_seed(settings.SEED)
    averager = _averager(model, settings)
    best_state, history, reason = None, [], STOP_MAX_EPOCHS
    fingerprint = _fingerprint(model, data, lr, settings)
    saved = _load_checkpoint(checkpoint, fingerprint)
    resumed_at, stopped, spent = 0, False, 0.0
    if saved is not None:
        resumed_at, stopped, reason, spent = (saved['epoch'], saved['stopped'], saved['reason'],
                                              saved['seconds'])
        best_state, history = _restore(saved, model, optimizer, scheduler, stopper, generator,
                                       augment, device)
        if averager is not None:
            averager.restore(saved['averager'], device)
    x_train = data.x_train.unsqueeze(-1)
    last = min(budget, settings.NUM_EPOCHS) if budget else settings.NUM_EPOCHS
    epochs = tqdm(range(resumed_at + 1, 0 if stopped else last + 1), desc=desc,
                  unit='epoch', disable=None if progress else True, leave=False)
    epoch = resumed_at
    for epoch in epochs:
        train_loss = _train_epoch(model, x_train, data.y_train, optimizer, criterion, augment,
                                  generator, settings, device, progress, f"epoch {epoch}",
                                  teacher=teacher, distill=distill, averager=averager)
        averaged = None
        if averager is not None:
            if averager.after_epoch(model, epoch) and averager.steps == 1:
                # SWA's averaging starts: its best is chosen among averaged models only
                stopper.best_val_loss, stopper.epochs_without_improvement = math.inf, 0
            if averager.ready:
                averaged = averager.averaged_state(model, x_train, settings.BATCH_SIZE)
        val_loss = _val_loss(model, averaged, data, criterion)
        if plateau:
            if math.isfinite(val_loss):
                scheduler.step(val_loss)
        else:
            scheduler.step()
        history.append((epoch, train_loss, val_loss, optimizer.param_groups[0]['lr']))
        epochs.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
        if on_epoch is not None:
            on_epoch(epoch, last, train_loss, val_loss)
        improved, stop, why = stopper.step(epoch, train_loss, val_loss)
        if improved:
            best_state = averaged if averaged is not None else copy.deepcopy(model.state_dict())
        if stop:
            reason, stopped = why, True
        if checkpoint:
            _save_checkpoint(checkpoint, dict(
                fingerprint=fingerprint, epoch=epoch, stopped=stop, reason=reason,
                seconds=spent + time.perf_counter() - start, model=model.state_dict(),
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                stopper=vars(stopper), best_state=best_state, history=history,
                averager=averager.to_checkpoint() if averager is not None else None,
                rng=_rng_states(generator, augment)))
        if stop:
            break
    epochs.close()
    if not stopped and epoch < settings.NUM_EPOCHS:
        reason = STOP_BUDGET                     # went as far as its budget: it may go on
    if best_state is None:                       # diverged before any finite validation loss
        best_state = copy.deepcopy(model.state_dict())
        reason = STOP_DIVERGED
    model.load_state_dict(best_state)
    return TrainOutcome(state_dict=best_state, epochs=epoch, best_epoch=stopper.best_epoch,
                        stop_reason=reason, history=history,
                        seconds=spent + time.perf_counter() - start, resumed_at=resumed_at)


def _val_loss(model, averaged, data, criterion):
    """The validation loss of the model, or of the averaged weights when there are (the
    model's own weights are put back)."""
    if averaged is None:
        return _mean_loss(model, data.x_val, data.y_val, criterion)
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(averaged)
    try:
        return _mean_loss(model, data.x_val, data.y_val, criterion)
    finally:
        model.load_state_dict(raw)


# ----------------------------------------------------------------------------- checkpoints

def _fingerprint(model, data, lr, settings):
    # What makes a checkpoint this trial's: the folder it lies in is keyed by the settings
    # key already; this guards against a file of another trial or model put in its place.
    return dict(lr=float(lr), seed=settings.SEED, batch=settings.BATCH_SIZE,
                epochs=settings.NUM_EPOCHS, patience=settings.PATIENCE,
                gap=settings.OVERFIT_GAP, decay=settings.WEIGHT_DECAY,
                augment=settings.AUGMENT, weights=settings.CLASS_WEIGHTS,
                sizes=(len(data.x_train), len(data.x_val)),
                shapes=[(k, tuple(v.shape)) for k, v in model.state_dict().items()],
                **_lever_fingerprint(data, settings))


def _lever_fingerprint(data, settings):
    # Only the levers that are on: at their defaults a checkpoint of an earlier ATML resumes.
    out = {}
    if settings.WEIGHT_AVERAGING != 'none':
        out['averaging'] = settings.WEIGHT_AVERAGING
    if settings.LR_SCHEDULE != 'plateau':
        out['schedule'] = settings.LR_SCHEDULE
    if data.teacher_logits is not None:
        out['teacher'] = (data.teacher_id, float(settings.DISTILL_TEMPERATURE),
                          float(settings.DISTILL_WEIGHT))
    return out


def _rng_states(generator, augment):
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(),
                python=random.getstate(), batches=generator.get_state(),
                augment=augment.generator.get_state() if augment is not None else None,
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)


def _save_checkpoint(path, state):
    """torch.save to bytes, then one atomic write (a kill leaves the previous epoch's file)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, buffer.getvalue(), step=False)


def _load_checkpoint(path, fingerprint):
    """The saved state at path when it is this trial's; None when there is none, it cannot be
    read (another torch version, a damaged disk) or it is another trial's: start fresh."""
    if not path or not os.path.exists(path):
        return None
    try:
        # Our own file in our own TEMP_DIR; it holds numpy and Python RNG states.
        saved = torch.load(path, map_location='cpu', weights_only=False)
    except Exception:
        return None
    return saved if isinstance(saved, dict) and saved.get('fingerprint') == fingerprint else None


def _restore(saved, model, optimizer, scheduler, stopper, generator, augment, device):
    """Put a checkpoint's state back; returns (best_state on the device, history)."""
    model.load_state_dict(saved['model'])
    optimizer.load_state_dict(saved['optimizer'])
    scheduler.load_state_dict(saved['scheduler'])
    vars(stopper).update(saved['stopper'])
    rng = saved['rng']
    torch.set_rng_state(rng['torch'])
    np.random.set_state(rng['numpy'])
    random.setstate(rng['python'])
    generator.set_state(rng['batches'])
    if augment is not None and rng['augment'] is not None:
        augment.generator.set_state(rng['augment'])
    if rng['cuda'] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng['cuda'])
    best = saved['best_state']
    best_state = {k: v.to(device) for k, v in best.items()} if best is not None else None
    return best_state, [tuple(h) for h in saved['history']]


def refit_schedule(history, lr, epochs):
    """The learning rate each of the first `epochs` epochs of a validated run trained at:
    `lr`, then what ReduceLROnPlateau had set after each epoch (history's last column)."""
    return ([lr] + [h[3] for h in history])[:epochs]


def train_fixed(model, x, y, lrs, settings, device, progress=True, desc='refit'):
    """REFIT: train a fresh model on (x, y) for len(lrs) epochs at the given per-epoch
    learning rates, with no validation split and no early stopping (the epoch count and the
    schedule come from the validated run). With WEIGHT_AVERAGING the model ends with the
    averaged weights, averaged as train_model averages them. (No distillation: DISTILL_FROM
    and REFIT are refused together by the settings check.) Returns the per-epoch train
    losses."""
    model.to(device)
    optimizer = _optimizer(model, lrs[0], settings, device)
    criterion = make_criterion(settings, y, num_classes_of(model, TrialData(x, y, x, y)))
    augment = (Augmenter(settings.SEED, device, settings.AUGMENT) if settings.AUGMENT
               else None)
    generator = torch.Generator().manual_seed(settings.SEED)
    averager = _averager(model, settings)
    x = x.unsqueeze(-1)
    losses = []
    for epoch, lr in enumerate(lrs, start=1):
        for group in optimizer.param_groups:
            group['lr'] = lr
        losses.append(_train_epoch(model, x, y, optimizer, criterion, augment, generator,
                                   settings, device, progress, f"{desc} epoch {epoch}",
                                   averager=averager))
        if averager is not None:
            averager.after_epoch(model, epoch)
        if not math.isfinite(losses[-1]):
            break
    if averager is not None and averager.ready:    # as the validated run: the average
        model.load_state_dict(averager.averaged_state(model, x, settings.BATCH_SIZE))
    model.eval()
    return losses
