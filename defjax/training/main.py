r"""The training program. Exit codes (``runfiles``): 0 completed,
2 bad config or data, 3 diverged (a result: summary.json says where),
4 interrupted by SIGTERM/SIGINT after saving a checkpoint (rerun the same
command to resume)::

  python -m defjax.main --config configs/fashion_mnist.py --workdir runs/fm-def256 \
      --config.optim.method=def --config.optim.ratio=256 --config.seed=1

(``python train.py ...`` in a checkout is the same program.) Several hosts:
the same command on each, plus::

  --coordinator_address=HOST0:PORT --num_processes=N --process_id=I

On Linux the program restarts itself once with tcmalloc preloaded when the
library is installed (Debian/Ubuntu: libtcmalloc-minimal4, which ``make
install`` adds) and LD_PRELOAD is empty; DEFJAX_ALLOCATOR=system keeps the C
library's malloc.
"""

import ctypes.util
import os
import sys

if __name__ == '__main__':
  # Run by this name without the train extra: one line and exit 2, as
  # defjax-train, before the extra's imports below raise.
  from defjax import main as _entry  # pylint: disable=g-import-not-at-top

  _entry.require_train_extra('python -m defjax.training.main')

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config',
    None,
    'Python config file (configs/*.py); override any field with'
    ' --config.FIELD=VALUE.',
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Run directory (metrics, checkpoints).'
)
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0.'
)
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Number of processes.'
)
_PROCESS_ID = flags.DEFINE_integer('process_id', None, "This process's index.")
_HEARTBEAT = flags.DEFINE_integer(
    'heartbeat_timeout_seconds',
    60,
    'A process that misses heartbeats this long is declared dead and the'
    ' others exit with an error instead of hanging.',
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.set_verbosity(
      logging.WARNING
  )  # orbax logs every file it writes at INFO
  config = _CONFIG.value
  import jax  # after flag parsing; backends start on first use

  from defjax import layouts
  from defjax import xla_cpu

  xla_cpu.tolerate_slow_cpu_devices()  # before the backends start

  if _COORDINATOR.value or _NUM_PROCESSES.value:
    jax.distributed.initialize(
        _COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
        heartbeat_timeout_seconds=_HEARTBEAT.value,
    )
  elif (
      'xla_force_host_platform_device_count'
      not in os.environ.get('XLA_FLAGS', '')
      and os.environ.get('JAX_PLATFORMS', 'cpu') == 'cpu'
      and config.num_workers > 1
  ):
    # On a CPU-only machine run a real device per worker (K x M for workers
    # of M devices) so real collectives run.
    jax.config.update('jax_num_cpu_devices', layouts.devices_for(config))

  from defjax.training import checkpoint
  from defjax.training import runfiles
  from defjax.training import trainer

  workdir = _WORKDIR.value
  try:
    summary = trainer.train_and_evaluate(config, workdir)
  except (
      trainer.ConfigError,
      checkpoint.CheckpointMismatch,
      checkpoint.CheckpointError,
  ) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(runfiles.EXIT_BAD_CONFIG)
  except trainer.Diverged as e:
    print(
        f'diverged at step {e.step}: the loss or the parameters became'
        f' non-finite; summary in {workdir}/{runfiles.SUMMARY}',
        file=sys.stderr,
    )
    sys.exit(runfiles.EXIT_DIVERGED)
  except trainer.Interrupted as e:
    print(str(e), file=sys.stderr)
    sys.exit(runfiles.EXIT_INTERRUPTED)
  print(
      f'final test accuracy {100 * summary["final_test_accuracy"]:.2f}% (train loss'
      f' {summary["final_train_loss"]:.4f}) after {summary["steps"]} steps in'
      f' {summary["wall_time"]:.0f}s; summary in {workdir}/{runfiles.SUMMARY}'
  )


# XLA:CPU allocates every output and temporary buffer of a step anew. Under
# glibc's malloc a buffer over 32 MB is a fresh mmap each time, and each of
# its pages faults when first written, every step: a 15M-parameter model
# pays ~15k page faults per d-float buffer. tcmalloc keeps freed pages for
# reuse (bench/allocator.py: the faults and what they cost). Results are the
# same bits either way.
ALLOCATOR_ENV = 'DEFJAX_ALLOCATOR'
# Set in the restarted process: it never restarts again, even where the
# loader drops LD_PRELOAD (secure-execution mode).
RESTARTED_ENV = 'DEFJAX_RESTARTED_WITH'
# gperftools reports every allocation over 1 GiB on stderr; big configs'
# temporaries are that large, and it is not an error.
_QUIET_LARGE_ALLOCS = {'TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD': str(1 << 40)}


def tcmalloc_library():
  """tcmalloc's soname where it is installed (the loader resolves it for this
  interpreter's architecture), else None."""
  return ctypes.util.find_library(
      'tcmalloc_minimal'
  ) or ctypes.util.find_library('tcmalloc')


def restart_with_tcmalloc() -> None:
  """Re-executes this program (the same interpreter and command line) with
  tcmalloc in LD_PRELOAD, once, when tcmalloc is installed, the platform is
  Linux and the user has not chosen: ``DEFJAX_ALLOCATOR=system``, or any
  LD_PRELOAD already set (an allocator, a sanitizer), keep this process.
  Call it first thing in an entry point: the program starts over."""
  if (
      os.environ.get(ALLOCATOR_ENV) == 'system'
      or os.environ.get(RESTARTED_ENV)
      or os.environ.get('LD_PRELOAD')
      or not sys.platform.startswith('linux')
  ):
    return
  lib = tcmalloc_library()
  if lib:
    env = {
        **_QUIET_LARGE_ALLOCS,
        **os.environ,
        'LD_PRELOAD': lib,
        RESTARTED_ENV: lib,
    }
    sys.stdout.flush()
    sys.stderr.flush()
    # sys.executable, not the typed argv[0]: a bare 'python' could resolve
    # to another interpreter than this (virtual environment's) one.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def run():
  """Runs the program (``defjax.main.run``, the console entry point
  ``defjax-train``, calls it once the train extra is found)."""
  restart_with_tcmalloc()
  # --help lists the key flags of the main module (sys.argv[0]), which is
  # train.py, defjax/main.py or the console script, not this module: hand
  # it the flags defined here (none are found by this name when this module
  # is itself the main one, whose flags absl files under sys.argv[0]).
  for flag in flags.FLAGS.get_key_flags_for_module(__name__):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  app.run(main)


if __name__ == '__main__':
  run()
