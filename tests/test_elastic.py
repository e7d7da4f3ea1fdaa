"""torchrun restarts: a worker SIGKILLed mid-epoch (``train.debug_kill_at_step``) under ``--max-restarts=1`` comes back,
the group re-forms (gloo, 2 processes on this machine), resumes from the last checkpoint and ends with the weights of
an uninterrupted run. Real torchrun agents, real processes, the tiny toy dataset."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from test_train import PY, REPO, final_weights, run, toy, train_cmd  # noqa: F401 (toy is a fixture)

# 32 clips, 2 ranks x 4 clips: 4 optimizer steps per epoch, a checkpoint after each epoch. Rank 1 is killed after
# step 6 (mid-epoch 2), so the restarted workers resume from the epoch-1 checkpoint (step 4) and replay steps 5-8.
KILL = ["train.eval_period=0", "train.checkpoint_period=1", "dist.timeout_s=60", "train.debug_kill_at_step=6",
        "train.debug_kill_rank=1"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_resumed_to_the_reference(out: Path, ref: Path) -> None:
    found = records(out)
    starts = [(r["epoch"], r["step"]) for r in found if r["event"] == "start"]
    assert starts == [(1, 0), (2, 4)]  # the restart began at epoch 2 (1-based), from the checkpoint's step 4
    assert [r["epoch"] for r in found if r["event"] == "epoch"] == [1, 2]  # each epoch once
    end = found[-1]
    assert end["event"] == "end" and end["step"] == 8 and len(set(end["param_digests"])) == 1
    a, b = final_weights(ref), final_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "restarted run ended elsewhere"


def test_ranks_agree_on_a_fresh_namespace_over_an_earlier_attempts_keys(monkeypatch):
    """``attempt_store`` on a store an earlier attempt left its tokens and agreement in: rank 0 starts first and
    acknowledges the set holding rank 1's stale token; rank 1 joins later; both settle on the set of the two new
    tokens."""
    import datetime
    import hashlib
    import threading

    import torch.distributed as dist

    from timesformer_harness.distributed import attempt_store

    def digest(*tokens: bytes) -> str:
        return hashlib.sha256(b",".join(tokens)).hexdigest()[:16]

    timeout = datetime.timedelta(seconds=20)
    server = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, timeout=timeout)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    for r in (0, 1):  # what the earlier attempt left
        server.set(f"harness/token/{r}", f"old{r}")
        server.set(f"harness/ack/{digest(b'old0', b'old1')}/{r}", "")
    found: dict[int, dist.Store] = {}
    first = threading.Thread(target=lambda: found.update({0: attempt_store(0, 2, timeout)}))
    first.start()
    while server.get("harness/token/0") == b"old0":
        time.sleep(0.01)
    time.sleep(0.3)  # rank 0 polls, reading rank 1's stale token
    found[1] = attempt_store(1, 2, timeout)
    first.join(timeout=30)
    new0, new1 = server.multi_get(["harness/token/0", "harness/token/1"])
    assert server.check([f"harness/ack/{digest(new0, b'old1')}/0"])  # rank 0 did see the stale set first
    found[0].set("probe", "from rank 0")
    assert found[1].get("probe") == b"from rank 0"  # one namespace, both ranks
    assert server.get(f"harness/attempt/{digest(new0, new1)}/probe") == b"from rank 0"  # that of the new tokens


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory) -> Path:
    """An uninterrupted 2-process run of the same config."""
    ref = tmp_path_factory.mktemp("elastic") / "ref"
    res = run(train_cmd(*toy, *KILL[:3], f"output.dir={ref}", nproc=2), timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    return ref


def test_a_sigkilled_worker_restarts_and_resumes_to_the_uninterrupted_weights(toy, reference, tmp_path):
    out = tmp_path / "killed"
    cmd = train_cmd(*toy, *KILL, f"output.dir={out}", nproc=2)
    cmd.insert(cmd.index("--standalone") + 1, "--max-restarts=1")
    res = run(cmd, timeout=240)  # a hang here (the restarted group never forming) fails the test
    assert res.returncode == 0, res.stderr[-4000:]
    assert "(exitcode: -9) local_rank: 1" in res.stderr  # the agent saw rank 1 SIGKILLed and restarted the group
    resumed = f"resumed from {out / 'checkpoints' / 'checkpoint_epoch_00001.pyth'}: 1 epoch(s) and 0 batch(es) done"
    assert f"{resumed}, step 4" in res.stderr
    assert "connectFullMesh" not in res.stderr
    assert_resumed_to_the_reference(out, reference)


def test_two_agents_one_process_each_restart_and_resume(toy, reference, tmp_path):
    """The multi-node path on one machine: two torchrun agents (--nnodes=2, c10d rendezvous on localhost). The agent
    whose worker was killed counts a restart; the other restarts its worker without counting one (so
    TORCHELASTIC_RESTART_COUNT differs between them), and the group still re-forms and resumes."""
    out = tmp_path / "killed"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agent = [PY, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--max-restarts=1",
             "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=elastic-test", "harness/train.py",
             *toy, *KILL, f"output.dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    logs = [tmp_path / f"agent{n}.log" for n in (0, 1)]
    procs = [subprocess.Popen(agent, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
             for log in logs]
    try:
        codes = [p.wait(timeout=240) for p in procs]  # a hang (the group never re-forming) fails the test
    finally:
        for p in procs:
            p.kill()
    text = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(t[-3000:] for t in text)
    assert sum("(exitcode: -9) local_rank: 0" in t for t in text) == 1  # one agent's worker was SIGKILLed
    resumed = f"resumed from {out / 'checkpoints' / 'checkpoint_epoch_00001.pyth'}: 1 epoch(s) and 0 batch(es) done"
    assert f"{resumed}, step 4" in "".join(text)
    assert_resumed_to_the_reference(out, reference)
