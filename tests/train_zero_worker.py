"""Run several trainings in one 2-rank process group (one launch, many engines): used by test_train_zero.py.

    torchrun --nproc_per_node 2 tests/train_zero_worker.py runs.json

runs.json holds a list of RunArgs keyword dicts; each run writes its own output_dir.
"""

import json
import sys

from meft_ds.training import RunArgs, train
from meft_ds.training.distributed import shutdown

if __name__ == "__main__":
    for kwargs in json.loads(open(sys.argv[1]).read()):
        train(RunArgs(**kwargs))
    shutdown()
