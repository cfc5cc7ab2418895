"""FID and Inception Score of a folder of images, against saved reference statistics.

Features come from torch-fidelity's InceptionV3 (the TF-compatible port every FID number in the
literature is computed with), but the reference side is a plain npz with `mu` (d,) and `sigma` (d, d),
so any dataset can be scored: make its statistics once with `compute_fid_stats`, then score samples
with `compute_fid_is`. Upstream torch-fidelity 0.4.0 cannot score against saved statistics directly
(that is a fork's `fid_statistics_file`), which is why the two halves are glued here.

    python -m util.fid stats IMAGE_DIR OUT.npz [--inception_weights P] [--device D] [--batch_size N]
    python -m util.fid score IMAGE_DIR STATS.npz [--inception_weights P] [--device D] [--batch_size N]

Under `torchrun --nproc_per_node=N -m util.fid ...` the N processes share the feature extraction.
"""
import os
import sys
import tempfile
import zipfile

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from tqdm import tqdm

import util.misc as misc
from util.flags import Parser, add_device_flags, count
from util.misc import UserError, run_command

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
FEATURE_DIM = 2048
NUM_LOGITS = 1008


# -----------------------------------------------------------------------------
# reference statistics

def load_fid_stats(path):
    """Read (mu, sigma) as float64 from an npz, failing early with a message that says what to do.

    Called before any feature extraction, so a wrong path costs seconds, not an hour of Inception.
    """
    hint = "make one with `python -m util.fid stats IMAGE_DIR OUT.npz`"
    if not os.path.isfile(path):
        raise ValueError(f"FID statistics file not found: {path}; {hint}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"cannot read FID statistics file {path}: not an npz archive; {hint}")
    try:
        with np.load(path) as stats:  # allow_pickle stays False: a stats file is two plain arrays
            arrays = {k: np.asarray(stats[k], dtype=np.float64) for k in ("mu", "sigma") if k in stats.files}
            present = stats.files
    except Exception as e:  # not a zip, truncated, pickled objects, ...
        raise ValueError(f"cannot read FID statistics file {path} ({type(e).__name__}: {e}); {hint}") from None
    missing = [k for k in ("mu", "sigma") if k not in arrays]
    if missing:
        raise ValueError(f"FID statistics file {path} lacks array(s) {', '.join(missing)} "
                         f"(has {', '.join(present) or 'none'}); {hint}")
    mu, sigma = arrays["mu"], arrays["sigma"]
    d = mu.shape[0] if mu.ndim == 1 else None
    if d is None or sigma.shape != (d, d):
        raise ValueError(f"FID statistics file {path} has mu {mu.shape} and sigma {sigma.shape}, "
                         f"expected (d,) and (d, d); {hint}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"FID statistics file {path} holds nan or inf; {hint}")
    return mu, sigma


def inception_stats(fid_stats_path):
    """(mu, sigma) of a statistics file, which must be of Inception's 2048 features."""
    mu, sigma = load_fid_stats(fid_stats_path)
    if mu.shape[0] != FEATURE_DIM:
        raise ValueError(f"{fid_stats_path} holds {mu.shape[0]}-d statistics; Inception FID needs "
                         f"{FEATURE_DIM}-d ones (make them with `python -m util.fid stats`)")
    return mu, sigma


def check_scoring(fid_stats_path, device, inception_weights=None):
    """Everything scoring needs, checked before the images are made: 2048-d finite statistics, and the
    Inception weights (a local file that loads, or the download that fetches them)."""
    inception_stats(fid_stats_path)
    build_inception(device, inception_weights)


def atomic_write(path, write, suffix):
    """Call write(file_object) on a temporary file next to `path`, then rename it over `path`.

    A crash mid-write leaves the old file (or none), never a truncated one that loads as garbage later.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_fid_stats(path, mu, sigma):
    """Write mu and sigma to an npz atomically (a file object, so numpy does not append ".npz")."""
    atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma), suffix=".npz")


def features_to_stats(features):
    """Mean and (unbiased) covariance of (N, d) features, as FID defines them."""
    if features.shape[0] < 2:
        raise ValueError(f"need at least 2 images for a covariance, got {features.shape[0]}")
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


# -----------------------------------------------------------------------------
# the two metrics

def frechet_distance(mu1, sigma1, mu2, sigma2, tol=1e-6):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):

        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2))

    tr(sqrtm(sigma1 sigma2)) is computed with two symmetric eigendecompositions rather than scipy's
    sqrtm (about 7x faster for 2048-d Inception statistics, and no complex round-off): sigma1 sigma2 is
    similar to the symmetric PSD matrix A = sqrt(sigma1) sigma2 sqrt(sigma1), so the trace is the sum
    of the square roots of A's eigenvalues. Singular covariances (fewer images than dimensions) need
    no eps retry: eigenvalues below zero by round-off are clipped. Covariances that are not symmetric,
    or clearly not positive semi-definite (an eigenvalue below -tol times the largest), are broken
    statistics, so it raises.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    d = mu1.shape[0]
    if mu1.shape != mu2.shape or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"statistics disagree in shape: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    sqrt1 = psd_sqrt(sigma1, tol)
    eigenvalues = checked_eigh(sqrt1 @ sigma2 @ sqrt1, tol, values_only=True)
    trace_covmean = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_covmean)


def checked_eigh(sym, tol, values_only=False):
    """Eigen-decomposition of a covariance-like matrix, refusing ones that are not symmetric PSD."""
    scale = max(np.abs(sym).max(), np.finfo(np.float64).tiny)
    if not np.allclose(sym, sym.T, rtol=0, atol=tol * scale):
        raise ValueError("a covariance matrix is not symmetric; the statistics are not valid")
    sym = (sym + sym.T) / 2
    w, v = (np.linalg.eigvalsh(sym), None) if values_only else np.linalg.eigh(sym)
    if w.min() < -tol * max(w.max(), 0.0):
        raise ValueError(f"a covariance matrix has a negative eigenvalue ({w.min():.3g}, largest "
                         f"{w.max():.3g}); the statistics are not valid")
    return w if values_only else (w, v)


def psd_sqrt(sigma, tol):
    """The symmetric square root of a PSD matrix."""
    w, v = checked_eigh(sigma, tol)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def inception_score(logits, splits=10):
    """Inception Score (mean, std over splits) from `logits_unbiased`, computed as torch-fidelity does.

    Same steps as torch_fidelity.metric_isc.isc_features_to_metric with its defaults (shuffle with
    RandomState(2020), float64, exp of the mean KL to the split's marginal), so the numbers match.
    """
    logits = torch.as_tensor(np.asarray(logits))
    n = logits.shape[0]
    if logits.dim() != 2 or n < splits:
        raise ValueError(f"need (N, classes) logits with N >= splits={splits}, got {tuple(logits.shape)}")
    logits = logits[np.random.RandomState(2020).permutation(n)].double()
    p, log_p = logits.softmax(dim=1), logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        q = p[lo:hi].mean(dim=0, keepdim=True)  # the split's marginal class distribution
        kl = (p[lo:hi] * (log_p[lo:hi] - q.log())).sum(dim=1)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


# -----------------------------------------------------------------------------
# Inception features of a folder

def list_images(image_dir):
    """PNG/JPEG files under image_dir, recursively (class sub-folders work), in a stable sorted order."""
    if not os.path.isdir(image_dir):
        raise ValueError(f"image folder not found: {image_dir}")
    paths = []
    for root, dirs, files in os.walk(image_dir):
        dirs.sort()
        paths += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not paths:
        raise ValueError(f"no PNG/JPEG images in {image_dir}")
    return paths


def read_image(path):
    """A uint8 RGB tensor (3, H, W): the input torch-fidelity's Inception expects (it resizes itself)."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path} does not decode as an image ({type(e).__name__}: {e}); remove it from the "
                         "folder or replace it") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def build_inception(device, inception_weights=None, features=("2048", "logits_unbiased")):
    """torch-fidelity's InceptionV3 in eval mode on `device`.

    inception_weights: a local copy of torch-fidelity's weights file (clusters without internet);
    None downloads it from torch-fidelity's GitHub release into the torch hub cache.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    if inception_weights is not None and not os.path.isfile(inception_weights):
        raise ValueError(f"Inception weights file not found: {inception_weights}; pass torch-fidelity's "
                         "weights-inception-2015-12-05-6726825d.pth, or omit it to download")
    try:
        model = FeatureExtractorInceptionV3("inception-v3-compat", list(features),
                                            feature_extractor_weights_path=inception_weights, verbose=False)
    except Exception as e:  # noqa: BLE001 - what fails to load as these weights is not them
        if inception_weights is not None:
            raise ValueError(f"Inception weights file {inception_weights} does not load as torch-fidelity's "
                             f"InceptionV3 ({type(e).__name__}: {str(e).splitlines()[0][:150]}); pass "
                             "weights-inception-2015-12-05-6726825d.pth") from None
        if not isinstance(e, OSError):  # urllib's URLError (an OSError) on a machine without internet
            raise
        raise ValueError(f"cannot download torch-fidelity's InceptionV3 weights ({getattr(e, 'reason', e)}): pass "
                         "--inception_weights PATH (--fid_inception_weights in main_fractalgen.py), a local copy "
                         "of weights-inception-2015-12-05-6726825d.pth") from None
    return model.to(device)


@torch.no_grad()
def inception_features(image_dir, device, inception_weights=None, batch_size=64):
    """2048-d pool features (float64, (N, 2048)) and logits_unbiased (float32 as Inception gives them,
    (N, 1008)) of every PNG/JPEG under image_dir, searched recursively, in sorted path order.

    In a process group every rank must call it: each extracts the features of its own contiguous share
    of the images, and rank 0 gathers them in order (the others get None, None), so scoring is about
    world-size times faster and gives rank 0 the same arrays as one process would.
    Images are read batch by batch and the outputs go into preallocated arrays, so memory stays at one
    batch of images plus the features. Images of different sizes are fine (Inception resizes each).
    """
    paths = list_images(image_dir)
    rank, world = misc.get_rank(), misc.get_world_size()
    share = paths[rank * len(paths) // world:(rank + 1) * len(paths) // world]
    model = build_inception(device, inception_weights)
    feats = np.empty((len(share), FEATURE_DIM), dtype=np.float32)  # Inception's own precision: gathered as is
    logits = np.empty((len(share), NUM_LOGITS), dtype=np.float32)
    with tqdm(total=len(paths), desc=f"inception {image_dir}", unit="img", leave=False, disable=rank != 0) as bar:
        for start in range(0, len(share), batch_size):
            images = [read_image(p) for p in share[start:start + batch_size]]
            # one forward per distinct size; a folder of samples is a single batch per step
            groups = {}
            for i, img in enumerate(images):
                groups.setdefault(tuple(img.shape), []).append(i)
            for idx in groups.values():
                f, l = model(torch.stack([images[i] for i in idx]).to(device))
                rows = [start + i for i in idx]
                feats[rows] = f.float().cpu().numpy()
                logits[rows] = l.float().cpu().numpy()
            bar.update(min(len(images) * world, bar.total - bar.n))  # rank 0's share, times ranks
    if world > 1:
        shares = [None] * world if rank == 0 else None
        torch.distributed.gather_object((feats, logits), shares, dst=0)
        if rank != 0:
            return None, None
        feats, logits = np.concatenate([f for f, _ in shares]), np.concatenate([l for _, l in shares])
    return feats.astype(np.float64), logits


# -----------------------------------------------------------------------------
# what a training script calls

def compute_fid_stats(image_dir, out_path, device, inception_weights=None, batch_size=64):
    """Save the FID reference statistics (npz with mu, sigma) of a folder of images; returns (mu, sigma)."""
    feats, _ = inception_features(image_dir, device, inception_weights, batch_size)
    if feats is None:  # a rank other than 0: rank 0 saves
        return None
    mu, sigma = features_to_stats(feats)
    save_fid_stats(out_path, mu, sigma)
    return mu, sigma


def compute_fid_is(image_dir, fid_stats_path, device, inception_weights=None, batch_size=64):
    """FID against saved statistics and Inception Score of a folder of images. In a process group every
    rank must call it (each scores a share of the images); rank 0 gets the scores, the others None."""
    ref_mu, ref_sigma = inception_stats(fid_stats_path)  # fail before the slow part
    feats, logits = inception_features(image_dir, device, inception_weights, batch_size)
    if feats is None:
        return None
    mu, sigma = features_to_stats(feats)
    is_mean, is_std = inception_score(logits)
    return {"fid": frechet_distance(mu, sigma, ref_mu, ref_sigma), "inception_score": is_mean,
            "inception_score_std": is_std, "num_images": int(feats.shape[0])}


# -----------------------------------------------------------------------------
# random weights, for offline tests only

def make_random_inception_weights(path, seed=0):
    """Save a random, non-degenerate state dict for torch-fidelity's InceptionV3 (about 91 MiB).

    FOR TESTS ONLY: FID and IS computed with these weights mean nothing. They exist so the whole
    pipeline can run offline. He-initialised convolutions keep activations O(1) through the 90-odd
    layers (PyTorch's default init shrinks the pool features to ~1e-9, making every FID zero), and a
    large fc std (2.0) spreads the logits so the Inception Score moves away from 1.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            """Keep the fresh parameters: the constructor insists on loading a file."""

    with tempfile.TemporaryDirectory() as tmp:
        empty = os.path.join(tmp, "empty.pth")
        torch.save({}, empty)  # the constructor torch.loads a file; our no-op load ignores it
        model = Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty, verbose=False)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g)
    nn.init.normal_(model.fc.weight, std=2.0, generator=g)
    nn.init.zeros_(model.fc.bias)
    atomic_write(path, lambda f: torch.save(model.state_dict(), f), suffix=".pth")
    return path


# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    """The command; returns its exit code (2 after a bad input, printed as one line)."""
    return run_command(lambda: run(argv))


def run(argv):
    parser = Parser(prog="python -m util.fid", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, second in (("stats", "save FID statistics of a folder", "out_path"),
                                    ("score", "FID and IS of a folder against saved statistics", "fid_stats")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("image_dir")
        p.add_argument(second)
        p.add_argument("--inception_weights", default=None, help="local torch-fidelity InceptionV3 weights")
        add_device_flags(p, precision=False)
        p.add_argument("--batch_size", type=count(1), default=64)
    args = parser.parse_args(argv)
    try:
        device = misc.init_distributed_mode(args.device)
        if args.command == "stats":
            compute_fid_stats(args.image_dir, args.out_path, device, args.inception_weights, args.batch_size)
            if misc.is_main_process():
                print(f"saved FID statistics of {args.image_dir} to {args.out_path}")
        else:
            r = compute_fid_is(args.image_dir, args.fid_stats, device, args.inception_weights, args.batch_size)
            if r is not None:
                print(f"FID: {r['fid']!r}, Inception Score: {r['inception_score']!r}")
        misc.share_from_rank0(None)  # the others wait for rank 0's score: all leave the process group together
    except ValueError as e:  # the checks of this module say what to do
        raise UserError(str(e)) from None


if __name__ == "__main__":
    sys.exit(main())
