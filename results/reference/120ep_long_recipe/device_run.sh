#!/usr/bin/env bash
# The long-schedule recipe's 120-epoch run, trained on a lent H200 in one device call (the device tool runs it
# in the repository root, with carry [".devdata"], and brings back what lands in $OUT). .devdata holds:
# cifar10-train-jpeg.npz (the train_* arrays of ../shared/data/cifar10-jpeg.npz), rebuild_train.py (beside
# this file), Optuna's wheels (../shared/device-wheels) and this script. The test set is never there: stage 2
# trains without it, and the same command tests the best checkpoint on 2 CPU cores here afterwards.
set -uo pipefail
export PYTHONUNBUFFERED=1
start=$(date +%s)
left() { echo $(( ${1} - ($(date +%s) - start) )); }
python3 -m pip install -q --no-index --no-deps --target /tmp/site .devdata/*.whl || exit 3
export PYTHONPATH=/tmp/site
python3 .devdata/rebuild_train.py .devdata/cifar10-train-jpeg.npz /tmp/data || exit 4
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, optuna; print('torch', torch.__version__, 'optuna', optuna.__version__)"
  nproc; echo "commit $(cat .devdata/COMMIT)"; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

# The run: stage 2's defaults (at most 120 epochs, patience 15), the long recipe, bf16 autocast (--amp auto).
# --time-limit stops it after an epoch's checkpoint if the GPU is slower than hoped; the same command continues.
run=/tmp/run
timeout $(left 470) python3 stage2_final.py --config configs/long_recipe.json --data-dir /tmp/data --no-download \
  --results $run --time-limit "$(( $(left 440) ))s" 2>&1 | tee "$OUT/piece1.log"
echo "stage2_final.py exit ${PIPESTATUS[0]}" | tee -a "$OUT/piece1.log"
cp $run/stage2/config_0/last.pt $run/stage2/config_0/best.pt "$OUT/" 2>/dev/null
tar czf "$OUT/run.tgz" -C $run --exclude='*.pt' .

# The seed recipe's epochs on the same GPU, for the per-epoch time target (3 epochs; it stops at the missing test).
timeout $(left 540) python3 stage2_final.py --config configs/seed_recipe.json --data-dir /tmp/data --no-download \
  --results /tmp/seed --epochs 3 --warmup-epochs 0 2>&1 | tee "$OUT/seed_recipe_3ep.log"
echo "done in $(( $(date +%s) - start )) s"
