"""Stand-ins for run_trial in the tests of the stages under concurrency (picklable, so Ray
workers can run them): a real small model is built and really exported to ONNX, but the
score and the duration of each trial are set by the test, so that the order in which
results arrive is known. Each call is recorded as a file in `calls_dir`."""
import os
import signal
import time

from public.compress.export import export_onnx
from public.train.outcome import TrialResult, TrialStatus


class ScriptedTrainer:
    def __init__(self, calls_dir, scores, delays=None, default=0.9, kill=(), after=None):
        """after: {trial: other trial}: `trial` starts its delay only once `other` has
        trained (a marker file), so an order of finishing holds on a loaded machine too."""
        self.calls_dir, self.scores, self.delays = str(calls_dir), scores, delays or {}
        self.default, self.kill, self.after = default, set(kill), after or {}

    def __call__(self, build_model, lr, data, settings, onnx_path, progress=True, desc='', **kw):
        with open(os.path.join(self.calls_dir, f"{desc}.{os.getpid()}.{time.time_ns()}"), 'w'):
            pass
        if desc in self.kill:                          # the worker process dies mid-trial
            os.kill(os.getpid(), signal.SIGKILL)
        if desc in self.after:
            marker = os.path.join(self.calls_dir, '..', f"{self.after[desc]}.trained")
            deadline = time.monotonic() + 120
            while not os.path.exists(marker) and time.monotonic() < deadline:
                time.sleep(0.05)
        time.sleep(self.delays.get(desc, 0.0))
        model = build_model()
        v = self.scores.get(desc, self.default)
        metrics = dict(f1=v, accuracy=v, precision=v, recall=v)
        onnx_bytes = export_onnx(model, onnx_path, data.in_channels, data.input_size,
                                 settings.ONNX_OPSET)
        with open(os.path.join(self.calls_dir, '..', f"{desc}.trained"), 'w'):
            pass
        return TrialResult(status=TrialStatus.OK, stop_reason='max-epochs', epochs=1, best_epoch=1,
                           val_metrics=metrics, test_metrics=dict(metrics),
                           onnx_bytes=onnx_bytes,
                           latency_ms=0.1, params=sum(p.numel() for p in model.parameters()),
                           state_dict=model.state_dict())

    def calls(self):
        """Trial keys in the order they started."""
        entries = sorted(os.listdir(self.calls_dir), key=lambda n: int(n.rsplit('.', 1)[1]))
        return [n.rsplit('.', 2)[0] for n in entries]
