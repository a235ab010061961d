"""ATML settings: one constant per line, a comment with the unit or the allowed values.

Edit this file, then run `python train_multi.py` (stage one) or `python train_final.py`
(stage two). Every setting is checked before any work starts (the table of
public/core/settings.py holds the defaults, rules and docs; docs/settings.md is the
reference); a bad one stops the run with a message naming it, its value and the rule.
The defaults run the demo on the synthetic data in ttdata/.
"""


# ----------------------------------------------------------------------------- data
DATA_DIR = 'ttdata/train'        # training folder (.txt files S<subject>-<RHYTHM>-<index>.txt); 20 % of its subjects validate
TEST_DIR = 'ttdata/test'         # test folder, other subjects; '' = no test set (only validation metrics)
DATA_FORMAT = 'auto'             # 'auto' (folder -> 'txt', .csv -> 'csv', .npy/.npz -> 'numpy'), 'txt', 'csv', 'numpy'
INPUT_SIZE = 1250                # samples per segment (5 s at 250 Hz)
PAD_TOLERANCE = 0                # segments shorter by at most this many samples are zero-padded (seed 002: 50)
SHORTER = 'error'                # segments shorter beyond PAD_TOLERANCE: 'error' or 'exclude' (skipped and counted)
LONGER = 'error'                 # segments longer than INPUT_SIZE: 'error' or 'crop' (first INPUT_SIZE samples)
POSITIVE_LABELS = ('AFIB',)      # binary task: rhythms labelled 1 (AF); every other rhythm, empty included, is 0
CLASSES = ()                     # multi-class task: class names/integers in label order, e.g. (0, 1, 2, 3); () = binary
LABEL_MODE = 'multiclass'        # 'multiclass': one label per segment (binary, or CLASSES); 'multilabel': a set of CLASSES per segment (seed 004, sigmoid outputs)
LABEL_SEPARATOR = '|'            # multilabel: joins a segment's labels in a CSV label column, e.g. 'NORM|MI'
VAL_FRACTION = 0.2               # fraction of training subjects held out for validation, in (0, 1)
VAL_FOLDS = ()                   # predefined folds instead: validate on these values of the data's 'fold' column/array (PTB-XL: (9,)); () = by subject
SKIP_BAD_FILES = False           # False: a bad data file stops the run; True: it is skipped and counted
CACHE_DIR = '.atml-cache'        # parsed data folders are cached here (invalidated when a folder changes)

# ----------------------------------------------------------------------------- stage one search
LR_MIN = 0.0015                  # first learning rate of the grid
LR_MAX = 0.005                   # last learning rate of the grid (inclusive)
STEP = 0.0005                    # grid step; > 0
AVOID_FILE_PATH = 'avoid.txt'    # pruned learning rates; candidates within 2*STEP of an entry are skipped
AVOID_PARAM = 0.8                # a trial whose worst metric (min of F1/acc/precision/recall) is below this prunes its rate
STAGE1_TARGET = 97               # a model's search ends once yy (int(100*min metric)) reaches this, 0..100
SELECT_ON = 'val'                # split that drives pruning, best model and stop: 'val' or 'test' (the original)
SELECT_METRIC = 'min4'           # score that drives them: 'min4' (min of F1/acc/precision/recall, the original), 'f1', 'accuracy', 'auc' (binary), 'abs_sum' (as 1 - abs_sum/2); binary tasks also 'fbeta', 'subj_fbeta', 'gen', 'contest' (docs/contest-scoring.md)
FBETA_BETA = 2.0                 # beta of the F-beta metrics (fbeta, subj_fbeta, gen, contest); 2 = recall weighs 4x precision, as both contests
NO_AF_SUBJECT = 'contest'        # F-beta of a subject without AF (0/0): 'contest' (1.0, the contests' scoring code), 'accuracy' (its share of segments predicted non-AF), 'skip' (left out)
GEN_THRESHOLD = 0.9              # gen = share of subjects whose F-beta is > this (IESD-2024's G: 0.9)
CONTEST = 'iesd2024'             # contest whose score is the 'contest' metric: 'iesd2024' (25 Fb + 15 G + 35 L + 5 M) or 'tdc2022' (100 Fb + 20 L + 20 M)
LATENCY_SCALE = 1.0              # CONTEST_LATENCY='measured': the measured onnxruntime latency times this is the contest's latency (this machine -> the target board)
CONTEST_LATENCY = 'macs'         # the contest score's latency: 'macs' (the graph's MACs / MACS_PER_MS: the same on every run, so the answer does not depend on timing) or 'measured' (onnxruntime on this machine x LATENCY_SCALE: varies with the machine's load)
MACS_PER_MS = 100000             # CONTEST_LATENCY='macs': the target board's multiply-accumulates per millisecond (latency = MACs / this)
SCHEDULER = 'grid'               # 'grid' (the original: every candidate to its early stop) or 'halving' (successive halving over each model's rates, docs/schedulers.md)
HALVING_MIN_EPOCHS = 3           # SCHEDULER='halving': epochs of the first rung (r); rungs are r, r*eta, r*eta^2, ... up to NUM_EPOCHS
HALVING_ETA = 3                  # SCHEDULER='halving': the reduction factor (eta): the best 1/eta of a rung go on, with eta times the epochs
MODELS = ()                      # model names to search, in order; () = every model of public/model.py
MODEL_SAVE_PATH = 'multi-result' # stage-one results: results.csv, summary.csv and one folder per model
RESUME = True                    # True: a rerun continues the previous search; False: start fresh (old results archived)

