"""Runs as a cluster runs them, on one machine (CPU, gloo): two torchrun agents as two nodes, SLURM-style
plain processes, a node that does not see the shared --output_dir (a private mount), short process-group
timeouts, and the output folder's lock where flock does not work."""
import glob
import os
import socket
import subprocess
import sys

import pytest

from helpers import MODEL_ARGS, ROOT, write_image_folder

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
    assert all("saved" in o.splitlines() for o in outputs), outputs
    assert procs[1].returncode != 0 and "Timed out waiting 1200ms" in outputs[1], outputs[1][-2000:]


def two_nodes(args, node1=(), timeout=300):
    """Two torchrun agents on 127.0.0.1 as two nodes of one process each; `node1`: a command prefix for the
    second (e.g. a private mount). Returns (exit code, stdout, stderr) of each agent."""
    port = free_port()
    procs = [subprocess.Popen(list(prefix) + [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
                                               f"--node_rank={node}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
                                               f"--master_port={port}", "main_fractalgen.py"] + args,
                              cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
             for node, prefix in ((0, ()), (1, node1))]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode,) + o for p, o in zip(procs, outputs)]
    finally:
        for p in procs:
            p.kill()


def private_mount(private, folder):
    """A command prefix that runs a command with its own view of `folder` (`private` bound over it): a node
    whose --output_dir is not the shared disk. Skips the test where mount namespaces are refused."""
    if subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {private} {folder}"], capture_output=True).returncode:
        pytest.skip("unshare -m with mount --bind is refused here (needs root)")
    return ["unshare", "-m", "sh", "-c", f'mount --bind "{private}" "{folder}" && exec "$@"', "sh"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp("data")))


@pytest.mark.parametrize("what", ["resume", pytest.param("generate", marks=pytest.mark.slow)])
def test_a_node_that_does_not_see_the_output_dir_stops_every_rank_with_one_line(trained, data, tmp_path, what):
    """Node 1's --output_dir is a folder of its own. Resuming training, it sees no checkpoint where rank 0
    sees one; generating, it has an exact copy of the checkpoint (same size and time) but not the files rank 0
    writes. Every rank stops with exit code 2 and one line naming the host and the folder."""
    import shutil
    out, private = tmp_path / "out", tmp_path / "private"
    out.mkdir()
    private.mkdir()
    shutil.copy2(os.path.join(trained, "checkpoint-last.pth"), out)
    if what == "generate":
        shutil.copy2(os.path.join(trained, "checkpoint-last.pth"), private)
        args = ["--evaluate_gen", "--num_images", "6", "--num_iter_list", "2,2", "--fid_stats", "none"]
    else:
        args = ["--epochs", "2", "--data_path", data]
    runs = two_nodes(MODEL_ARGS + ["--resume", str(out), "--output_dir", str(out)] + args,
                     node1=private_mount(str(private), str(out)), timeout=240)
    hint = "--output_dir must be on a disk every node shares"
    for rc, stdout, stderr in runs:
        assert rc != 0 and "exitcode  : 2" in stderr, stderr[-3000:]
        line, = [l for l in stderr.splitlines() if hint in l] or [stderr[-2000:]]
        assert f"{socket.gethostname()} (rank 1)" in line and str(out) in line, line
    assert not [f for f in os.listdir(out) if f.startswith(".fractalgen-")]  # no check file left behind


# ----------------------------------------------------------------------------- training across nodes
def test_two_nodes_train_as_one_node_and_a_restart_with_fewer_processes_says_what_changed(data, tmp_path, capsys):
    """Two torchrun agents as two nodes of one process each give the weights, optimizer state and BPD of
    one node with two processes, bit for bit. Resuming that run with one process says in one line what
    changed (processes, effective batch, lr); an explicit --lr stays as given."""
    import torch
    common = MODEL_ARGS + ["--data_path", data, "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "1",
                           "--final_nll", "--nll_bsz", "3"]
    one, two = str(tmp_path / "one_node"), str(tmp_path / "two_nodes")
    single = torchrun(common + ["--output_dir", one])
    assert single.returncode == 0, single.stderr[-3000:]
    runs = two_nodes(common + ["--output_dir", two])
    assert all(rc == 0 for rc, _, _ in runs), runs[0][2][-2000:] + runs[1][2][-2000:]
    assert "2 process(es)" in runs[0][1]
    bpd = [float(out.split("BPD: ")[1].split()[0]) for out in (single.stdout, runs[0][1])]
    assert bpd[0] == bpd[1]
    a, b = (torch.load(os.path.join(d, "checkpoint-last.pth"), map_location="cpu", weights_only=False) for d in (one, two))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq"))

    import shutil
    import main_fractalgen
    shutil.copytree(one, one + "_lr")
    lr = 5e-5 * 4 / 256
    for folder, extra, change in (
            (one, [], f"lr {lr:.4g} (--blr 5e-05 × 4 / 256) instead of {2 * lr:.4g}; pass --lr {2 * lr:.4g} to keep "
                      "the old one"),
            (one + "_lr", ["--lr", "0.001"], f"lr 0.001 as given by --lr instead of {2 * lr:.4g}")):
        main_fractalgen.main(main_fractalgen.parse_args(
            MODEL_ARGS + ["--data_path", data, "--batch_size", "4", "--warmup_epochs", "1", "--epochs", "2",
                          "--output_dir", folder, "--resume", folder] + extra))
        said = capsys.readouterr().out
        assert f"The run continues with 1 process(es) instead of 2: effective batch 4 instead of 8, {change}\n" in said
        saved = torch.load(os.path.join(folder, "checkpoint-last.pth"), map_location="cpu", weights_only=False)
        assert saved["epoch"] == 1 and saved["args"].lr == (0.001 if extra else lr)


