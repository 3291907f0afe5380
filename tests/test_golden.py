"""Golden histories: each config trains to the recorded figures (the structure and the speed
work must not change what is computed; a numerical fix must update tests/golden/ on purpose).

Recorded on this project's 2-core Intel VM with ``scripts/train.py --config configs/<model>.py
--config.num_epochs=2``; re-running there reproduces them bit for bit. Another CPU may round
differently in the last bits, and 118 Adam steps carry that into the fifth digit, hence the
tolerance: an epoch-1 loss moves by far more under any real change (the max-pool tie fix moves
cnn_pool's by ~1%).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from flax_mnist import config as config_lib
from flax_mnist import train

GOLDEN = json.loads((Path(__file__).parent / "golden" / "histories.json").read_text())


@pytest.mark.integration
@pytest.mark.parametrize("model", sorted(GOLDEN["models"]))
def test_each_config_trains_its_golden_first_epoch(model, real_data_dir, tmp_path):
  config = config_lib.load_config_file(REPO_ROOT / "configs" / f"{model}.py")
  config.update(num_epochs=1, progress_bar=False, data_dir=str(real_data_dir))
  [record] = train.train_and_evaluate(config, tmp_path, print_fn=None)
  [golden] = GOLDEN["models"][model][:1]
  for key in ("train_loss", "val_loss"):
    assert record[key] == pytest.approx(golden[key], rel=2e-4), key
  for key in ("train_accuracy", "val_accuracy"):
    assert record[key] == pytest.approx(golden[key], abs=5e-4), key
