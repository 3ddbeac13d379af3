"""The EMA teacher: theta_T <- alpha * theta_T + (1 - alpha) * theta_S, alpha = min(1 - 1/(t+1), a_max)
(method.md Stage 1 step 3), updated before the forward pass.

The official teacher runs in train mode and so keeps its own BatchNorm statistics from batch
statistics. diga-fast's teacher runs in eval mode (a documented difference), so its BN running
statistics must come from somewhere: they follow the same EMA as the parameters (integer buffers
such as ``num_batches_tracked`` are copied). Models without BatchNorm are unaffected.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(student: nn.Module, mode: str = "eval") -> nn.Module:
    """A frozen copy of ``student`` whose forward runs in ``mode``: ``eval`` (running BN statistics, no
    dropout) or ``train`` (batch statistics, dropout on: the official teacher). A train-mode teacher's
    forward never reads its running statistics, so it does not update them either (BN momentum 0): they
    stay the EMA of the student's, the same on every rank under torchrun."""
    teacher = copy.deepcopy(student)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    if mode == "train":
        for module in teacher.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = 0.0
    return teacher.train(mode == "train")


def ema_alpha(step: int, max_alpha: float = 0.999) -> float:
    return min(1.0 - 1.0 / (step + 1), max_alpha)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, step: int, max_alpha: float = 0.999) -> None:
    alpha = ema_alpha(step, max_alpha)
    teacher_tensors = list(teacher.parameters())
    student_tensors = [p.detach() for p in student.parameters()]
    for t_buf, s_buf in zip(teacher.buffers(), student.buffers()):
        if t_buf.is_floating_point():
            teacher_tensors.append(t_buf)
            student_tensors.append(s_buf)
        else:
            t_buf.copy_(s_buf)
    torch._foreach_mul_(teacher_tensors, alpha)
    torch._foreach_add_(teacher_tensors, student_tensors, alpha=1.0 - alpha)
