"""Download the released checkpoints and the ADM reference statistics, resuming partial downloads.

    python -m util.download fractalmar_in64                     # -> pretrained_models/fractalmar_in64/checkpoint-last.pth
    python -m util.download all                                 # the five released checkpoints
    python -m util.download fractalmar_in64 --url URL          # the same, from a mirror you give
    python -m util.download adm_in256_stats                     # -> fid_stats/adm_in256_stats.npz (mu, sigma)

A download goes to `<file>.part` and is renamed only when complete (and of the expected size, when
known), so an interrupted download is continued with an HTTP Range request, never used half-done.

The ADM statistics come from the reference batches of Dhariwal & Nichol (2021), whose `mu` and `sigma`
(2048-d Inception pool features) are kept in a small npz. The released checkpoints' URLs are those
of the release's README, kept with the other facts of each model in models.fractalgen.RELEASED.
"""
import argparse
import os
import sys
import urllib.error
import urllib.request

import numpy as np
from tqdm import tqdm

from models.fractalgen import RELEASED
from util.checkpoint import NAME as CHECKPOINT_NAME

ADM_BATCHES = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet"
CHECKPOINTS = tuple(RELEASED)
STATS = {"adm_in64_stats": f"{ADM_BATCHES}/64/VIRTUAL_imagenet64_labeled.npz",
         "adm_in256_stats": f"{ADM_BATCHES}/256/VIRTUAL_imagenet256_labeled.npz"}


class DownloadError(RuntimeError):
    """A download that cannot be done, with what to do instead."""


def download(url, path, expected_size=None, chunk=1 << 20):
    """Fetch url to path (resuming path.part), with a progress bar; returns path."""
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    part = path + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"User-Agent": "Wget/1.21"}  # Dropbox sends the file itself, not its web page, to wget
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part file already holds everything
            return finish(part, path, expected_size)
        raise DownloadError(f"{url} answered HTTP {e.code}: check the URL, or download it by hand to {path}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"cannot reach {url} ({getattr(e, 'reason', e)}): this machine looks offline; "
                            f"download the file elsewhere and copy it to {path}") from None
    with response:
        if have and response.status != 206:  # the server ignored the range: start again
            have = 0
        total = have + int(response.headers.get("Content-Length", 0)) or None
        with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                             desc=os.path.basename(path)) as bar:
            while block := response.read(chunk):
                f.write(block)
                bar.update(len(block))
    return finish(part, path, expected_size or total)


def finish(part, path, expected_size):
    size = os.path.getsize(part)
    if expected_size is not None and size != expected_size:
        raise DownloadError(f"{part} has {size} bytes, expected {expected_size}: run the command again to "
                            "continue the download, or delete the .part file to start over")
    os.replace(part, path)
    return path


def download_pretrained(name, dest_dir="pretrained_models", url=None):
    """pretrained_models/<name>/checkpoint-last.pth (usable as --resume pretrained_models/<name>)."""
    if name not in CHECKPOINTS:
        raise DownloadError(f"unknown released model {name!r}; the released models are: {', '.join(CHECKPOINTS)}")
    path = os.path.join(dest_dir, name, CHECKPOINT_NAME)
    if os.path.exists(path):
        return path
    return download(url or RELEASED[name]["url"], path)


def download_fid_stats(name, dest_dir="fid_stats", url=None):
    """fid_stats/<name>.npz holding the reference batch's `mu` and `sigma` (a few tens of MB),
    read from the ADM reference batch (which also holds 10,000 images; removed afterwards)."""
    if name not in STATS:
        raise DownloadError(f"unknown statistics {name!r}; available: {', '.join(STATS)}")
    path = os.path.join(dest_dir, f"{name}.npz")
    if os.path.exists(path):
        return path
    batch = download(url or STATS[name], os.path.join(dest_dir, os.path.basename(url or STATS[name])))
    with np.load(batch) as ref:
        if "mu" not in ref or "sigma" not in ref:
            raise DownloadError(f"{batch} holds no mu and sigma: it is not an ADM reference batch")
        np.savez(path + ".tmp.npz", mu=ref["mu"], sigma=ref["sigma"])
    os.replace(path + ".tmp.npz", path)
    os.remove(batch)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+", help=f"any of: {', '.join(CHECKPOINTS + tuple(STATS))}, or all "
                                            "(the five checkpoints)")
    p.add_argument("--url", default=None, help="download from this URL instead (one name only)")
    args = p.parse_args(argv)
    names = [n for name in args.names for n in (CHECKPOINTS if name == "all" else [name])]
    if args.url and len(names) > 1:
        p.error("--url goes with one name")
    try:
        for name in names:
            fetch = download_fid_stats if name in STATS else download_pretrained
            print(f"{name}: {fetch(name, url=args.url)}")
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
