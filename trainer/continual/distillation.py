"""Learning without forgetting (LwF) and knowledge distillation: the student trains on its labels and on a
frozen teacher's softened predictions (classify's --teacher_model_name_or_path; the teacher is usually the model
of the previous task, so the new task does not overwrite what it predicted)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.errors import require
from trainer.tracking.console import logger


@dataclass(frozen=True)
class SharedLabels:
    """The labels a student and its teacher both have (matched by name): their class ids in each model's logits,
    in the student's label order. Used when the two label sets differ (a new task with other labels)."""

    student: list[int]
    teacher: list[int]


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, alpha: float, shared: SharedLabels | None = None) -> torch.Tensor:
    """Per-sample loss: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy(student, labels).

    T^2 keeps the soft term's gradient scale independent of the temperature (Hinton et al., 2015). Per sample,
    not averaged, because the engine sums losses and divides by the number of samples in the whole step.
    With `shared` (label sets that differ), the KL compares the models on the shared labels only: each model's
    logits of those classes go through their own softmax, so both distributions are renormalised over the shared
    classes; a class only one model has takes no part in it. The hard term stays over all the student's classes.
    """
    soft_student, soft_teacher = student_logits, teacher_logits
    if shared is not None:
        soft_student, soft_teacher = student_logits[:, shared.student], teacher_logits[:, shared.teacher]
    student = F.log_softmax(soft_student / temperature, dim=-1)
    teacher = F.log_softmax(soft_teacher / temperature, dim=-1)
    soft = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1) * temperature ** 2
    hard = F.cross_entropy(student_logits, labels, reduction="none")
    return alpha * soft + (1 - alpha) * hard


def load_teacher(path: str, id2label: dict, device, dtype="auto"):
    """(the teacher in `dtype` (--torch_dtype, as models.loading.weights_dtype gives it), frozen in eval mode; the
    labels it shares with the student, or None when its labels are the student's, in the same order). Label sets
    that differ are distilled on their shared labels (by name); fewer than two shared labels leave nothing to
    distil and are refused. A teacher is never trained, so bfloat16/float16 weights need no master copy."""
    from transformers import AutoModelForSequenceClassification

    from trainer.models.loading import pretrained_model

    teacher, _ = pretrained_model(AutoModelForSequenceClassification, path, "--teacher_model_name_or_path", dtype)
    teacher_labels = {int(i): str(label) for i, label in teacher.config.id2label.items()}
    shared = None if teacher_labels == id2label else shared_labels(path, teacher_labels, id2label)
    logger.info("distilling from teacher %s (%s parameters)", path, f"{sum(p.numel() for p in teacher.parameters()):,}")
    return teacher.eval().requires_grad_(False).to(device), shared


def shared_labels(path: str, teacher_labels: dict, id2label: dict) -> SharedLabels:
    """The labels (by name) of the student's `id2label` that the teacher's also has; at least two."""
    teacher_ids = {label: i for i, label in teacher_labels.items()}
    pairs = [(i, teacher_ids[label]) for i, label in sorted(id2label.items()) if label in teacher_ids]
    require(len(pairs) >= 2,
            f"--teacher {path} predicts the labels {label_names(teacher_labels)}, the training data has "
            f"{label_names(id2label)}: {len(pairs)} label(s) in common; distillation needs a teacher that shares at "
            f"least two labels (by name) with the training data")
    logger.info("the teacher's labels differ from the training data's: distilling on the %d shared labels (%s) "
                "only; student labels without a teacher counterpart: %s", len(pairs),
                ", ".join(id2label[i] for i, _ in pairs),
                ", ".join(id2label[i] for i in sorted(id2label) if id2label[i] not in teacher_ids) or "none")
    return SharedLabels([i for i, _ in pairs], [j for _, j in pairs])


def label_names(id2label: dict) -> str:
    return ", ".join(id2label[i] for i in sorted(id2label))