# ----------------------------------------------------------------------------- training (both stages)
NUM_EPOCHS = 30                  # maximum epochs per trial
BATCH_SIZE = 32                  # training batch size
PATIENCE = 5                     # epochs without validation-loss improvement before early stopping may fire
OVERFIT_GAP = 0.01               # ... and only if train loss < val loss - OVERFIT_GAP (the original's rule)
WEIGHT_DECAY = 0.001             # AdamW weight decay
SEED = 42                        # seed of every trial (initialisation, shuffling, split, augmentation)
AUGMENT = True                   # True (measured default, docs/recipe.md): label-preserving augmentations per batch (amplitude, noise, baseline wander, time shift); or a tuple of names from 'scale', 'noise', 'wander', 'shift', 'flip', each optionally 'name=level', e.g. ('scale', 'noise=0.15', 'wander', 'shift', 'flip')
CALIBRATE_THRESHOLD = False      # True (binary tasks): the decision threshold that maximises SELECT_METRIC on validation is chosen after training and folded into the last layer's bias (the ONNX argmax is the calibrated decision)
NORMALIZE = 'none'               # 'segment': each segment and lead standardised by the model itself (inside the exported ONNX)
CLASS_WEIGHTS = 'none'           # 'balanced': loss weights inversely proportional to the training class counts
REFIT = False                    # True: the chosen model is retrained on all training subjects (train + validation) for the epochs validation chose, and delivered
LR_SCHEDULE = 'plateau'          # 'plateau': ReduceLROnPlateau on val loss (patience 3, x0.5); 'cosine': cosine annealing over NUM_EPOCHS, per epoch
WEIGHT_AVERAGING = 'none'        # 'ema': exponential moving average of the weights (decay 0.999, per batch); 'swa': equal average of the epochs after NUM_EPOCHS/2, BatchNorm recomputed; the average is validated, kept and exported
DISTILL_FROM = ''                # knowledge distillation from a teacher: '' = none; a stage-one result folder (multi-result/<Model>/<xx>-<yy>/, its saved.onnx); 'auto' = the best of MODEL_SAVE_PATH/summary.csv
DISTILL_TEMPERATURE = 4.0        # with DISTILL_FROM: the softmax temperature T of the distillation term
DISTILL_WEIGHT = 0.5             # with DISTILL_FROM: the weight w of the distillation term, (1 - w) the task loss's; 0..1
DEVICE = 'auto'                  # 'auto' (cuda if available), 'cpu' or 'cuda'
NUM_THREADS = 1                  # torch CPU threads; 0 = torch's default (all cores). 1 is fastest for these tiny nets on a shared machine (bench/README.md)
NUM_WORKERS = 0                  # kept for compatibility with the original; data is served from memory, so unused
PREFETCH_FACTOR = 2              # kept for compatibility with the original; unused (see NUM_WORKERS)

# ----------------------------------------------------------------------------- export
ONNX_OPSET = 18                  # ONNX opset of exported models, 18..23
LATENCY_RUNS = 200               # onnxruntime single-segment runs timed for the latency figure (median)

# ----------------------------------------------------------------------------- stage two
LEARNING_RATE = 0.003            # fixed stage-two learning rate (the original's LEARING_RATE is accepted too)
CHANNEL_SCALES = (1, 2, 3, 4, 5) # conv channel scaling factors tried
FC_SCALES = (1, 2, 3, 4, 5)      # hidden FC width scaling factors tried
METRIC_TARGET = 90               # percent; the minimum of F1/accuracy/precision/recall must reach it
SIZE_TARGET_KB = 60              # ONNX file size cap in KB (1 KB = 1024 bytes)
LATENCY_TARGET_MS = 0            # onnxruntime latency cap in ms (batch 1, one thread), measured on the untrained candidate before training; 0 = none
RAM_TARGET_KB = 0                # peak activation memory cap in KB from the exported graph (INT8 figure with QUANTIZE_INT8), checked before training; 0 = none
CANDIDATE_ORDER = 'smallest'     # order candidates are trained in: 'smallest' (ONNX size) or 'fastest' (probe latency) first
QUANTIZE_INT8 = False            # True: also build an INT8 ONNX (onnxruntime static quantization); its size and metrics decide
INT8_REDUCE_RANGE = True         # True: INT8 weights in 7 bits, so the file computes the same on every CPU (x86 without VNNI saturates 8-bit weights); False: full 8-bit weights
QAT_EPOCHS = 0                   # > 0 (needs QUANTIZE_INT8): the INT8 model is fine-tuned this many epochs with fake quantization (quantization-aware training)
PRUNE_FRACTIONS = ()             # e.g. (0.25, 0.5): pruned variants of each width are also candidates (whole channels removed by L1 norm)
PRUNE_EPOCHS = 3                 # fine-tuning epochs after pruning
TEMP_DIR = 'temp'                # stage-two work in progress
FINAL_RESULT_DIR = '.'           # the stage-two result folder <xx>-<yy>/ is written here (project root, as the original)

# ----------------------------------------------------------------------------- parallel search (Ray)
WORKERS = 'auto'                 # concurrent trials: 'auto' = every CPU core Ray sees; 1 = serial, in-process, no Ray
RAY_ADDRESS = ''                 # '' = a private local Ray instance; 'auto' or 'host:port' = a running cluster (env RAY_ADDRESS works too)
