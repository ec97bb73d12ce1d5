"""One racer of Optuna's schema race: open the same fresh storages as the other racers, all at once.

    python tests/storage_racer.py GATE URL...

For each URL i in turn: touch GATE.i.<pid> (I am here), wait for a shared lock on GATE.i (the test
holds it exclusively and releases it once every racer is waiting), then create the study in it.
"""

import fcntl
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import stage1_search  # noqa: E402
from storage import open_storage  # noqa: E402

if __name__ == "__main__":
    gate, urls = sys.argv[1], sys.argv[2:]
    for i, url in enumerate(urls):
        open(f"{gate}.{i}.{os.getpid()}", "w").close()
        with open(f"{gate}.{i}") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
        stage1_search.open_study(open_storage(url, heartbeat=5), url, "vit-cifar10", seed=0)
