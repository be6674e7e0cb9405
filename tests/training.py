"""Shared by the tests that need a briefly trained model."""

import torch
import torch.nn.functional as F


def train_steps(model: torch.nn.Module, loader, steps: int) -> torch.nn.Module:
    """``steps`` SGD steps (momentum 0.9, one-cycle schedule peaking at 0.1); eval mode after."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=steps)
    step = 0
    while step < steps:
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step == steps:
                break
    return model.eval()
