"""Data-parallel training under torchrun (Gloo, CPU): two processes against one process that
follows the same sharded order, the table's shards, what crosses the network, a killed rank.

Every torchrun launch costs a few seconds of imports per process; the file starts three.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_setup import (BATCH, EVAL, N, SEED, STEPS, WORLD, build, config, eval_rows,  # noqa: E402
                        noise, split)

from ppl_vae import batching, checkpoint, cli, guides  # noqa: E402
from ppl_vae.build import build_objective  # noqa: E402
from ppl_vae.evaluate import evaluate_model  # noqa: E402
from ppl_vae.optim import make_optimizers  # noqa: E402

from helpers import TINY, assert_one_error_line, call  # noqa: E402

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(WORLD), *map(str, args)]
    return subprocess.Popen(cmd, env=ENV, **popen)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Each guide trained for STEPS steps by 2 processes (tests/dist_worker.py)."""
    out = tmp_path_factory.mktemp("dist")
    proc = torchrun(HERE / "dist_worker.py", out, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT)
    log = proc.communicate(timeout=240)[0].decode()
    assert proc.returncode == 0, log[-3000:]
    return {name: [torch.load(out / f"{name}.rank{r}.pt", weights_only=True)
                   for r in range(WORLD)] for name in ("amortized", "meanfield")}


def one_process(name: str):
    """One process, the same sampler asked for every shard: each step sums the shards' losses
    (each divided by W, with that shard's random stream), then one optimizer step."""
    model, guide = build(name)
    c = config(name)
    opts = make_optimizers(model, guide, c.lr, c.local_lr, c.inner_steps)
    objective = build_objective(c)
    rngs = []
    for r in range(WORLD):
        torch.manual_seed(SEED + 2 + 7919 * r)
        rngs.append(torch.get_rng_state())
    shards = batching.Shards(N, WORLD, BATCH)
    noises = [noise(r) for r in range(WORLD)]
    streams = [shards.batches(split(), noises, SEED * 100_003, [r]) for r in range(WORLD)]
    tables = opts.tables()
    losses = [[] for _ in range(WORLD)]
    for _ in range(STEPS):
        batches = [next(s) for s in streams]
        for r, batch in enumerate(batches):  # inner steps: each shard's rows alone
            torch.set_rng_state(rngs[r])
            for _ in range(opts.inner_steps if tables else 0):
                loss = guide.training_loss(objective, model, batch)
                for table, grad in zip(tables, torch.autograd.grad(loss / WORLD, tables)):
                    table.grad = grad
                opts.local.step()
                for table in tables:
                    table.grad = None
            rngs[r] = torch.get_rng_state()
        opts.zero_grad()
        for r, batch in enumerate(batches):  # the joint step: gradients summed over shards
            torch.set_rng_state(rngs[r])
            loss = guide.training_loss(objective, model, batch)
            (loss / WORLD).backward()
            losses[r].append(float(loss.detach()))
            rngs[r] = torch.get_rng_state()
        opts.step()
    return model, guide, losses


# float32 sums in another order (all-reduce vs autograd's accumulation), amplified by Adam's
# division by sqrt(v) for near-zero gradients: over 20 steps the networks and losses stay
# within 1e-4 relative; table rows (which move by up to local_lr = 0.2 a step) within 1e-4
# absolute (measured: 4.7e-5 at most)
RTOL, ATOL = 1e-4, 1e-6
TABLE_ATOL = 1e-4


@pytest.mark.parametrize("name", ["amortized", "meanfield"])
def test_two_processes_equal_one_process_on_the_same_sharded_order(two_processes, name):
    runs = two_processes[name]
    model, guide, losses = one_process(name)
    for r, run in enumerate(runs):
        assert len(run["losses"]) == STEPS
        torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(losses[r]),
                                   rtol=RTOL, atol=ATOL)
        for key, value in model.state_dict().items():  # replicated networks
            torch.testing.assert_close(run["model"][key], value, rtol=RTOL, atol=ATOL)
    for key, value in guide.state_dict().items():
        if name == "amortized":
            for run in runs:
                torch.testing.assert_close(run["guide"][key], value, rtol=RTOL, atol=ATOL)
        else:  # each rank's shard holds exactly its rows: i mod W = rank, in order
            for r, run in enumerate(runs):
                torch.testing.assert_close(run["guide"][key], value[r::WORLD],
                                           rtol=RTOL, atol=TABLE_ATOL)


