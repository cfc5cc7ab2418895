"""util/download.py against a local HTTP server that honours Range requests."""
import http.server
import io
import os
import threading

import numpy as np
import pytest

from models.fractalgen import RELEASED
from util.download import CHECKPOINTS, DownloadError, download, download_fid_stats, download_pretrained, main
from util.fid import load_fid_stats

PAYLOAD = bytes(range(256)) * 400


class RangeHandler(http.server.BaseHTTPRequestHandler):
    files, ranges = {}, []

    def do_GET(self):
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
    with pytest.raises(DownloadError, match="expected 99"):
        download(f"{server}/short.pth", path, expected_size=99)
    assert not os.path.exists(path)
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{server}/missing.pth", str(tmp_path / "m.pth"))
    with pytest.raises(DownloadError, match="offline"):
        download("http://127.0.0.1:9/x.pth", str(tmp_path / "x.pth"))  # port 9: nothing listens


def test_fid_stats_from_a_reference_batch(server, tmp_path):
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    np.savez(buffer, arr_0=np.zeros((4, 8, 8, 3), np.uint8), mu=rng.normal(size=2048),
             sigma=np.eye(2048), mu_s=np.zeros(3))
    RangeHandler.files["/VIRTUAL_imagenet64_labeled.npz"] = buffer.getvalue()
    path = download_fid_stats("adm_in64_stats", str(tmp_path), url=f"{server}/VIRTUAL_imagenet64_labeled.npz")
    mu, sigma = load_fid_stats(path)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    assert os.listdir(tmp_path) == ["adm_in64_stats.npz"]


def test_checkpoints(server, tmp_path, capsys):
    RangeHandler.files["/fractalmar_in64.pth"] = PAYLOAD
    path = download_pretrained("fractalmar_in64", str(tmp_path), url=f"{server}/fractalmar_in64.pth")
    assert path == str(tmp_path / "fractalmar_in64" / "checkpoint-last.pth")
    assert download_pretrained("fractalmar_in64", str(tmp_path)) == path  # already there: no URL needed
    assert main(["fractalmar_in6"]) == 2
    assert "fractalmar_huge_in256" in capsys.readouterr().err


def test_released_checkpoints_need_no_url(server, tmp_path, monkeypatch):
    """`python -m util.download NAME` and `all` fetch from the recorded URLs (here pointed at the local server)."""
    assert all(RELEASED[name]["url"].startswith("https://www.dropbox.com/") for name in CHECKPOINTS)
    for name in CHECKPOINTS:
        RangeHandler.files[f"/{name}.pth"] = name.encode() * 100
        monkeypatch.setitem(RELEASED[name], "url", f"{server}/{name}.pth")
    monkeypatch.chdir(tmp_path)
    assert main(["fractalar_in64"]) == 0
    assert open("pretrained_models/fractalar_in64/checkpoint-last.pth", "rb").read() == b"fractalar_in64" * 100
    assert main(["all"]) == 0
    for name in CHECKPOINTS:
        assert open(f"pretrained_models/{name}/checkpoint-last.pth", "rb").read() == name.encode() * 100
