"""What the training loop watches and shows between steps: signals, progress."""

from __future__ import annotations

import signal

import jax


class SignalFlag:
  """Turns SIGTERM/SIGINT into a flag the loop checks between dispatches.

  The loop then saves a checkpoint and stops; outside the main thread
  (where Python cannot install handlers) signals are left alone.
  """

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    for s in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[s] = signal.signal(s, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def __exit__(self, *exc):
    for s, h in self._previous.items():
      signal.signal(s, h)


class Progress:
  """A tqdm bar with the running train loss, on process 0 only.

  tqdm prints sparse updates when the output is not a terminal (a log file).
  """

  def __init__(self, total: int, initial: int):
    self.total, self.initial = total, initial

  def __enter__(self):
    from tqdm import tqdm  # the program's dependency, not the library's

    self.bar = tqdm(
        total=self.total,
        initial=self.initial,
        unit='step',
        dynamic_ncols=True,
        mininterval=2.0,
        disable=jax.process_index() != 0,
    )
    return self

  def update(self, n: int, loss: float):
    self.bar.update(n)
    self.bar.set_postfix(loss=f'{loss:.4f}', refresh=False)

  def write(self, msg: str):
    if jax.process_index() == 0:
      self.bar.write(msg)

  def __exit__(self, *exc):
    self.bar.close()
