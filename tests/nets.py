"""Stand-in 'networks' for tests of the code around a network (no learning in them)."""
import torch


class Fixed(torch.nn.Module):
    """Returns a given tensor whatever its input."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, t):
        return self.out


class TimeRecorder(torch.nn.Module):
    """Returns a fixed function of x (0.5 x) and records the time input it was given."""

    def __init__(self):
        super().__init__()
        self.times = []

    def forward(self, x, t):
        self.times.append(t.double().clone())
        return 0.5 * x
