"""An exponential moving average of a model's weights (the EMA that training keeps and exports), with the
usual warm-up of its decay. TrainingState checkpoints its shadow weights; the pipeline is exported from them."""
from __future__ import annotations

import copy

import torch


class EMA:
    """Exponential moving average of parameters, with the usual warm-up: decay_t = min(decay, (1+t)/(10+t))."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if self.shadow[k].device != v.device:  # built before accelerate moved the model
                self.shadow[k] = self.shadow[k].to(v.device)
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.float(), 1 - d)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})

    def averaged(self, model: torch.nn.Module) -> torch.nn.Module:
        """A copy of `model` holding the averaged weights; `model` is left as it is."""
        average = copy.deepcopy(model)
        self.copy_to(average)
        return average
