"""Recipe validation: every problem is one line naming the file and the key, exit code 2."""

from __future__ import annotations

from support.runs import REPO, run_cli

TINY = REPO / "tests" / "recipes" / "moe_tiny.yaml"


def test_launcher_wrapper_validates_before_launching(tmp_path):
    proc = run_cli(["bash", str(REPO / "launch" / "train.sh"), str(TINY),
                    f"output_dir={tmp_path}", "model.arch=gpt5"])
    assert proc.returncode == 2
    assert "model.arch" in proc.stderr
    assert "deepspeed.launcher" not in proc.stdout + proc.stderr  # no rank was started


