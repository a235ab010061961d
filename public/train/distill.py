"""The distillation loss (DISTILL_FROM): the student's logits against the teacher's.

    loss, task = DistillLoss(criterion, 4.0, 0.5)(student_logits, y, teacher_rows)

The teacher's logits on the training segments come with the data (TrialData.teacher_logits,
public/search/teacher.py computes and caches them).
"""
import torch.nn.functional as F


class DistillLoss:
    """(1 - w) * task + w * T^2 * KL(softmax(teacher / T) || softmax(student / T)) for one
    label per segment (the KL term averaged over the batch, Hinton et al.'s T^2 scaling).
    Called with (student logits, labels, teacher logits of the same rows); returns (the loss
    to optimize, the task loss)."""

    def __init__(self, task, temperature, weight):
        self.task, self.temperature, self.weight = task, float(temperature), float(weight)

    def __call__(self, logits, y, teacher):
        task = self.task(logits, y)
        t = self.temperature
        kl = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher / t, dim=1),
                      log_target=True, reduction='batchmean')
        return (1.0 - self.weight) * task + self.weight * t * t * kl, task
