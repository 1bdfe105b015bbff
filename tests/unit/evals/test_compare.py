"""moe-merge compare: the table and gain from given losses, the window, the plot (no launches)."""

from __future__ import annotations

import json
import struct

import pytest

from moe_merge.errors import MergeError
from moe_merge.evals.compare import (
    merged_window,
    plot,
    read_manifest,
    render,
    strategy_label,
    summarize,
)

TOKENS_PER_STEP = 1024


def _checkpoints(losses: list[float], every: int = 20) -> list[dict]:
    return [{"tag": f"global_step{every * i}", "step": every * i,
             "tokens": every * i * TOKENS_PER_STEP, "loss": loss}
            for i, loss in enumerate(losses, 1)]


def _manifest(steps: list[int], strategy: str = "sma", alpha: float | None = None) -> dict:
    w = [1 / len(steps)] * len(steps)
    return {"strategy": strategy, "alpha": alpha, "weights": w,
            "inputs": [{"path": f"run/checkpoints/global_step{s}", "tag": f"global_step{s}",
                        "step": s, "tokens": s * TOKENS_PER_STEP, "weight": wi}
                       for s, wi in zip(steps, w)]}


def _result(checkpoints: list[dict], steps: list[int], merged_loss: float) -> dict:
    window = merged_window(_manifest(steps), checkpoints, "run")
    latest = checkpoints[-1]
    merged = {"path": "run/merged/sma", "label": strategy_label("sma", None, len(window)),
              "inputs": window, "tokens": window[-1]["tokens"], "loss": merged_loss}
    return {"recipe": "run/recipe.yaml", "windows": 64, "tokens_scored": 16320,
            "checkpoints": checkpoints, "latest": latest, "merged": merged,
            "gain": summarize(latest, merged)["gain"]}


def test_gain_is_latest_minus_merged():
    s = summarize({"loss": 5.7364}, {"loss": 5.6660})
    assert s["latest"] == 5.7364 and s["merged"] == 5.6660
    assert s["gain"] == pytest.approx(0.0704, abs=1e-12)
    assert summarize({"loss": 5.0}, {"loss": 5.25})["gain"] == pytest.approx(-0.25)


def test_table_shows_latest_merged_and_signed_gain():
    ckpts = _checkpoints([8.0, 7.0, 6.5, 6.3, 6.2, 6.25])
    res = _result(ckpts, [80, 100, 120], 6.1)
    text = render(res)
    lines = text.splitlines()
    latest = next(ln for ln in lines if ln.lstrip().startswith("latest checkpoint"))
    merged = next(ln for ln in lines if ln.lstrip().startswith("merged"))
    gain = next(ln for ln in lines if ln.lstrip().startswith("gain"))
    assert "global_step120" in latest and "122,880" in latest and latest.endswith("6.2500")
    assert "SMA of 3" in merged and "global_step80..120" in merged and merged.endswith("6.1000")
    assert gain.endswith("+0.1500")
    assert "64 fixed windows" in lines[0] and "16,320 tokens" in lines[0]
    assert "note:" not in text
    worse = render(_result(ckpts, [80, 100, 120], 6.3))
    assert worse.splitlines()[-1].endswith("-0.0500")


def test_table_notes_a_merge_that_ends_before_the_latest():
    ckpts = _checkpoints([8.0, 7.0, 6.5, 6.3])
    text = render(_result(ckpts, [40, 60], 6.4))
    assert "note: the merge ends at global_step60, before the latest checkpoint" in text


def test_window_is_the_merge_inputs_with_their_weights():
    ckpts = _checkpoints([8.0, 7.0, 6.5, 6.3, 6.2])
    window = merged_window(_manifest([100, 60, 80]), ckpts, "run")
    assert [c["step"] for c in window] == [60, 80, 100]
    assert [c["loss"] for c in window] == [6.5, 6.3, 6.2]
    assert all(c["weight"] == pytest.approx(1 / 3) for c in window)


def test_window_refuses_a_merge_of_another_run():
    with pytest.raises(MergeError, match="not a checkpoint of run.*step 140"):
        merged_window(_manifest([120, 140]), _checkpoints([8.0, 7.0, 6.5, 6.3, 6.2, 6.1]), "run")


@pytest.mark.parametrize("strategy,alpha,n,label", [
    ("sma", None, 4, "SMA of 4"), ("wma", None, 6, "WMA of 6"), ("ema", 0.2, 5, "EMA α=0.2 of 5"),
    ("weights", None, 3, "weights of 3")])
def test_strategy_label(strategy, alpha, n, label):
    assert strategy_label(strategy, alpha, n) == label


def test_manifest_is_required_and_checked(tmp_path):
    with pytest.raises(MergeError, match="no merge_manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "merge_manifest.json").write_text('{"inputs": []}')
    with pytest.raises(MergeError, match="not a readable merge manifest"):
        read_manifest(tmp_path)
    (tmp_path / "merge_manifest.json").write_text(json.dumps(_manifest([20, 40])))
    assert [i["step"] for i in read_manifest(tmp_path)["inputs"]] == [20, 40]


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png_of_every_checkpoint_and_the_merge(tmp_path):
    ckpts = _checkpoints([8.0, 7.0, 6.5, 6.3, 6.2, 6.25, 6.22, 6.24])
    res = _result(ckpts, [120, 140, 160], 6.1)
    out = plot(ckpts, res["merged"], tmp_path / "sub" / "cmp.png")
    assert out == tmp_path / "sub" / "cmp.png"
    w, h = _png_size(out)
    assert (w, h) == (1210, 473)  # 11 x 4.3 inches at 110 dpi


def test_plot_without_points_is_refused(tmp_path):
    res = _result(_checkpoints([8.0, 7.0]), [20, 40], 6.9)
    with pytest.raises(MergeError, match="no checkpoint losses"):
        plot([], res["merged"], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
