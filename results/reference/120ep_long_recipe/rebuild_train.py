"""Rebuild the 50,000 CIFAR-10 training images (data_batch_1..5, batches.meta) from a JPEG npz that holds
the train_* arrays of ../shared/data/cifar10-jpeg.npz only, on the GPU machine that trained this run.

The test images never went there: the 64 MiB a device call carries holds the training JPEGs (45.5 MiB),
Optuna's wheels and the tree, not the test JPEGs too. Stage 2 trains without test_batch and the same
command, run here with the full data, tested the model. Decodes exactly as shared/tools/cifar10_from_jpeg.py.

    python3 rebuild_train.py NPZ OUT   # -> OUT/cifar-10-batches-py/
"""
import io
import os
import pickle
import sys

import numpy as np
from PIL import Image

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

npz, out = sys.argv[1], os.path.join(sys.argv[2], "cifar-10-batches-py")
z = np.load(npz)
raw, off, labels = z["train_jpeg"], z["train_offsets"], z["train_labels"]
data = np.stack([np.asarray(Image.open(io.BytesIO(raw[off[i]:off[i + 1]].tobytes())).convert("RGB"), dtype=np.uint8)
                 .transpose(2, 0, 1).reshape(-1) for i in range(len(labels))])
os.makedirs(out, exist_ok=True)
for k in range(5):
    s = slice(k * 10000, (k + 1) * 10000)
    with open(os.path.join(out, f"data_batch_{k + 1}"), "wb") as f:
        pickle.dump({"labels": [int(v) for v in labels[s]], "data": np.ascontiguousarray(data[s])}, f, protocol=4)
with open(os.path.join(out, "batches.meta"), "wb") as f:
    pickle.dump({"label_names": CLASSES}, f, protocol=4)
print(f"wrote {out}: {len(labels)} training images")
