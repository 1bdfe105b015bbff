"""The live PMA monitor: its window, its scalars, that it leaves training untouched, and that its
in-process merge equals `moe-merge merge` + `moe-merge eval` of the same checkpoints."""

from __future__ import annotations

import pytest
from support.runs import read_metrics, train_losses

from moe_merge.training.pma_monitor import PMA_SCALARS


@pytest.mark.distributed
@pytest.mark.parametrize("zero", [2, 3])  # ZeRO-3: each rank merges its own partitions
def test_monitor_logs_the_merged_loss_and_leaves_training_untouched(trained, tmp_path, zero):
    from support.runs import tb_tags

    from moe_merge.evals.loss import evaluate
    from moe_merge.merge.merger import merge
    from moe_merge.merge.selection import Selection

    run, plain = trained(f"moe_pma_z{zero}"), trained(f"moe_z{zero}")
    assert train_losses(run) == train_losses(plain)  # bit for bit: the weights are restored
    metrics = read_metrics(run)
    pma = {m["step"]: m for m in metrics if "pma/val_loss" in m}
    assert sorted(pma) == [6, 8]  # checkpoints 2, 4, 6, 8; full windows of 3 from step 6
    assert pma[8]["pma/n"] == 3 and pma[8]["pma/first_step"] == 4
    val8 = next(m["val/loss"] for m in metrics if m["step"] == 8 and "val/loss" in m)
    assert pma[8]["pma/val_gap"] == pytest.approx(val8 - pma[8]["pma/val_loss"], abs=1e-12)
    assert "pma/val_gap" not in pma[6]  # no validation at step 6 (val_every=4)
    scalars, _ = tb_tags(run / "tb")
    assert set(PMA_SCALARS) <= scalars, set(PMA_SCALARS) - scalars
    for step in (6, 8):  # the offline merge of the same checkpoints, evaluated on the same batches
        out = tmp_path / f"merged{step}"
        merge([run], out, Selection(tags=[f"global_step{s}" for s in (step - 4, step - 2, step)]),
              progress=False)
        assert evaluate(out)["loss"] == pytest.approx(pma[step]["pma/val_loss"], rel=1e-5)
