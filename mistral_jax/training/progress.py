"""The training progress bar: tqdm over train steps whose clock starts after the first step, which compiles.

The first step of a process includes compiling the train step (seconds on CPU, minutes for a large model on a
pod). Counted as a step, it sets tqdm's first rate to about one step per compile time and its ETA to the compile
time times the steps left: a 16 s tiny run showed an ETA of 28:10. ``StepBar`` restarts the bar's clock (elapsed
time, rate, ETA) when that step ends, so they describe the steps that run at training speed.
"""

from __future__ import annotations

from tqdm import tqdm
from tqdm.std import EMA


class StepBar(tqdm):
    """``tqdm`` whose first ``update`` (the compiling step) is counted but not timed.

    Until the second step ends the ETA shows ``?``; from then on the rate and ETA come from real steps only, and
    the elapsed time leaves compilation out. Arguments are tqdm's (``total``, ``initial``, ``disable``, ...).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._timed = False  # becomes True when the first (compiling) step has ended

    def update(self, n: int = 1) -> bool | None:
        if self._timed or self.disable:
            return super().update(n)
        self._timed = True
        self.n += n
        # tqdm.reset's restart of the clock and the rate averages, keeping the count (reset would show 0 first);
        # ``initial``: the average rate counts the steps from here
        self.start_t = self.last_print_t = self._time()
        self.last_print_n = self.initial = self.n
        self._ema_dn, self._ema_dt, self._ema_miniters = (EMA(self.smoothing) for _ in range(3))
        self.refresh()
        return True
