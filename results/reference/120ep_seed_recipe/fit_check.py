"""The shipped model on its own 45,000 training images, unaugmented, and on the 5,000 validation images.

    PYTHONPATH=. python results/reference/120ep_seed_recipe/fit_check.py    # from the repository root

Evidence for docs/recipe.md (how far the model fits what it trained on), not part of the pipeline;
it uses no test image.
"""
import torch
from data import load_cifar10, train_val_splits, DeviceLoader
from checkpoint import load_checkpoint
from evaluate import model_from_checkpoint
from train import eval_batch_size, evaluate

ds = load_cifar10("../shared/data", download=False)
s = train_val_splits(ds, seed=0)
cpu = torch.device("cpu")
model = model_from_checkpoint(load_checkpoint("results/reference/120ep_seed_recipe/model.pt"), cpu)
for name, x, y in (("train (clean)", s.train_images, s.train_labels), ("val", s.val_images, s.val_labels)):
    r = evaluate(model, DeviceLoader(x, y, eval_batch_size(cpu), train=False))
    print(f"{name}: {len(y)} images, accuracy {100 * r['acc']:.2f} %, loss {r['loss']:.4f}")