@pytest.mark.parametrize("name", ["amortized", "meanfield"])
def test_distributed_evaluation_equals_one_process(two_processes, name):
    """Held-out fits, ELBOs and log p(x) of 4 units on 2 processes, gathered on rank 0, equal
    one process evaluating the same units (same seeds) up to float rounding."""
    run = two_processes[name][0]
    assert two_processes[name][1]["eval"] is None  # rank 1 hands its rows to rank 0
    model, guide = build(name)
    model.load_state_dict(run["model"])
    if name == "amortized":
        guide.load_state_dict(run["guide"])  # a per-datapoint guide fits held-out rows anew
    results = evaluate_model(model, guide, eval_rows(), **EVAL).to_json()
    assert run["eval"].keys() == results.keys()
    for key, value in results.items():
        if isinstance(value, float) and "seconds" not in key:
            assert run["eval"][key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    assert run["eval"]["local_steps"] == results["local_steps"]


def test_table_shards_untouched_rows_and_what_crosses_the_network(two_processes):
    runs = two_processes["meanfield"]
    for r, run in enumerate(runs):
        table, before = run["guide"]["params"], run["table0"]
        assert table.shape == (N // WORLD, before.shape[1])  # N / W rows per rank
        moved = (table != before).any(1)
        assert moved.sum() == STEPS * BATCH  # the rows of its 20 batches, no other
        assert torch.equal(table[~moved], before[~moved])  # untouched rows: bitwise
        # in training only the networks' gradients (+ the guard's flag) are all-reduced,
        # one call per step, and the epoch's loss once: no table row is ever sent
        net = (run["network_numel"] + 1) * 4
        assert run["calls"] == [("all_reduce", net)] * STEPS + [("all_reduce", 4)]
        assert run["sync_calls"] == STEPS and run["sync_bytes"] == STEPS * net


TOY = ["--train-size", "1024", "--valid-size", "16", "--test-size", "16", "--hidden", "8",
       "--latent-dim", "2", "--batch-size", "32", "--device", "cpu", "--guide", "meanfield"]


def test_a_killed_rank_stops_the_run_and_resume_continues(tmp_path, capsys):
    with open(tmp_path / "log", "wb") as log:
        _kill_and_resume(tmp_path, tmp_path / "run", log, capsys)


def _kill_and_resume(tmp_path, out, log, capsys):
    proc = torchrun("-m", "ppl_vae", "train", *TOY, "--epochs", "100000", "--out", out,
                    stdout=log, stderr=log)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() or len(
            (out / "metrics.jsonl").read_text().splitlines()) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, \
            (tmp_path / "log").read_text()[-3000:]
        time.sleep(0.1)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
                             ).stdout.split()
    assert len(workers) == WORLD
    os.kill(int(workers[-1]), signal.SIGKILL)  # one rank dies mid-epoch
    assert proc.wait(timeout=120) != 0  # torchrun stops the other and fails the run
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
            f"/proc/{pid}/status").read_text()
    state = checkpoint.load(out)
    assert state is not None and state["world_size"] == WORLD
    saved = len(state["history"])
    assert state["guide"]["params"].shape[0] == 1024  # the whole table, gathered
    resumed = torchrun("-m", "ppl_vae", "train", *TOY, "--epochs", str(saved + 1), "--out", out,
                       "--resume", stdout=log, stderr=log)
    assert resumed.wait(timeout=180) == 0, (tmp_path / "log").read_text()[-3000:]
    assert json.loads((out / "summary.json").read_text())["epochs"] == saved + 1
    # one process cannot resume it: the world size decides the order and the shards
    capsys.readouterr()
    assert cli.main(["train", *TOY, "--epochs", str(saved + 2), "--out", str(out),
                     "--resume"]) == 2
    err = capsys.readouterr().err
    assert "nproc-per-node 2" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow  # three torchrun launches
