"""stage2_final.py's command line on small synthetic data, as a process of its own that tests can kill.

    python tests/synthetic_stage2.py N_TRAIN [stage2_final.py flags...]

Everything but the data and the threads is the real stage 2: its main(), its error handling and exit
codes. The data is conftest's learnable synthetic set (N_TRAIN training images, the fixed 5,000
validation images, 300 test images), so that an epoch takes a second or two instead of the full set's
half minute; torch uses one thread, as two workers share two cores in the tests.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import synthetic_cifar  # noqa: E402

import stage2_final  # noqa: E402
import torch  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    stage2_final.main(sys.argv[2:], ds=synthetic_cifar(n_train=int(sys.argv[1])))
