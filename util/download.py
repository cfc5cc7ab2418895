"""Download the released checkpoints and the ADM reference statistics, resuming partial downloads.

    python -m util.download fractalmar_in64                     # -> pretrained_models/fractalmar_in64/checkpoint-last.pth
    python -m util.download all                                 # the five released checkpoints
    python -m util.download fractalmar_in64 --url URL          # the same, from a mirror you give
    python -m util.download adm_in256_stats                     # -> fid_stats/adm_in256_stats.npz (mu, sigma)

A download goes to `<file>.part` and is renamed only when complete (and of the expected size, when
known) and when it is what was asked for (a checkpoint is a torch file holding a state dict; statistics
are an npz with finite `mu` and `sigma` of Inception's 2048 dimensions): an interrupted download is
continued with an HTTP Range request, never used half-done, and a sign-in page is never kept.

The ADM statistics come from the reference batches of Dhariwal & Nichol (2021), whose `mu` and `sigma`
(2048-d Inception pool features) are kept in a small npz. The released checkpoints' URLs are those
of the release's README, kept with the other facts of each model in models.fractalgen.RELEASED.
"""
import argparse
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile

import numpy as np
import torch
from tqdm import tqdm

from models.fractalgen import RELEASED
from util.checkpoint import NAME as CHECKPOINT_NAME
from util.flags import Parser
from util.misc import UserError, run_command

ADM_BATCHES = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet"
CHECKPOINTS = tuple(RELEASED)
STATS = {"adm_in64_stats": f"{ADM_BATCHES}/64/VIRTUAL_imagenet64_labeled.npz",
         "adm_in256_stats": f"{ADM_BATCHES}/256/VIRTUAL_imagenet256_labeled.npz"}
TIMEOUT = 60  # seconds without a byte from the server


def check_url(url):
    parts = urllib.parse.urlparse(url)
    if parts.scheme not in ("http", "https", "file") or not (parts.netloc or parts.scheme == "file"):
        raise UserError(f"--url {url} is not a URL; give one that starts with https:// (or http://, file://)")
    return url


def download(url, path, expected_size=None, check=None, chunk=1 << 20):
    """Fetch url to path (resuming path.part), with a progress bar; returns path. `check(file)` says what is
    wrong with what arrived (or None); a wrong file is removed and named in the error."""
    if os.path.exists(path):
        return path
    check_url(url)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    part = path + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"User-Agent": "Wget/1.21"}  # Dropbox sends the file itself, not its web page, to wget
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part file already holds everything
            return finish(part, path, expected_size, url, check)
        raise UserError(f"{url} answered HTTP {e.code}: check the URL, or download it by hand to {path}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise UserError(f"cannot reach {url} ({getattr(e, 'reason', e)}): check the URL, or this machine is offline; "
                        f"download the file elsewhere and copy it to {path}") from None
    with response:
        if have and getattr(response, "status", 200) != 206:  # the server ignored the range: start again
            have = 0
        total = have + int(response.headers.get("Content-Length") or 0) or None
        try:
            with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                                 desc=os.path.basename(path)) as bar:
                read = getattr(response, "read1", response.read)  # what has arrived: a stall keeps it
                while block := read(chunk):
                    f.write(block)
                    bar.update(len(block))
        except TimeoutError:
            raise UserError(f"{url} sent nothing for {TIMEOUT} s: run the same command again to continue the "
                            f"download ({os.path.getsize(part)} bytes are in {part})") from None
    return finish(part, path, expected_size or total, url, check)


def finish(part, path, expected_size, url, check):
    size = os.path.getsize(part)
    if expected_size is not None and size != expected_size:
        raise UserError(f"{part} has {size} bytes, expected {expected_size}: run the command again to "
                        "continue the download, or delete the .part file to start over")
    problem = check(part) if check else None
    if problem:
        arrived = describe(part)
        os.remove(part)
        raise UserError(f"{url} sent {arrived}, not {problem} (removed): a share link that wants a sign-in sends "
                        f"a web page; give the file's direct URL with --url, or download it by hand to {path}")
    os.replace(part, path)
    return path


def describe(path):
    """What a file is, in a few words, for an error message: "an HTML page of 45 bytes"."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return f"an HTML page of {size} bytes"
    if zipfile.is_zipfile(path):
        return f"a zip archive of {size} bytes"
    return f"a file of {size} bytes"


def checkpoint_problem(path):
    """None for a torch file holding a state dict (or a checkpoint dict with one under 'model')."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - whatever fails to load is not a checkpoint
        return "a checkpoint (a torch file that loads with weights_only=True)"
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not (isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values())):
        return "a checkpoint (a torch file holding a state dict)"
    return None


def batch_problem(path):
    """None for an npz holding finite mu (2048,) and sigma (2048, 2048), as the ADM reference batches do."""
    try:
        with np.load(path) as batch:
            mu, sigma = batch["mu"], batch["sigma"]
    except Exception:  # noqa: BLE001 - not an npz, no mu or sigma, pickled objects
        return "FID statistics (an npz with mu and sigma)"
    if mu.shape != (2048,) or sigma.shape != (2048, 2048) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        return f"FID statistics of Inception's 2048 features (it holds mu {mu.shape}, sigma {sigma.shape}" + (
            "" if np.isfinite(mu).all() and np.isfinite(sigma).all() else ", not all finite") + ")"
    return None


def download_pretrained(name, dest_dir="pretrained_models", url=None):
    """pretrained_models/<name>/checkpoint-last.pth (usable as --resume pretrained_models/<name>)."""
    if name not in CHECKPOINTS:
        raise UserError(f"unknown released model {name!r}; the released models are: {', '.join(CHECKPOINTS)}")
    path = os.path.join(dest_dir, name, CHECKPOINT_NAME)
    if os.path.exists(path):
        return path
    return download(url or RELEASED[name]["url"], path, check=checkpoint_problem)


def download_fid_stats(name, dest_dir="fid_stats", url=None):
    """fid_stats/<name>.npz holding the reference batch's `mu` and `sigma` (a few tens of MB),
    read from the ADM reference batch (which also holds 10,000 images; removed afterwards)."""
    if name not in STATS:
        raise UserError(f"unknown statistics {name!r}; available: {', '.join(STATS)}")
    path = os.path.join(dest_dir, f"{name}.npz")
    if os.path.exists(path):
        return path
    url = check_url(url or STATS[name])
    batch = download(url, os.path.join(dest_dir, f"{name}_reference_batch.npz"), check=batch_problem)
    with np.load(batch) as ref:
        mu, sigma = ref["mu"], ref["sigma"]
    from util.fid import save_fid_stats
    save_fid_stats(path, mu, sigma)
    os.remove(batch)
    return path


def main(argv=None):
    """The command; returns its exit code (2 after a bad input, printed as one line)."""
    return run_command(lambda: fetch(argv))


def fetch(argv):
    p = Parser(prog="python -m util.download", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+", help=f"any of: {', '.join(CHECKPOINTS + tuple(STATS))}, or all "
                                            "(the five checkpoints)")
    p.add_argument("--url", default=None, help="download from this URL instead (one name only)")
    args = p.parse_args(argv)
    names = [n for name in args.names for n in (CHECKPOINTS if name == "all" else [name])]
    if args.url and len(names) > 1:
        raise UserError("--url goes with one name")
    for name in names:
        get = download_fid_stats if name in STATS else download_pretrained
        print(f"{name}: {get(name, url=args.url)}")


if __name__ == "__main__":
    sys.exit(main())