def test_resume_with_the_same_world_size_is_exact(tmp_path):
    """2 epochs, then --resume to 3, equal 3 epochs in one go, bitwise (both guides' pieces:
    networks, the gathered table, its RowAdam state, every process's random state)."""
    def run(out, epochs, *extra):
        proc = torchrun("-m", "ppl_vae", "train", *TOY, "--epochs", epochs, "--out", out,
                        *extra, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert proc.wait(timeout=240) == 0, proc.stderr.read().decode()[-3000:]
        proc.stderr.close()
        return checkpoint.load(out)
    straight = run(tmp_path / "a", 3)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 3, "--resume")
    for key in ("model", "guide"):
        for name, value in straight[key].items():
            assert torch.equal(value, resumed[key][name]), (key, name)
    local = straight["optimizers"][-1]["state"]
    for k, st in local.items():
        for name, value in st.items():
            assert torch.equal(value, resumed["optimizers"][-1]["state"][k][name]), name
    assert [m["train_elbo"] for m in straight["history"]] == \
        [m["train_elbo"] for m in resumed["history"]]


@pytest.mark.slow  # three torchrun launches
def test_two_nodes_train_what_one_node_with_two_processes_trains(tmp_path):
    """The several-machines launch (README), as two torchrun agents on this machine with a
    c10d rendezvous: each "node" runs one process with LOCAL_RANK 0; the run equals the
    one-node 2-process run bitwise, and --resume works across the two agents."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def nodes(out, epochs, rdzv_id, *extra):
        procs = [subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
             "--nproc-per-node", "1", "--rdzv-backend", "c10d",
             "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", rdzv_id,
             "-m", "ppl_vae", "train", *TOY, "--epochs", str(epochs), "--out", str(out), *extra],
            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
        errs = [p.communicate(timeout=240)[1].decode() for p in procs]
        assert [p.returncode for p in procs] == [0, 0], errs[0][-2000:] + errs[1][-2000:]

    nodes(tmp_path / "nodes", 1, "a")
    nodes(tmp_path / "nodes", 2, "b", "--resume")
    one = torchrun("-m", "ppl_vae", "train", *TOY, "--epochs", "2", "--out", tmp_path / "one",
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert one.wait(timeout=240) == 0, one.stderr.read().decode()[-3000:]
    one.stderr.close()
    a, b = checkpoint.load(tmp_path / "nodes"), checkpoint.load(tmp_path / "one")
    assert a["world_size"] == b["world_size"] == 2
    for key in ("model", "guide"):
        for name, value in b[key].items():
            assert torch.equal(value, a[key][name]), (key, name)
    assert [m["train_elbo"] for m in a["history"]] == [m["train_elbo"] for m in b["history"]]


@pytest.mark.parametrize("setting,flag", [({"max_seconds": 10.0}, "--max-seconds"),
                                          ({"track_gaps": True}, "--track-gaps")])
def test_settings_a_torchrun_run_cannot_honour_are_refused(setting, flag):
    from ppl_vae.config import Config
    from ppl_vae.errors import UserError
    from ppl_vae.run_setup import _check_distributed
    _check_distributed(Config())  # the defaults are fine
    with pytest.raises(UserError) as e:
        _check_distributed(Config(**setting))
    assert flag in e.value.for_cli() and "torchrun" in str(e.value)


@pytest.mark.parametrize("n,latent", [(101, 4), (9, 12)])  # 12 > 9 rows: noise fills the axes
def test_a_shard_is_built_with_its_rows_only(n, latent):
    """A per-datapoint table built for process r of W allocates its N/W rows, never all N,
    starts as the same rows of the one-process table (PCA axes and scale from every row), and
    a checkpoint's whole table loads into it as its own rows."""
    x = torch.rand(n, 10, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    whole = guides.LocalNormal(n, latent).init_pca(x)
    for rank in range(2):
        torch.manual_seed(3)
        part = guides.LocalNormal(n, latent, rank=rank, world_size=2)
        rows = batching.shard_rows(n, 2, rank)
        assert part.params.shape == (len(rows), 2 * latent)
        part.init_pca(x)
        torch.testing.assert_close(part.params, whole.params[rows], rtol=1e-5, atol=1e-5)
        assert part.shard(rank, 2) is part  # already its shard
        with pytest.raises(ValueError, match="already"):
            part.shard(1 - rank, 2)
        part.load_state_dict({"params": whole.params.detach() + 1})
        assert torch.equal(part.params, whole.params[rows] + 1)


def test_a_resumed_process_maps_the_checkpoint_and_copies_only_its_rows(tmp_path):
    """A torchrun resume maps the gathered checkpoint (``checkpoint.load(mmap=True)``): the
    same tensors as a read, a write to a loaded tensor never reaches the file (copy on
    write), and a shard keeps a copy of its own rows, not a view of the mapping."""
    n, latent = 11, 3
    whole = guides.LocalNormal(n, latent)
    checkpoint.save({"config": {}, "guide": whole.state_dict()}, tmp_path)
    read, mapped = checkpoint.load(tmp_path), checkpoint.load(tmp_path, mmap=True)
    assert torch.equal(read["guide"]["params"], mapped["guide"]["params"])
    part = guides.LocalNormal(n, latent, rank=1, world_size=2)
    part.load_state_dict(mapped["guide"])
    assert torch.equal(part.params, whole.params[batching.shard_rows(n, 2, 1)])
    assert part.params.untyped_storage().data_ptr() != \
        mapped["guide"]["params"].untyped_storage().data_ptr()
    mapped["guide"]["params"].add_(1.0)  # the run's own updates stay in its memory
    assert torch.equal(checkpoint.load(tmp_path)["guide"]["params"], read["guide"]["params"])


# ---------------------------------------------------------------------------------------
# a launcher's environment that torch would answer with a traceback or a long wait
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("env, words", [
    ({"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "abc"},
     ["MASTER_PORT='abc'", "65535"]),
    ({"WORLD_SIZE": "1", "RANK": "0", "MASTER_PORT": "abc"}, ["MASTER_ADDR"]),
    ({"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "70000"},
     ["MASTER_PORT='70000'"]),
], ids=["port-abc", "no-addr", "port-too-large"])
def test_a_bad_master_port_is_one_line(tmp_path, capsys, monkeypatch, env, words):
    for name in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, out, err = call(capsys, "train", *TINY, "--out", tmp_path / "r")
    assert_one_error_line(code, err, out)
    assert all(w in err for w in words), err


def test_an_unresolvable_master_addr_is_one_line_within_seconds(tmp_path):
    """Torch retried an address that does not resolve for a minute and more, warning every
    few seconds; the run is refused at once, in one line naming the variable."""
    env = {**ENV, "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "no.such.host.invalid",
           "MASTER_PORT": "29555"}
    env.pop("LOCAL_RANK", None)
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "ppl_vae", "train", "--train-size", "100",
                               "--epochs", "1", "--out", str(tmp_path / "r")],
                              env=env, capture_output=True, text=True, timeout=45)
    except subprocess.TimeoutExpired:
        pytest.fail("no answer within 45 s")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error:") and proc.stderr.count("\n") == 1, proc.stderr
    assert "MASTER_ADDR='no.such.host.invalid'" in proc.stderr
    assert time.monotonic() - start < 40


def test_a_resolver_that_does_not_answer_is_refused_after_its_timeout(monkeypatch):
    import socket

    from ppl_vae import distributed
    from ppl_vae.errors import UserError
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: time.sleep(30))
    start = time.monotonic()
    with pytest.raises(UserError, match="did not resolve within 0.5 s"):
        distributed.check_address("slow.example", 29500, timeout_s=0.5)
    assert time.monotonic() - start < 5
    monkeypatch.undo()
    distributed.check_address("127.0.0.1", 29500)


@pytest.mark.parametrize("env, words", [
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR"),
    ({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "abc"}, "LOCAL_RANK"),
    ({"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, "RANK"),
])
def test_a_broken_launcher_environment_is_one_line(tmp_path, capsys, monkeypatch, env, words):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, out, err = call(capsys, "train", *TINY, "--out", tmp_path / "r")
    assert_one_error_line(code, err, out)
    assert words in err