# ----------------------------------------------------------------------------- SLURM
def test_first_host_of_a_slurm_node_list():
    from util.misc import first_slurm_host
    assert first_slurm_host("node[01-04],other") == "node01"
    assert first_slurm_host("gpu-a[3,5-7]") == "gpu-a3" and first_slurm_host("a-[1-2]-x") == "a-1-x"
    assert first_slurm_host("host1,host2") == "host1" and first_slurm_host("single") == "single"
    assert first_slurm_host("") is None


def test_slurm_ranks_come_from_srun_variables():
    from util.misc import slurm_port, slurm_ranks
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "n[07-08]",
           "SLURM_JOB_ID": "123456"}
    assert slurm_ranks(env) == (5, 8, 1)  # cyclic placement: the device is SLURM_LOCALID, not rank % GPUs
    assert env["MASTER_ADDR"] == "n07" and env["MASTER_PORT"] == str(slurm_port(123456))
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    kept = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "MASTER_ADDR": "head", "MASTER_PORT": "29500"}
    slurm_ranks(kept)
    assert (kept["MASTER_ADDR"], kept["MASTER_PORT"]) == ("head", "29500")


def slurm_env(rank, job_id, nodelist="localhost"):
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank), SLURM_JOB_ID=str(job_id))
    if nodelist:
        env["SLURM_JOB_NODELIST"] = nodelist
    return env


def test_srun_style_plain_processes_train(data, tmp_path):
    """Two plain `python main_fractalgen.py` processes with only srun's variables: MASTER_ADDR from the node
    list, MASTER_PORT from the job id; they train one epoch together."""
    from util.misc import slurm_port
    job_id = next(j for j in range(os.getpid() % 20000, 20000) if port_is_free(slurm_port(j)))
    out = str(tmp_path / "out")
    argv = MODEL_ARGS + ["--data_path", data, "--batch_size", "4", "--epochs", "1", "--output_dir", out]
    procs = [subprocess.Popen([sys.executable, "main_fractalgen.py"] + argv, cwd=ROOT, text=True,
                              env=slurm_env(rank, job_id), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for rank in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-2000:] + outputs[1][-2000:]
    assert "2 process(es)" in outputs[0] and "Training from epoch 0 to 1" in outputs[0]
    assert os.path.exists(os.path.join(out, "checkpoint-last.pth"))


def test_srun_without_a_node_list_says_to_set_master_addr_and_port(monkeypatch):
    import util.misc as misc
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        monkeypatch.delenv(name, raising=False)
    for name, value in slurm_env(0, 1, nodelist=None).items():
        if name.startswith("SLURM_"):
            monkeypatch.setenv(name, value)
    with pytest.raises(misc.UserError, match="no SLURM_JOB_NODELIST.*set MASTER_ADDR and MASTER_PORT"):
        misc.init_distributed_mode("cpu")
    assert not misc.is_dist()


def port_is_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# ----------------------------------------------------------------------------- the lock without flock
NO_FLOCK = """
import errno, fcntl, sys, time
def flock(*args):  # what Lustre or NFS without flock answer
    raise OSError(errno.ENOLCK, "No locks available")
fcntl.flock = flock
sys.path.insert(0, sys.argv[1])
import util.misc as m
m.lock_output_dir(sys.argv[2])
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def no_flock(monkeypatch):
    import errno
    import fcntl

    def flock(*args):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", flock)


def test_without_flock_a_lock_file_keeps_one_run_per_folder_and_a_dead_holders_is_taken_over(tmp_path, no_flock,
                                                                                               capsys):
    import json
    import util.misc as misc
    folder, lock = str(tmp_path), str(tmp_path / misc.LOCK_FILE_NAME)
    holder = subprocess.Popen([sys.executable, "-c", NO_FLOCK, ROOT, folder], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        record = json.load(open(lock))
        assert (record["host"], record["pid"]) == (socket.gethostname(), holder.pid) and record["since"]
        with pytest.raises(misc.UserError, match=f"another run .pid {holder.pid} on .+. is using --output_dir"):
            misc.lock_output_dir(folder)
    finally:
        holder.kill()
        holder.wait()
    misc.lock_output_dir(folder)  # the holder died by SIGKILL: its file is left, and taken over
    assert f"Took over the lock {lock} of pid {holder.pid} on {socket.gethostname()}" in capsys.readouterr().out
    assert json.load(open(lock))["pid"] == os.getpid()
    misc.release_output_dir(folder)
    assert not os.path.exists(lock)
    with open(lock, "w") as f:  # another host's lock: respected, whatever its pid
        json.dump({"host": "other-node", "pid": os.getpid() + 1, "since": "then"}, f)
    with pytest.raises(misc.UserError, match=f"pid {os.getpid() + 1} on other-node, since then.*remove {lock}"):
        misc.lock_output_dir(folder)


@pytest.mark.parametrize("flock", ["works", "unsupported"])
def test_a_lock_file_that_is_a_symlink_is_not_written_through(tmp_path, monkeypatch, flock, request):
    import util.misc as misc
    if flock == "unsupported":
        request.getfixturevalue("no_flock")
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    folder = tmp_path / "out"
    folder.mkdir()
    os.symlink(target, folder / (misc.LOCK_NAME if flock == "works" else misc.LOCK_FILE_NAME))
    with pytest.raises(misc.UserError, match="is a symbolic link; remove it"):
        misc.lock_output_dir(str(folder))
    assert target.read_text() == "keep me"
