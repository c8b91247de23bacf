"""`dinokernels curate` end to end on folders with planted copies (conftest.planted_folders), through the command
line and a checkpoint file the package loads like any released one (conftest.thumbnail_checkpoint): exactly the
planted copies are removed, eval copies too, the curated images retrieve their planted neighbours, unreadable files
are reported, the calibrated threshold is printed; a run interrupted or SIGKILLed and started again writes the same
manifest; the torch fallback gives the same manifest as faiss; bad arguments exit with code 2."""
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from dinokernels.cli import main


def _args(root, ckpt, out, *extra):
    return ["curate", "--pool", os.path.join(root, "pool"), "--curated", os.path.join(root, "curated"),
            "--eval", os.path.join(root, "eval"), "--checkpoint", ckpt, "--out", out, "--feature", "patch_mean",
            "--image-size", "16", "--per-image", "1", "--no-progress", *extra]


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's usage errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


def _manifest(out):
    with open(os.path.join(out, "manifest.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def full_run(planted_folders, thumbnail_checkpoint, tmp_path_factory):
    root, expect = planted_folders
    out = str(tmp_path_factory.mktemp("curate") / "out")
    code, stdout, stderr = _run(_args(root, thumbnail_checkpoint, out))
    assert code == 0, stderr
    return root, expect, out, stdout, stderr


def test_planted_copies_removed_and_nothing_else(full_run):
    root, expect, out, stdout, _ = full_run
    records = {r["path"]: r for r in _manifest(out)}
    pool_files = sorted(os.listdir(os.path.join(root, "pool")))
    assert sorted(records) == pool_files  # one line per pool file, sorted
    duplicates = {p: r["reason"] for p, r in records.items() if r["reason"].startswith("duplicate of ")}
    assert duplicates == {copy: f"duplicate of {original}" for copy, original in expect["duplicates"].items()}
    eval_copies = {p: r["reason"] for p, r in records.items() if r["reason"].startswith("copy of eval ")}
    assert eval_copies == {copy: f"copy of eval {e}" for copy, e in expect["eval_copies"].items()}
    for copy, original in expect["duplicates"].items():
        assert records[copy]["component"] == records[original]["component"]
        assert records[copy]["kept"] is False and records[copy]["similarity"] > 0.5
    others = set(records) - set(expect["duplicates"]) - set(expect["eval_copies"]) - set(expect["unreadable"])
    assert all(records[p]["reason"] in ("retrieved", "not retrieved") for p in others)


def test_retrieval_returns_the_planted_neighbours(full_run):
    _, expect, out, _, _ = full_run
    retrieved = {r["query"]: r["path"] for r in _manifest(out) if r["reason"] == "retrieved"}
    assert retrieved == expect["retrieved"]  # --per-image 1: exactly the planted neighbour of each
    assert all(r["kept"] == (r["reason"] == "retrieved") for r in _manifest(out))


def test_unreadable_files_reported_not_fatal(full_run):
    _, expect, out, stdout, _ = full_run
    records = {r["path"]: r for r in _manifest(out)}
    for name in expect["unreadable"]:
        assert records[name]["reason"].startswith("unreadable: ") and records[name]["kept"] is False
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["counts"]["pool_unreadable"] == len(expect["unreadable"])
    assert sorted(u["path"] for u in summary["unreadable"]["pool"]) == expect["unreadable"]
    assert f"{len(expect['unreadable'])} unreadable" in stdout


def test_summary_threshold_and_figure(full_run):
    _, expect, out, stdout, _ = full_run
    summary = json.load(open(os.path.join(out, "summary.json")))
    cal = summary["calibration"]
    assert summary["threshold_source"] == "calibrated" and cal["separated"]
    assert cal["distinct_high"] < summary["threshold"] < cal["copy_low"]
    assert set(cal["copy_median_by_kind"]) == {"resize", "jpeg", "crop", "jitter", "combined"}
    assert f"threshold used: {summary['threshold']:.4f} (calibrated)" in stdout
    c = summary["counts"]
    assert c["duplicates_removed"] == len(expect["duplicates"]) and c["eval_copies_removed"] == 2
    assert c["retrieved"] == c["kept"] == 2
    from PIL import Image

    with Image.open(os.path.join(out, "examples.png")) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200


def test_threshold_flag_overrides(full_run, thumbnail_checkpoint, tmp_path):
    root, expect, out, _, _ = full_run
    shutil.copytree(os.path.join(out, "embeddings"), tmp_path / "o" / "embeddings")  # shards reused: fast
    code, stdout, _ = _run(_args(root, thumbnail_checkpoint, str(tmp_path / "o"), "--threshold", "0.9999"))
    assert code == 0
    assert "threshold used: 0.9999 (--threshold)" in stdout
    removed = {r["path"] for r in _manifest(str(tmp_path / "o")) if r["reason"].startswith("duplicate of")}
    assert removed and removed < set(expect["duplicates"])  # only the closest copies at 0.9999
    assert not (tmp_path / "o" / "calibration").exists()


def test_torch_fallback_gives_the_same_manifest(full_run, thumbnail_checkpoint, tmp_path, monkeypatch):
    root, _, out, _, _ = full_run
    shutil.copytree(os.path.join(out, "embeddings"), tmp_path / "o" / "embeddings")
    monkeypatch.setenv("DINOKERNELS_CURATION_BACKEND", "torch")
    code, _, err = _run(_args(root, thumbnail_checkpoint, str(tmp_path / "o")))
    assert code == 0, err
    assert json.load(open(tmp_path / "o" / "summary.json"))["dedup"]["search"]["backend"] == "torch"
    ours, theirs = _manifest(str(tmp_path / "o")), _manifest(out)
    assert [{**r, "similarity": None} for r in ours] == [{**r, "similarity": None} for r in theirs]
    for a, b in zip(ours, theirs):
        assert a["similarity"] == pytest.approx(b["similarity"], abs=1e-5)


def test_clusters_mode(full_run, thumbnail_checkpoint, tmp_path):
    root, expect, out, _, _ = full_run
    shutil.copytree(os.path.join(out, "embeddings"), tmp_path / "o" / "embeddings")
    argv = _args(root, thumbnail_checkpoint, str(tmp_path / "o"), "--clusters", "3")
    argv[argv.index("--per-image") + 1] = "2"
    code, stdout, err = _run(argv)
    assert code == 0, err
    records = _manifest(str(tmp_path / "o"))
    assert all(r["cluster"] is not None for r in records if not r["reason"].startswith("unreadable"))
    retrieved = [r for r in records if r["reason"] == "retrieved"]
    assert 2 <= len(retrieved) <= 4 and "k-means clusters" in stdout
    assert set(expect["retrieved"].values()) <= {r["path"] for r in retrieved}  # nearest of their clusters


def test_interrupted_run_resumes_to_the_same_manifest(full_run, thumbnail_checkpoint, tmp_path):
    from dinokernels.cli import build_parser
    from dinokernels.cli_curate import _config
    from dinokernels.curation.pipeline import curate

    root, _, out, _, _ = full_run
    args = build_parser().parse_args(_args(root, thumbnail_checkpoint, str(tmp_path / "o"), "--shard-size", "4",
                                           "--batch-size", "2"))
    config = _config(args)

    def stop(name, batches):
        if name == "calibration" and batches == 3:  # pool and curated done, calibration half-way
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        curate(config, log=lambda m: None, on_batch=stop)
    assert not (tmp_path / "o" / "manifest.jsonl").exists()
    lines = []
    curate(config, log=lines.append)
    assert any(line.startswith("pool:") and "from an earlier run" in line for line in lines)
    assert any(line.startswith("calibration:") and "from an earlier run" in line for line in lines)
    assert _manifest(str(tmp_path / "o")) == _manifest(out)


def test_sigkilled_run_resumes_to_the_same_manifest(full_run, thumbnail_checkpoint, tmp_path):
    root, _, out, _, _ = full_run
    o = str(tmp_path / "o")
    argv = [sys.executable, "-m", "dinokernels"] + _args(root, thumbnail_checkpoint, o, "--shard-size", "2",
                                                         "--batch-size", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = os.path.join(o, "embeddings", "pool", "manifest.jsonl")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(marker) and os.path.getsize(marker) > 0:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(o, "manifest.jsonl"))
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "from an earlier run" in done.stderr
    assert _manifest(o) == _manifest(out)


def test_dry_run_counts_only(planted_folders, thumbnail_checkpoint, tmp_path):
    root, _ = planted_folders
    code, stdout, _ = _run(_args(root, thumbnail_checkpoint, str(tmp_path / "o"), "--dry-run"))
    assert code == 0
    pool_files = len(os.listdir(os.path.join(root, "pool")))
    assert f"dry run: image files: pool {pool_files}, curated 2, eval 3" in stdout
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change, message", [
    (("--pool", "missing"), "--pool 'missing': no such folder"),
    (("--checkpoint", "missing.pth"), "--checkpoint 'missing.pth': no such file"),
    (("--checkpoint", "NOT_A_CHECKPOINT"), "--checkpoint: checkpoint"),
    (("--out", "INSIDE_POOL"), "is inside --pool"),
    (("--threshold", "1.5"), "argument --threshold: 1.5 is out of range"),
    (("--per-image", "0"), "--per-image"),
    (("--image-size", "20"), "--image-size 20 is not a multiple of the model's patch size 16"),
    (("--curated", "EMPTY"), "holds no image files"),
])
def test_bad_arguments_exit_2(planted_folders, thumbnail_checkpoint, tmp_path, change, message):
    root, _ = planted_folders
    argv = _args(root, thumbnail_checkpoint, str(tmp_path / "o"))
    flag, value = change
    if value == "NOT_A_CHECKPOINT":
        value = str(tmp_path / "notes.pth")
        open(value, "w").write("not a checkpoint")
    elif value == "INSIDE_POOL":
        value = os.path.join(root, "pool", "out")
    elif value == "EMPTY":
        value = str(tmp_path / "empty")
        os.makedirs(value)
    elif value == "missing":
        value = "missing"
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    code, _, err = _run(argv)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_rerun_with_another_calibration_sample_recalibrates(full_run, thumbnail_checkpoint, tmp_path):
    """Copies are named by their place in the sample: a rerun in the same --out with another sample size must make
    them again, not compare old copies with new originals (which once removed nearly the whole pool)."""
    root, expect, out, _, _ = full_run
    fresh = json.load(open(os.path.join(out, "summary.json")))["threshold"]
    o = tmp_path / "o"
    shutil.copytree(os.path.join(out, "embeddings"), o / "embeddings")
    assert _run(_args(root, thumbnail_checkpoint, str(o), "--calibration-images", "3"))[0] == 0
    code, _, err = _run(_args(root, thumbnail_checkpoint, str(o)))
    assert code == 0, err
    assert json.load(open(o / "summary.json"))["threshold"] == pytest.approx(fresh, abs=1e-6)
    assert _manifest(str(o)) == _manifest(out)
