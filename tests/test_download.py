"""util/download.py against a local HTTP server that honours Range requests."""
import http.server
import io
import os
import threading

import numpy as np
import pytest

from models.fractalgen import RELEASED
import util.download
from util.download import CHECKPOINTS, download, download_fid_stats, download_pretrained, main
from util.misc import UserError
from util.fid import load_fid_stats

PAYLOAD = bytes(range(256)) * 400


def torch_file(obj):
    import torch
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def reference_batch(mu, sigma):
    buffer = io.BytesIO()
    np.savez(buffer, arr_0=np.zeros((4, 8, 8, 3), np.uint8), mu=mu, sigma=sigma, mu_s=np.zeros(3))
    return buffer.getvalue()


HTML = b"<!DOCTYPE html><html><body>Sign in</body></html>"


class RangeHandler(http.server.BaseHTTPRequestHandler):
    files, ranges = {}, []

    def do_GET(self):
        if self.path == "/stalled":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.wfile.flush()
            threading.Event().wait(5)
            return
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if "Range" in self.headers:
            start = int(self.headers["Range"].split("=")[1].rstrip("-"))
            self.ranges.append(start)
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_and_resume(server, tmp_path):
    RangeHandler.files["/ckpt.pth"] = PAYLOAD
    path = str(tmp_path / "a" / "ckpt.pth")
    assert open(download(f"{server}/ckpt.pth", path, len(PAYLOAD)), "rb").read() == PAYLOAD

    resumed = str(tmp_path / "b.pth")
    with open(resumed + ".part", "wb") as f:  # an interrupted download
        f.write(PAYLOAD[:1000])
    RangeHandler.ranges.clear()
    download(f"{server}/ckpt.pth", resumed, len(PAYLOAD))
    assert RangeHandler.ranges == [1000] and open(resumed, "rb").read() == PAYLOAD
    assert not os.path.exists(resumed + ".part")


def test_wrong_size_missing_file_and_offline_are_clear(server, tmp_path):
    RangeHandler.files["/short.pth"] = PAYLOAD[:10]
    path = str(tmp_path / "short.pth")
    with pytest.raises(UserError, match="expected 99"):
        download(f"{server}/short.pth", path, expected_size=99)
    assert not os.path.exists(path)
    with pytest.raises(UserError, match="HTTP 404"):
        download(f"{server}/missing.pth", str(tmp_path / "m.pth"))
    with pytest.raises(UserError, match="offline"):
        download("http://127.0.0.1:9/x.pth", str(tmp_path / "x.pth"))  # port 9: nothing listens


def test_fid_stats_from_a_reference_batch(server, tmp_path):
    rng = np.random.default_rng(0)
    RangeHandler.files["/VIRTUAL_imagenet64_labeled.npz"] = reference_batch(rng.normal(size=2048), np.eye(2048))
    path = download_fid_stats("adm_in64_stats", str(tmp_path), url=f"{server}/VIRTUAL_imagenet64_labeled.npz")
    mu, sigma = load_fid_stats(path)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    assert os.listdir(tmp_path) == ["adm_in64_stats.npz"]


def test_checkpoints(server, tmp_path, capsys):
    import torch
    RangeHandler.files["/fractalmar_in64.pth"] = torch_file({"model": {"w": torch.ones(2)}})
    path = download_pretrained("fractalmar_in64", str(tmp_path), url=f"{server}/fractalmar_in64.pth")
    assert path == str(tmp_path / "fractalmar_in64" / "checkpoint-last.pth")
    assert download_pretrained("fractalmar_in64", str(tmp_path)) == path  # already there: no URL needed
    assert main(["fractalmar_in6"]) == 2
    assert "fractalmar_huge_in256" in capsys.readouterr().err


def test_released_checkpoints_need_no_url(server, tmp_path, monkeypatch):
    """`python -m util.download NAME` and `all` fetch from the recorded URLs (here pointed at the local server)."""
    assert all(RELEASED[name]["url"].startswith("https://www.dropbox.com/") for name in CHECKPOINTS)
    import torch
    for name in CHECKPOINTS:
        RangeHandler.files[f"/{name}.pth"] = torch_file({"model": {name: torch.ones(1)}})
        monkeypatch.setitem(RELEASED[name], "url", f"{server}/{name}.pth")
    monkeypatch.chdir(tmp_path)
    assert main(["fractalar_in64"]) == 0
    assert open("pretrained_models/fractalar_in64/checkpoint-last.pth", "rb").read() == RangeHandler.files[
        "/fractalar_in64.pth"]
    assert main(["all"]) == 0
    for name in CHECKPOINTS:
        assert open(f"pretrained_models/{name}/checkpoint-last.pth", "rb").read() == RangeHandler.files[f"/{name}.pth"]


# ----------------------------------------------------------------------------- what arrives is checked
def test_a_web_page_is_never_kept_as_a_checkpoint(server, tmp_path, monkeypatch, capsys):
    RangeHandler.files["/share"] = HTML
    argv = ["fractalmar_in64", "--url", f"{server}/share"]
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # and a second run does not take it for downloaded
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
        assert err.startswith("error: ") and f"sent an HTML page of {len(HTML)} bytes, not a checkpoint" in err
        assert os.listdir(tmp_path / "pretrained_models" / "fractalmar_in64") == []


@pytest.mark.parametrize("mu, sigma, message", [
    (np.zeros(64), np.eye(64), r"it holds mu \(64,\), sigma \(64, 64\)"),
    (np.full(2048, np.nan), np.eye(2048), "not all finite")], ids=["64-d", "nan"])
def test_statistics_that_are_not_inceptions_are_refused(server, tmp_path, mu, sigma, message):
    RangeHandler.files["/batch.npz"] = reference_batch(mu, sigma)
    with pytest.raises(UserError, match=message):
        download_fid_stats("adm_in64_stats", str(tmp_path), url=f"{server}/batch.npz")
    assert os.listdir(tmp_path) == []
    RangeHandler.files["/page.npz"] = HTML
    with pytest.raises(UserError, match="sent an HTML page of .* not FID statistics"):
        download_fid_stats("adm_in64_stats", str(tmp_path), url=f"{server}/page.npz")


def test_bad_url_stalled_server_and_a_url_ending_in_a_slash(server, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["adm_in64_stats", "--url", "notaurl"]) == 2
    assert "--url notaurl is not a URL" in capsys.readouterr().err and os.listdir(tmp_path) == []
    monkeypatch.setattr(util.download, "TIMEOUT", 1)
    with pytest.raises(UserError, match=r"sent nothing for 1 s: run the same command again to continue"):
        download(f"{server}/stalled", str(tmp_path / "s.pth"))
    assert os.path.getsize(tmp_path / "s.pth.part") == 10  # kept, to continue from
    rng = np.random.default_rng(0)
    RangeHandler.files["/dir/"] = reference_batch(rng.normal(size=2048), np.eye(2048))
    path = download_fid_stats("adm_in64_stats", str(tmp_path / "fid_stats"), url=f"{server}/dir/")
    assert os.listdir(tmp_path / "fid_stats") == ["adm_in64_stats.npz"] and load_fid_stats(path)[0].shape == (2048,)
