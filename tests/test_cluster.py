"""Runs as a cluster runs them, on one machine (CPU, gloo): two torchrun agents as two nodes, SLURM-style
plain processes, a node that does not see the shared --output_dir (a private mount), short process-group
timeouts, and the output folder's lock where flock does not work."""
import glob
import os
import socket
import subprocess
import sys

import pytest

from helpers import MODEL_ARGS, ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process: what torchrun sets, and bit-identical


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, nproc=2, timeout=300, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "main_fractalgen.py"] + args
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env or ENV)


def test_uneven_generation_batches_finish_under_a_timeout_shorter_than_a_batch(trained, tmp_path):
    """3 batches over 2 ranks: rank 1 makes a padding batch instead of waiting for rank 0's second one (4-5 s
    here) at the end, so a 3 s process-group timeout is never reached (without the padding: "Timed out
    waiting 3000ms for recv operation")."""
    out = str(tmp_path / "out")
    gen = torchrun(MODEL_ARGS + ["--resume", trained, "--output_dir", out, "--evaluate_gen", "--num_images", "90",
                                 "--gen_bsz", "30", "--num_iter_list", "16,16", "--cfg", "2", "--fid_stats",
                                 "none", "--dist_timeout", "0.05"])
    assert gen.returncode == 0, gen.stderr[-3000:]
    folder, = glob.glob(os.path.join(out, "ariter16-16-*"))
    assert sorted(f for f in os.listdir(folder) if f.endswith(".png")) == [f"{i:05d}.png" for i in range(90)]
    assert "Generation: 90 images in" in gen.stdout


RANK0_WAIT = """
import sys, time, torch
sys.path.insert(0, sys.argv[1])
import util.misc as misc
misc.init_distributed_mode("cpu", timeout_minutes=0.02)  # 1.2 s
if misc.is_main_process():
    time.sleep(4)  # a slow checkpoint write
print(misc.share_from_rank0("saved"), flush=True)
if misc.is_main_process():
    time.sleep(4)
misc.barrier()  # a plain collective: the other rank gives up after 1.2 s
"""


def test_work_on_rank0_alone_is_waited_for_beyond_the_process_group_timeout(tmp_path):
    """share_from_rank0 (after a checkpoint write, a folder clean-up, rank 0's report) waits longer than
    --dist_timeout; a plain barrier does not (so the timeout is really that short)."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", RANK0_WAIT, ROOT], text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env={**ENV, "RANK": str(r), "WORLD_SIZE": "2",
                                                             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(o.splitlines()[0] == "saved" for o in outputs), outputs
    assert procs[1].returncode != 0 and "Timed out waiting 1200ms" in outputs[1], outputs[1][-2000:]
