"""A small training state (Linear, BatchNorm, AdamW, a loose tensor, plain data) for client-level tests."""
import torch
from torch import nn

WIDTH = 96  # a Linear(96, 96): 36 KiB of weight, several 4 KiB chunks per tensor


def make_state(seed=0, step=True):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.BatchNorm1d(WIDTH), nn.Linear(WIDTH, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    state = {"model": model, "optim": opt, "ema": torch.zeros(WIDTH), "meta": {"epoch": 0}}
    if step:
        train(state)
    return state


def train(state):
    state["model"](torch.randn(8, WIDTH)).pow(2).mean().backward()
    state["optim"].step()
    state["optim"].zero_grad()
    state["ema"].add_(1.0)
