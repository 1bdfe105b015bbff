"""``pip install .`` works from anywhere: the wheel carries what runs read (the bundled engine
configs), and an installed copy dry-runs and trains a recipe given by path, outside a checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile

import pytest
from support.runs import DENSE_RECIPE, PY, REPO, TINY_DENSE, read_metrics

pytestmark = pytest.mark.distributed  # trains (one rank)


def run(args, cwd, env):
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, stdin=subprocess.DEVNULL)


def test_an_installed_wheel_dry_runs_and_trains_a_recipe_by_path(tmp_path, data_cache):
    src = tmp_path / "src"  # a copy of the tracked tree: building writes build/ and egg-info
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for f in filter(None, files):
        if os.path.islink(REPO / f) or not (REPO / f).is_file():
            continue
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"DS_ACCELERATOR": "cpu"}
    built = run([PY, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                 tmp_path / "dist", src], tmp_path, env)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("moe_merge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"moe_merge/config/ds_configs/zero2.json",
            "moe_merge/config/ds_configs/gpu_zero3.json"} <= set(names)
    site = tmp_path / "site"
    inst = run([PY, "-m", "pip", "install", "--no-deps", "-q", "--target", site, wheel],
               tmp_path, env)
    assert inst.returncode == 0, inst.stderr[-2000:]

    elsewhere = tmp_path / "elsewhere"  # no checkout here or above
    elsewhere.mkdir()
    recipe = elsewhere / "my_recipe.yaml"
    shutil.copy(DENSE_RECIPE, recipe)
    env |= {"PYTHONPATH": str(site)}
    where = run([PY, "-c", "import moe_merge.config.deepspeed as d; print(d.__file__)"],
                elsewhere, env)
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    dry = run([PY, "-m", "moe_merge.train", recipe.name, "--dry-run",
               "parallel.ds_config=ds_configs/zero2.json"], elsewhere, env)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert '"stage": 2' in dry.stdout and "# plan" in dry.stdout

    overrides = [o for o in TINY_DENSE if not o.startswith(("parallel.", "train.max_tokens"))]
    trained = run([PY, "-m", "moe_merge.train", recipe.name, *overrides,
                   "parallel.world_size=1", "parallel.micro_batch=2", "parallel.global_batch=2",
                   "schedule.warmup_tokens=128", "checkpoint.every_tokens=256",
                   "train.max_tokens=512", "logging.val_every=0", "output_dir=out",
                   f"data.cache_dir={data_cache}"], elsewhere, env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_dir = elsewhere / "out" / "dense_tiny"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "global_step4"
    assert [m["step"] for m in read_metrics(run_dir) if "train/loss" in m] == [1, 2, 3, 4]
