"""The EMA teacher: theta_T <- alpha * theta_T + (1 - alpha) * theta_S, alpha = min(1 - 1/(t+1), a_max),
parameters only (method.md Stage 1 step 3; buffers such as BN running statistics are not averaged)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(student)
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher.eval()


def ema_alpha(step: int, max_alpha: float = 0.999) -> float:
    return min(1.0 - 1.0 / (step + 1), max_alpha)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, step: int, max_alpha: float = 0.999) -> None:
    alpha = ema_alpha(step, max_alpha)
    teacher_params = list(teacher.parameters())
    student_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(teacher_params, alpha)
    torch._foreach_add_(teacher_params, student_params, alpha=1.0 - alpha)
