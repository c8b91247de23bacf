"""embed_folder: shards + manifest, features equal to the model's on the same preprocessing, unreadable files
counted and never fatal, and an interrupted run resumed gives the arrays of an uninterrupted one."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from feature_test_helpers import tiny_dinov2, write_image_folder  # noqa: E402

from dinokernels.data.imageio import open_rgb  # noqa: E402
from dinokernels.data.transforms import EvalTransform  # noqa: E402
from dinokernels.features import load_feature_model  # noqa: E402
from dinokernels.features.embed import (embed_folder, list_images, load_embeddings, load_patch_tokens,  # noqa: E402
                                        read_meta)


@pytest.fixture
def setup(tmp_path):
    ckpt = tmp_path / "w.pth"
    torch.save(tiny_dinov2().state_dict(), ckpt)
    data = tmp_path / "data"
    write_image_folder(str(data), classes=("a", "b", "c"), per_class=4)
    (data / "c" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (data / "notes.txt").write_text("ignored: not an image extension")
    os.makedirs(data / ".hidden")
    write_image_folder(str(data / ".hidden"), classes=("x",), per_class=1)
    return str(ckpt), str(data), tmp_path


def test_embed_writes_shards_manifest_and_exact_features(setup):
    ckpt, data, tmp = setup
    out = str(tmp / "emb")
    result = embed_folder(ckpt, data, out, what=["cls", "patch_mean", "patch_tokens"], batch_size=3,
                          image_size=16, shard_size=5, progress=False)
    files = list_images(data)
    assert len(files) == 13 and files[0] == "a/000.png" and "c/broken.jpg" in files  # hidden and .txt skipped
    assert result.num_files == 13 and result.num_embedded == 12 and result.shards == 3
    assert [p for p, _ in result.unreadable] == ["c/broken.jpg"]
    assert sorted(os.listdir(out)) == ["manifest.jsonl", "meta.json", "patch_00000.npy", "patch_00001.npy",
                                       "patch_00002.npy", "shard_00000.npy", "shard_00001.npy", "shard_00002.npy"]
    lines = [json.loads(x) for x in open(os.path.join(out, "manifest.jsonl"))]
    assert [r["path"] for r in lines] == files
    bad = [r for r in lines if r["status"] != "ok"]
    assert len(bad) == 1 and bad[0]["row"] is None and bad[0]["error"]
    meta = read_meta(out)
    assert meta["complete"] and meta["columns"] == {"cls": [0, 64], "patch_mean": [64, 128]}
    assert meta["image_size"] == 16 and meta["resize"] == 18

    # the same numbers as running the model on EvalTransform(18, 16) of each image
    fm = load_feature_model(ckpt)
    tf = EvalTransform(18, 16, fm.mean, fm.std)
    good = [f for f in files if f != "c/broken.jpg"]
    images = torch.stack([tf(open_rgb(os.path.join(data, f))) for f in good])
    ref = fm.forward_features(images)
    paths, both = load_embeddings(out)
    assert paths == [os.path.join(os.path.abspath(data), *f.split("/")) for f in good]
    np.testing.assert_allclose(both, torch.cat([ref["cls"], ref["patch_mean"]], 1).numpy(), rtol=1e-5, atol=1e-5)
    rel, cls = load_embeddings(out, "patch_mean", absolute=False)
    assert rel == good and cls.shape == (12, 64)
    np.testing.assert_array_equal(cls, both[:, 64:])
    _, patches = load_patch_tokens(out)
    np.testing.assert_allclose(patches, ref["patch_tokens"].numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no foo features"):
        load_embeddings(out, "foo")

    # a second call finds everything done and changes nothing
    before = np.load(os.path.join(out, "shard_00001.npy"))
    again = embed_folder(ckpt, data, out, what=["cls", "patch_mean", "patch_tokens"], batch_size=3,
                         image_size=16, shard_size=5, progress=False)
    assert again.resumed_files == 13 and again.num_embedded == 12
    np.testing.assert_array_equal(np.load(os.path.join(out, "shard_00001.npy")), before)


class Stop(Exception):
    pass


def test_interrupted_run_resumes_to_identical_arrays(setup):
    ckpt, data, tmp = setup
    full = str(tmp / "full")
    embed_folder(ckpt, data, full, what=["cls", "patch_tokens"], batch_size=2, image_size=16, shard_size=4,
                 progress=False)
    cut = str(tmp / "cut")

    def stop_after(n):
        def hook(batches):
            if batches == n:
                raise Stop
        return hook

    with pytest.raises(Stop):  # in the middle of the second shard
        embed_folder(ckpt, data, cut, what=["cls", "patch_tokens"], batch_size=2, image_size=16, shard_size=4,
                     progress=False, on_batch=stop_after(3))
    assert not read_meta(cut)["complete"]
    assert len(open(os.path.join(cut, "manifest.jsonl")).readlines()) == 4  # the first shard only
    with pytest.raises(ValueError, match="incomplete"):
        load_embeddings(cut)
    paths, partial = load_embeddings(cut, allow_partial=True)
    assert len(paths) == 4 and partial.shape == (4, 64)
    # a cut manifest line, as a kill in the middle of a write leaves it, is dropped with its shard
    with open(os.path.join(cut, "manifest.jsonl"), "a") as f:
        f.write('{"path": "b/000.png", "sha')
    counted = []
    result = embed_folder(ckpt, data, cut, what=["cls", "patch_tokens"], batch_size=2, image_size=16, shard_size=4,
                          progress=False, on_batch=counted.append)
    assert result.resumed_files == 4 and len(counted) == 5  # shards 1-3 (4 + 4 + 1 files) in batches of 2
    for name in ("shard", "patch"):
        for k in range(4):
            np.testing.assert_array_equal(np.load(os.path.join(cut, f"{name}_{k:05d}.npy")),
                                          np.load(os.path.join(full, f"{name}_{k:05d}.npy")))
    assert open(os.path.join(cut, "manifest.jsonl")).read() == open(os.path.join(full, "manifest.jsonl")).read()
    assert load_embeddings(cut)[0] == load_embeddings(full)[0]


def test_resume_with_other_settings_is_a_clear_error(setup):
    ckpt, data, tmp = setup
    out = str(tmp / "emb")
    embed_folder(ckpt, data, out, image_size=16, shard_size=4, progress=False)
    with pytest.raises(ValueError, match="image_size: 16 before, 20 now"):
        embed_folder(ckpt, data, out, image_size=20, shard_size=4, progress=False)
    with pytest.raises(ValueError, match="what"):
        embed_folder(ckpt, data, out, what=["patch_mean"], image_size=16, shard_size=4, progress=False)
    other = tmp / "other.pth"
    torch.save(tiny_dinov2(seed=5).state_dict(), other)
    with pytest.raises(ValueError, match="checkpoint_fingerprint"):
        embed_folder(str(other), data, out, image_size=16, shard_size=4, progress=False)
    write_image_folder(os.path.join(data, "new"), classes=("d",), per_class=1)
    with pytest.raises(ValueError, match="num_files: 13 before, 14 now"):
        embed_folder(ckpt, data, out, image_size=16, shard_size=4, progress=False)
    # a folder with foreign files is not taken over
    os.makedirs(tmp / "busy")
    (tmp / "busy" / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        embed_folder(ckpt, data, str(tmp / "busy"), image_size=16, progress=False)


def test_bad_arguments(setup):
    ckpt, data, tmp = setup
    with pytest.raises(ValueError, match="multiple of the model's patch size 4"):
        embed_folder(ckpt, data, str(tmp / "o1"), image_size=18, progress=False)
    with pytest.raises(ValueError, match="what must be"):
        embed_folder(ckpt, data, str(tmp / "o2"), what=["pixels"], progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        embed_folder(ckpt, data, str(tmp / "o3"), batch_size=0, progress=False)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        embed_folder(ckpt, str(tmp / "nowhere"), str(tmp / "o4"), progress=False)
    os.makedirs(tmp / "empty")
    with pytest.raises(ValueError, match="no image files"):
        embed_folder(ckpt, str(tmp / "empty"), str(tmp / "o5"), progress=False)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        load_embeddings(str(tmp / "empty"))


def test_every_file_unreadable_is_not_fatal(tmp_path):
    ckpt = tmp_path / "w.pth"
    torch.save(tiny_dinov2().state_dict(), ckpt)
    os.makedirs(tmp_path / "d")
    for i in range(3):
        (tmp_path / "d" / f"{i}.png").write_bytes(os.urandom(50))
    result = embed_folder(str(ckpt), str(tmp_path / "d"), str(tmp_path / "o"), image_size=16, progress=False)
    assert result.num_embedded == 0 and len(result.unreadable) == 3
    paths, arr = load_embeddings(str(tmp_path / "o"))
    assert paths == [] and arr.shape == (0, 64)


def test_float16_storage_and_decoding_workers(setup):
    ckpt, data, tmp = setup
    ref = embed_folder(ckpt, data, str(tmp / "f32"), what=["cls", "patch_tokens"], image_size=16, progress=False,
                       batch_size=4)
    half = embed_folder(ckpt, data, str(tmp / "f16"), what=["cls", "patch_tokens"], image_size=16, progress=False,
                        dtype="float16", num_workers=1, batch_size=4)
    assert half.num_embedded == ref.num_embedded == 12 and [p for p, _ in half.unreadable] == ["c/broken.jpg"]
    assert np.load(os.path.join(tmp, "f16", "shard_00000.npy")).dtype == np.float16
    for load in (load_embeddings, load_patch_tokens):
        p32, a32 = load(str(tmp / "f32"))
        p16, a16 = load(str(tmp / "f16"))
        assert p16 == p32 and a16.dtype == np.float32
        np.testing.assert_array_equal(a16, a32.astype(np.float16).astype(np.float32))
    with pytest.raises(ValueError, match="dtype: \"float16\" before, \"float32\" now"):
        embed_folder(ckpt, data, str(tmp / "f16"), what=["cls", "patch_tokens"], image_size=16, progress=False)
    with pytest.raises(ValueError, match="dtype must be"):
        embed_folder(ckpt, data, str(tmp / "f8"), dtype="int8", progress=False)


def test_killed_process_resumes(setup):
    """SIGKILL an embedding process once its first shard is in the manifest; `dinokernels embed` with the same
    options finishes the run with the arrays of an uninterrupted one."""
    ckpt, data, tmp = setup
    full, cut = str(tmp / "full"), str(tmp / "cut")
    common = ["--checkpoint", ckpt, "--data", data, "--image-size", "16", "--batch-size", "1", "--shard-size", "2",
              "--what", "cls", "patch_mean"]
    # the first run: embed_folder slowed by a sleeping hook, so that the kill lands in the middle
    script = ("import sys, time\nfrom dinokernels.features.embed import embed_folder\n"
              "embed_folder(sys.argv[1], sys.argv[2], sys.argv[3], what=['cls', 'patch_mean'], batch_size=1, "
              "image_size=16, shard_size=2, progress=False, on_batch=lambda n: time.sleep(0.25))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", script, ckpt, data, cut], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    manifest = os.path.join(cut, "manifest.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(manifest) and len(open(manifest).readlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not read_meta(cut)["complete"]
    done = subprocess.run([sys.executable, "-m", "dinokernels", "embed", *common, "--out", cut], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed" in done.stdout
    embed_folder(ckpt, data, full, what=["cls", "patch_mean"], batch_size=1, image_size=16, shard_size=2,
                 progress=False)
    np.testing.assert_array_equal(load_embeddings(cut)[1], load_embeddings(full)[1])
    assert load_embeddings(cut)[0] == load_embeddings(full)[0]


def test_file_names_that_are_not_utf8(tmp_path):
    ckpt = tmp_path / "w.pth"
    torch.save(tiny_dinov2().state_dict(), ckpt)
    folder = os.path.join(os.fsencode(str(tmp_path)), b"d")
    os.makedirs(folder)
    from PIL import Image
    for name in (b"caf\xe9.png", b"plain.png"):  # a Latin-1 byte: no UTF-8 decoding of it
        Image.new("RGB", (16, 16), (200, 30, 30)).save(os.path.join(folder, name).decode("utf-8", "surrogateescape"))
    data = os.fsdecode(folder)
    result = embed_folder(str(ckpt), data, str(tmp_path / "o"), image_size=16, progress=False)
    assert result.num_embedded == 2
    paths, arr = load_embeddings(str(tmp_path / "o"))
    assert all(os.path.isfile(p) for p in paths) and arr.shape == (2, 64)
    np.testing.assert_allclose(arr[0], arr[1], rtol=1e-5, atol=1e-5)  # the same picture
    assert embed_folder(str(ckpt), data, str(tmp_path / "o"), image_size=16, progress=False).resumed_files == 2
