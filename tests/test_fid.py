"""util/fid.py: the Fréchet distance and Inception Score against closed forms and torch-fidelity, the
statistics file checks, and the whole folder -> stats -> score path offline with random Inception weights
(whose FID values mean nothing; only identities such as FID(A, A) = 0 are checked)."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image, ImageDraw

from util import fid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


def random_spd(d, rng):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# -----------------------------------------------------------------------------
# Fréchet distance and Inception Score

def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    assert fid.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_matches_direct_scipy_on_spd():
    rng = np.random.default_rng(1)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_spd(d, rng), random_spd(d, rng)
    direct = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
              - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-9)
    # symmetric in its two arguments, like any distance
    assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(direct, rel=1e-9)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_inception_score_closed_form_and_torch_fidelity():
    # 50 confident predictions of 50 different classes: each split of 10 scores exactly 10
    logits = 100.0 * np.eye(50, 1008)
    mean, std = fid.inception_score(logits, splits=5)
    assert mean == pytest.approx(10.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    # identical predictions carry no information: IS = 1
    assert fid.inception_score(np.ones((20, 1008)), splits=2)[0] == pytest.approx(1.0)
    # random logits: the same numbers as torch-fidelity, shuffle included
    from torch_fidelity.metric_isc import isc_features_to_metric
    logits = np.random.default_rng(2).normal(scale=3.0, size=(103, 1008)).astype(np.float32)
    ref = isc_features_to_metric(torch.from_numpy(logits), splits=10)
    assert fid.inception_score(logits) == (ref["inception_score_mean"], ref["inception_score_std"])
    with pytest.raises(ValueError, match="splits"):
        fid.inception_score(logits[:5])


# -----------------------------------------------------------------------------
# statistics files

def test_fid_stats_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    mu, sigma = rng.normal(size=8).astype(np.float32), random_spd(8, rng)
    fid.save_fid_stats(str(tmp_path / "ref.npz"), mu, sigma)
    assert os.listdir(tmp_path) == ["ref.npz"]  # no temporary file left behind
    mu2, sigma2 = fid.load_fid_stats(str(tmp_path / "ref.npz"))
    assert mu2.dtype == sigma2.dtype == np.float64
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)


def test_load_fid_stats_errors(tmp_path):
    with pytest.raises(ValueError, match="not found.*util.fid stats"):
        fid.load_fid_stats(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "no_sigma.npz", mu=np.zeros(4))
    with pytest.raises(ValueError, match="lacks array.*sigma"):
        fid.load_fid_stats(str(tmp_path / "no_sigma.npz"))
    np.savez(tmp_path / "bad_shape.npz", mu=np.zeros(4), sigma=np.eye(5))
    with pytest.raises(ValueError, match=r"mu \(4,\) and sigma \(5, 5\)"):
        fid.load_fid_stats(str(tmp_path / "bad_shape.npz"))
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="cannot read"):
        fid.load_fid_stats(str(tmp_path / "garbage.npz"))


def test_compute_fid_is_checks_stats_before_inception(tmp_path):
    # neither the images nor the weights exist: the stats error must come first
    with pytest.raises(ValueError, match="FID statistics file not found"):
        fid.compute_fid_is(str(tmp_path / "no_images"), str(tmp_path / "missing.npz"), CPU,
                           inception_weights=str(tmp_path / "no_weights.pth"))


def test_list_images_is_recursive_and_filters(tmp_path):
    (tmp_path / "cls_b").mkdir()
    (tmp_path / "cls_a").mkdir()
    for name in ("cls_b/1.PNG", "cls_a/2.jpg", "cls_a/3.jpeg", "0.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name, format="PNG" if "png" in name.lower() else "JPEG")
    (tmp_path / "notes.txt").write_text("not an image")
    names = [os.path.relpath(p, tmp_path) for p in fid.list_images(str(tmp_path))]
    assert names == ["0.png", os.path.join("cls_a", "2.jpg"), os.path.join("cls_a", "3.jpeg"),
                     os.path.join("cls_b", "1.PNG")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no PNG/JPEG"):
        fid.list_images(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="not found"):
        fid.list_images(str(tmp_path / "missing"))


# -----------------------------------------------------------------------------
# end to end, offline: random Inception weights, a few tiny images

def write_shapes(folder, n, seed, shape):
    """n 32x32 PNGs of one coloured shape on a coloured background, so Inception features vary."""
    os.makedirs(folder)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = Image.new("RGB", (32, 32), tuple(int(c) for c in rng.integers(0, 256, 3)))
        x, y = (int(v) for v in rng.integers(0, 16, 2))
        box, colour = [x, y, x + 14, y + 14], tuple(int(c) for c in rng.integers(0, 256, 3))
        (ImageDraw.Draw(img).ellipse if shape == "ellipse" else ImageDraw.Draw(img).rectangle)(box, fill=colour)
        img.save(os.path.join(folder, f"{i:03d}.png"))


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """Random Inception weights (~91 MB, in a temporary folder), two image folders and their statistics."""
    root = tmp_path_factory.mktemp("fid")
    weights = fid.make_random_inception_weights(str(root / "inception_random.pth"))
    dirs = {"a": str(root / "ellipses"), "b": str(root / "rectangles")}
    write_shapes(dirs["a"], 20, seed=0, shape="ellipse")
    write_shapes(dirs["b"], 20, seed=1, shape="rectangle")
    # an odd one out: grey, JPEG, another size, in a sub-folder (read as RGB, resized by Inception)
    os.makedirs(os.path.join(dirs["a"], "extra"))
    Image.new("L", (40, 48), 90).save(os.path.join(dirs["a"], "extra", "grey.jpg"))
    stats = {k: str(root / f"{k}.npz") for k in dirs}
    for k in dirs:
        fid.compute_fid_stats(dirs[k], stats[k], CPU, inception_weights=weights, batch_size=8)
    return {"weights": weights, "dirs": dirs, "stats": stats, "root": root}


def test_stats_file_written(offline):
    mu, sigma = fid.load_fid_stats(offline["stats"]["a"])
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    assert np.all(np.isfinite(sigma)) and np.trace(sigma) > 0  # random weights but not degenerate
    assert not [f for f in os.listdir(offline["root"]) if f.startswith(".tmp")]


def test_same_folder_scores_zero_fid(offline):
    r = fid.compute_fid_is(offline["dirs"]["a"], offline["stats"]["a"], CPU,
                           inception_weights=offline["weights"], batch_size=64)
    assert set(r) == {"fid", "inception_score", "inception_score_std", "num_images"}
    assert r["num_images"] == 21
    assert abs(r["fid"]) < 1e-3
    assert np.isfinite(r["inception_score"]) and r["inception_score"] >= 1.0


def test_cli_scores_other_folder(offline, capsys):
    rc = fid.main(["score", offline["dirs"]["a"], offline["stats"]["b"], "--inception_weights",
                   offline["weights"], "--device", "cpu", "--batch_size", "8"])
    assert rc == 0
    out = capsys.readouterr().out.strip()
    m = re.fullmatch(r"FID: (\S+), Inception Score: (\S+)", out)
    assert m, out
    assert float(m.group(1)) > 0 and float(m.group(2)) >= 1.0


def test_cli_missing_stats_exits_2(tmp_path):
    missing = str(tmp_path / "missing.npz")
    proc = subprocess.run([sys.executable, "-m", "util.fid", "score", str(tmp_path), missing, "--device", "cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not found" in lines[0] and missing in lines[0], proc.stderr


def test_cli_stats_of_missing_folder_exits_2(tmp_path, capsys):
    rc = fid.main(["stats", str(tmp_path / "no_images"), str(tmp_path / "out.npz"), "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: image folder not found") and "\n" not in err
    assert not os.path.exists(tmp_path / "out.npz")


def test_cli_stats_offline_says_to_pass_the_weights(tmp_path, capsys, monkeypatch):
    """No internet and no --inception_weights: one line naming the flag, no traceback."""
    import urllib.error
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "0.png")
    rc = fid.main(["stats", str(tmp_path / "images"), str(tmp_path / "out.npz"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "--inception_weights" in err, err
    assert not os.path.exists(tmp_path / "out.npz")


# ----------------------------------------------------------------------------- bad inputs, checked first
def test_cli_refuses_a_bad_batch_size_and_an_image_that_does_not_decode(offline, tmp_path, capsys):
    out = str(tmp_path / "out.npz")
    assert fid.main(["stats", offline["dirs"]["a"], out, "--batch_size", "-1"]) == 2
    assert "--batch_size must be at least 1, got -1" in capsys.readouterr().err and not os.path.exists(out)
    folder = tmp_path / "images"
    write_shapes(str(folder), 3, seed=0, shape="ellipse")
    (folder / "001.png").write_bytes(b"not a png")
    assert fid.main(["stats", str(folder), out, "--inception_weights", offline["weights"], "--device", "cpu"]) == 2
    err = re.split(r"[\r\n]", capsys.readouterr().err.strip())[-1]  # after the progress bar
    assert err.startswith("error: ") and "001.png does not decode as an image" in err and not os.path.exists(out)


def test_check_scoring_refuses_what_would_fail_after_the_last_image(offline, tmp_path):
    small, nan = str(tmp_path / "small.npz"), str(tmp_path / "nan.npz")
    fid.save_fid_stats(small, np.zeros(64), np.eye(64))
    fid.save_fid_stats(nan, np.full(2048, np.nan), np.eye(2048))
    not_weights = tmp_path / "weights.pth"
    not_weights.write_bytes(b"<html>sign in</html>")
    for stats, weights, message in ((small, offline["weights"], "holds 64-d statistics"),
                                    (nan, offline["weights"], "holds nan or inf"),
                                    (offline["stats"]["a"], str(not_weights), "does not load as torch-fidelity")):
        with pytest.raises(ValueError, match=message):
            fid.check_scoring(stats, CPU, weights)
    fid.check_scoring(offline["stats"]["a"], CPU, offline["weights"])


def test_two_processes_share_the_scoring_and_score_as_one(offline):
    """torchrun with 2 processes: each extracts the features of half the images, rank 0 combines them: the
    score of one process, up to the float32 rounding of Inception's convolutions, which differs from run to
    run on the CPU (relative differences of 1e-7 to 8e-7 seen on this 20-image FID; the IS agreed)."""
    folder, stats, weights = offline["dirs"]["b"], offline["stats"]["a"], offline["weights"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "util.fid", "score", folder, stats, "--inception_weights", weights, "--device",
                           "cpu"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = re.findall(r"FID: (\S+), Inception Score: (\S+)", proc.stdout)
    assert len(shared) == 1, proc.stdout  # rank 0 alone prints
    one = fid.compute_fid_is(folder, stats, CPU, inception_weights=weights)
    assert float(shared[0][0]) == pytest.approx(one["fid"], rel=1e-5)
    assert float(shared[0][1]) == pytest.approx(one["inception_score"], rel=1e-5)
