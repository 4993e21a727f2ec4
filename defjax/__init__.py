"""defjax: RBGS with detached error feedback (DEF, DEF-A) as optax transformations.

The public API. The documentation (docs/) has a tour; ``defjax.feedback`` states each
method's recursion (paper Algorithm 1).
"""

from defjax.compress import Compressor
from defjax.compress import SplitAxis
from defjax.compress import dense_warmup
from defjax.compress import identity
from defjax.compress import randomk
from defjax.compress import rbgs
from defjax.compress import scaled
from defjax.compress import topk
from defjax.feedback import DataParallelState
from defjax.feedback import EF21State
from defjax.feedback import ErrorFeedbackState
from defjax.feedback import averaged_params
from defjax.feedback import data_parallel
from defjax.feedback import ef21
from defjax.feedback import error_feedback
from defjax.feedback import eval_point
from defjax.feedback import psync

__version__ = '0.1.0'  # the package's one version: pyproject reads it

__all__ = [
    'Compressor',
    'DataParallelState',
    'EF21State',
    'ErrorFeedbackState',
    'SplitAxis',
    'averaged_params',
    'data_parallel',
    'dense_warmup',
    'ef21',
    'error_feedback',
    'eval_point',
    'identity',
    'psync',
    'randomk',
    'rbgs',
    'scaled',
    'topk',
]
