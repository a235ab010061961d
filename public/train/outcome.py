"""What a trial comes back as: a TrialResult, with its TrialStatus.

    result = TrialResult(status=TrialStatus.FAILED)
    result.status == 'failed'                  # a status is its own CSV value

A status is a `str` enum: its value is what the results tables hold ('ok', 'diverged',
'failed', 'speculative', 'over-size'), and it compares, hashes, prints and is written as
that string, so rows read back from a table compare equal to the members.
"""
import enum
from dataclasses import dataclass, field


class TrialStatus(str, enum.Enum):
    """The `status` column of the results tables."""
    OK = 'ok'
    DIVERGED = 'diverged'          # the loss became NaN/inf
    FAILED = 'failed'              # the model did not build, run or export (traceback kept)
    # A trial the parallel search ran ahead of the serial order and the serial search never
    # reaches (pruned by an earlier result, its model done): its row is kept, it decides nothing.
    SPECULATIVE = 'speculative'
    OVER_SIZE = 'over-size'        # stage two: over SIZE_TARGET_KB before training, never trained
    OVER_LATENCY = 'over-latency'  # stage two: over LATENCY_TARGET_MS before training, never trained
    OVER_RAM = 'over-ram'          # stage two: over RAM_TARGET_KB before training, never trained
    NOT_NEEDED = 'not-needed'      # stage two: never trained, a smaller candidate met the targets
    # SCHEDULER='halving': a trial that trained its rung's epochs and was not among the best
    # 1/eta of the rung (its row holds its metrics; not pruned, not in avoid.txt) ...
    STOPPED = 'stopped'
    # ... or was, and went on from its checkpoint: its next rung's row holds what followed.
    PROMOTED = 'promoted'

    # The value everywhere: in f-strings and str() (Enum's would be 'TrialStatus.OK'), and in
    # hashing (Enum's hashes the name), so 'ok' and TrialStatus.OK are one dict/set key.
    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__


@dataclass
class TrialResult:
    """One trial's outcome: metrics, files (bytes), history; sent back from a worker whole."""
    status: str
    stop_reason: str = ''
    epochs: int = 0
    best_epoch: int = 0
    val_metrics: dict = field(default_factory=dict)
    test_metrics: dict = field(default_factory=dict)
    onnx_bytes: int = 0
    latency_ms: float = float('nan')
    params: int = 0
    wall_s: float = 0.0
    error: str = ''
    state_dict: dict = None   # best-validation weights, on the CPU
    onnx: bytes = None        # the exported, checked ONNX file's bytes
    history: list = field(default_factory=list)   # (epoch, train_loss, val_loss, lr)
    confusion: dict = field(default_factory=dict)  # {'val': [[...]], 'test': [[...]]}
    int8: dict = None         # stage two with QUANTIZE_INT8: bytes, val and test metrics
    int8_onnx: bytes = None
    per_subject: list = field(default_factory=list)   # rows of per_subject.csv
    refit: dict = None        # REFIT: the model retrained on train + validation (see refit())
    model: object = None      # the trained model (CPU), for run_trial_job's QAT; never sent back
    node: str = ''            # where it ran ('local', or the Ray node id)
    attempts: int = 1
    resumed_at: int = 0       # the epoch its training resumed after, from a checkpoint (0: fresh)
    graph: dict = None        # deployment figures of the exported file (compress.graph_stats)
    threshold: float = 0.5    # CALIBRATE_THRESHOLD: P(class 1) > this decides class 1 (folded
                              # into the last layer's bias; 0.5 = the plain argmax)

    def selected(self, select_on):
        return self.val_metrics if select_on == 'val' else self.test_metrics
