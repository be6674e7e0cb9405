"""Suite-wide settings.

torch runs single-threaded: the suite's torch work is many small ops, and on two cores shared
with TVM's own thread pool, two torch threads made small convolutions ~10x slower.
"""

import torch

torch.set_num_threads(1)
