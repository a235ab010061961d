"""avoid.txt: the learning rates stage one does not train, and the +-2*STEP rule.

    candidates = learning_rate_candidates(0.0015, 0.0050, 0.0005)   # exactly 8 values
    avoid = AvoidList('avoid.txt', step=0.0005)
    avoid.pruned_by(0.0025, 'AFNet', key)   # the entry within 2*STEP that prunes it, or None

One learning rate per line, optionally followed by a model name; `#` starts a comment. A
line a user writes (a bare number, or `<lr> <Model>`) always applies: a bare number to
every model, a named one to that model. The search appends its own lines as
`<lr> <Model>  # atml:<settings key> <why>`: they apply only to searches with the same
trial settings, and RESUME=False removes only them.
"""
import difflib
import math
import os
import re
from decimal import Decimal

from public.core.atomic import durable, write_atomic
from public.core.errors import AvoidFileError

_MODEL_NAME = re.compile(r'^[A-Za-z_][A-Za-z0-9_.]*$')
_TAG = re.compile(r'#\s*atml:([0-9a-f]{10})\b')


def learning_rate_candidates(lr_min, lr_max, step):
    """LR_MIN, LR_MIN+STEP, ... up to LR_MAX inclusive, in decimal arithmetic (no drift)."""
    lo, hi, st = (Decimal(repr(float(v))) for v in (lr_min, lr_max, step))
    if st <= 0:
        raise ValueError(f"STEP must be > 0, got STEP={step!r}")
    if lo > hi:
        raise ValueError(f"LR_MIN must be <= LR_MAX, got LR_MIN={lr_min!r}, LR_MAX={lr_max!r}")
    count = int((hi - lo) / st)
    return [float(lo + i * st) for i in range(count + 1)]


class AvoidList:
    """The pruned learning rates of avoid.txt and the +-2*STEP neighbourhood rule."""

    RULE = "'<learning rate> [<ModelName>] [# comment]', e.g. '0.0025' or '0.0025 AFNet'"

    def __init__(self, path, step):
        self.path = path
        self.step = step
        self.entries = []      # (lr, model or None for every model, line number, atml key or None)
        self.reload()

    def reload(self):
        self.entries = []
        if os.path.isdir(self.path):
            raise AvoidFileError(f"AVOID_FILE_PATH={self.path!r} is a folder; it must name a "
                                 f"text file (created when missing)")
        if not os.path.exists(self.path):
            return
        with open(self.path, errors='replace') as f:
            for number, line in enumerate(f, start=1):
                text, _, comment = line.partition('#')
                text = text.strip()
                if not text:
                    continue
                tokens = text.split()
                try:
                    lr = float(tokens[0])
                except ValueError:
                    lr = None
                if (lr is None or not math.isfinite(lr) or lr <= 0 or len(tokens) > 2
                        or (len(tokens) == 2 and not _MODEL_NAME.match(tokens[1]))):
                    raise AvoidFileError(f"{self.path}: line {number}: {line.strip()!r} is not "
                                         f"a valid entry; expected {self.RULE} with a "
                                         f"learning rate > 0")
                tag = _TAG.search('#' + comment) if comment else None
                self.entries.append((lr, tokens[1] if len(tokens) == 2 else None, number,
                                     tag.group(1) if tag else None))

    def pruned_by(self, lr, model, key=None):
        """The (lr, model) entry within 2*STEP of lr that applies to model, or None. Lines the
        search wrote under other trial settings (another key) do not apply."""
        reach = 2 * self.step * (1 + 1e-9)
        for entry_lr, entry_model, _, tag in self.entries:
            if (entry_model in (None, model) and tag in (None, key)
                    and abs(lr - entry_lr) <= reach):
                return entry_lr, entry_model
        return None

    def contains(self, lr, model, key=None):
        return any(m == model and tag in (None, key) and math.isclose(e, lr, rel_tol=1e-9)
                   for e, m, _, tag in self.entries)

    def add(self, lr, model, note='', key=None):
        """Append the search's own entry (tagged with its settings key) on a line of its own."""
        if os.path.exists(self.path) and os.path.getsize(self.path):
            with open(self.path, 'rb') as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b'\n'
            if needs_newline:
                with open(self.path, 'a') as f:
                    f.write('\n')
        comment = ' '.join(p for p in (f"atml:{key}" if key else '', note) if p)
        size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        try:
            with open(self.path, 'a') as f:
                f.write(f"{lr!r} {model}" + (f"  # {comment}" if comment else '') + '\n')
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            with open(self.path, 'a') as f:      # no half line: the next run would refuse it
                f.truncate(size)
            raise
        durable('avoid.txt line')
        self.entries.append((lr, model, None, key))

    def remove_search_lines(self):
        """Drop the lines the search wrote (tagged `# atml:`), keep the user's; for RESUME=False."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        keep = [ln for ln in lines if not _TAG.search(ln)]
        if keep != lines:
            write_atomic(self.path, ''.join(keep))
        self.reload()

    def unknown_models(self, known):
        """Lines naming a model that is not registered: (line number, name, closest name)."""
        out = []
        for _, model, number, _ in self.entries:
            if model and model not in known:
                close = difflib.get_close_matches(model, list(known), n=1)
                out.append((number, model, close[0] if close else None))
        return out
