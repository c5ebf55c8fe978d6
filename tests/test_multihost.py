"""Two real hosts (network namespaces, each with its own address, host name and disk; tests/multihost.py),
one rank each, running what users run: a tiny OPT causal LM, the lower third frozen (the default), MEFT
under ZeRO-3 with stage3_param_persistence_threshold 0, fp32, gloo over the veth link.

- the deepspeed launcher with --no_ssh on each host: both hosts agree on the losses; every host's disk holds
  complete checkpoints of its own ranks; the adapter export is on rank 0's host;
- a kill while saving a checkpoint (host B dies after writing, before committing; host A commits): the
  same command run again (--resume_from_checkpoint auto) resumes from the newest checkpoint complete on both
  disks and ends on the uninterrupted run's losses (equal to 1e-6);
- ZeRO-2 (whose replicated model-states file DeepSpeed writes on rank 0 only) resumes on separate disks;
- torchrun --nnodes 2, MPICH's mpirun and deepspeed's default pdsh runner (these two over an ssh stand-in)
  give the same losses; 2 hosts x 2 ranks commit per host;
- an exception on one rank, a killed rank and a stopped rank (SIGSTOP): every launcher on every host exits
  non-zero within 60 s of the fault (--ddp_timeout 30), the failing rank's error line names rank and host;
- hosts whose copies of the data differ are refused at start with one line.

Where namespaces cannot be made (not root, no `ip`) the tests skip saying why; under CI (CI=true) that
is a failure instead.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest

from multihost import TwoHosts, unavailable_reason
from train_helpers import BIN, REPO, free_port, launch_env, train_losses, write_multihost_inputs

STEPS, SAVE_STEPS = 6, 2
FAULT_STEP = 3
FAULT_SCRIPT = REPO / "tests" / "fault_worker.py"
RUN_TIMEOUT = 240
FAILURE_LIMIT_S = 60


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    reason = unavailable_reason()
    if reason is not None:
        message = f"two hosts (network namespaces) cannot be created here: {reason}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI must run the multi-host tests)")
        pytest.skip(message)
    root = tmp_path_factory.mktemp("multihost")
    shared = root / "inputs"
    write_multihost_inputs(shared)
    with TwoHosts(root) as made:
        for host in made.hosts:  # each host its own copy, as on separate machines
            shutil.copytree(shared, host.disk, dirs_exist_ok=True)
        (root / "hostfile").write_text("".join(f"{h.name} slots=1\n" for h in made.hosts))
        yield made


def _flags(hosts: TwoHosts, output: str, **extra) -> list:
    disk = hosts.mount_point
    flags = {"model_name_or_path": disk / "model", "train_file": disk / "lm.jsonl",
             "validation_file": disk / "lm.jsonl", "deepspeed": disk / "ds_zero3.json", "max_seq_length": 48,
             "per_device_train_batch_size": 4, "learning_rate": 1e-2, "max_steps": STEPS, "save_steps": SAVE_STEPS,
             "logging_steps": 1, "output_dir": disk / output, "resume_from_checkpoint": "auto", "ddp_timeout": 30}
    flags.update(extra)
    return ["--lm"] + [item for key, value in flags.items() for item in (f"--{key}", value)]


def _launch(hosts: TwoHosts, launcher: str, output: str, fault: str | None = None, **extra):
    """Start the job: one launcher per host (deepspeed --no_ssh, torchrun), or one on host A that reaches host B
    over the ssh stand-in (mpirun, deepspeed's pdsh runner). Returns the started processes."""
    port = free_port()  # any port works inside the namespaces; a fresh one per job avoids TIME_WAIT clashes
    env = launch_env()
    if fault:
        env.update(MEFT_TEST_FAULT=fault, MEFT_TEST_FAULT_TIME_FILE=str(hosts.mount_point / f"{output}.fault_time"))
    if launcher in ("mpirun", "deepspeed-pdsh"):  # one command on host A; an ssh stand-in reaches host B
        ssh = hosts.write_ssh_shim(hosts.root / "bin" / "ssh")
        env["PATH"] = f"{ssh.parent}{os.pathsep}{env['PATH']}"  # pdsh runs `ssh`; deepspeed first checks `ssh <host>`
        if launcher == "mpirun":
            prefix = [BIN / "mpirun", "-launcher", "ssh", "-launcher-exec", ssh,
                      "-hosts", ",".join(h.name for h in hosts.hosts), "-np", 2, "-ppn", 1, sys.executable]
            extra = dict(extra, master_port=port)  # mpirun sets no MASTER_PORT; the script takes this flag
        else:  # deepspeed's default multi-node runner: pdsh, which runs `ssh` from PATH
            prefix = [BIN / "deepspeed", "--hostfile", hosts.root / "hostfile", "--master_addr", hosts.master_addr,
                      "--master_port", port]
        command = prefix + [FAULT_SCRIPT] + _flags(hosts, output, **extra)
        return [hosts.start(0, command, env, log_name=f"{output}-hosta")]
    processes = []
    for host in hosts.hosts:
        if launcher == "deepspeed":
            prefix = [BIN / "deepspeed", "--hostfile", hosts.root / "hostfile", "--no_ssh", "--node_rank", host.index,
                      "--master_addr", hosts.master_addr, "--master_port", port]
        elif launcher == "torchrun":
            prefix = [BIN / "torchrun", "--nnodes", 2, "--nproc_per_node", 1, "--node_rank", host.index,
                      "--master_addr", hosts.master_addr, "--master_port", port]
        else:
            raise KeyError(launcher)
        command = prefix + [FAULT_SCRIPT] + _flags(hosts, output, **extra)
        processes.append(hosts.start(host.index, command, env, log_name=f"{output}-{host.name}"))
    return processes


def _run(hosts: TwoHosts, launcher: str, output: str, fault: str | None = None, timeout: float = RUN_TIMEOUT,
         **extra) -> tuple[list, list[str]]:
    processes = _launch(hosts, launcher, output, fault, **extra)
    codes = hosts.wait(processes, timeout)
    return codes, [p.log_path.read_text() for p in processes]


def _checkpoint_files(host, output: str, step: int) -> set[str]:
    path = host.disk / output / f"checkpoint-{step}"
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def deepspeed_run(hosts):
    start = time.perf_counter()
    codes, logs = _run(hosts, "deepspeed", "ds")
    assert codes == [0, 0], "\n".join(log[-4000:] for log in logs)
    print(f"2 hosts x 1 rank, deepspeed --no_ssh, {STEPS} steps: {time.perf_counter() - start:.1f} s")
    return hosts


@pytest.mark.slow
def test_deepspeed_no_ssh_commits_every_hosts_checkpoint(deepspeed_run):
    a, b = deepspeed_run.hosts
    losses = train_losses(a.disk / "ds")
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in losses.values())
    results = json.loads((a.disk / "ds" / "results.json").read_text())
    assert results["world_size"] == 2 and results["zero_stage"] == 3 and results["global_step"] == STEPS
    for step in range(SAVE_STEPS, STEPS + 1, SAVE_STEPS):
        on_a, on_b = _checkpoint_files(a, "ds", step), _checkpoint_files(b, "ds", step)
        # Each host holds its own rank's RNG state and ZeRO-3 partitions, and the trainer state.
        assert {"trainer_state.json", "rng_state_0.pt"} <= on_a and "rng_state_1.pt" not in on_a
        assert {"trainer_state.json", "rng_state_1.pt"} <= on_b and "rng_state_0.pt" not in on_b
        assert any("zero_pp_rank_0_" in f and "optim_states" in f for f in on_a)
        assert any("zero_pp_rank_1_" in f and "optim_states" in f for f in on_b)
        # Both hosts logged the same (all-rank mean) losses up to that step.
        state_a, state_b = (json.loads((h.disk / "ds" / f"checkpoint-{step}" / "trainer_state.json").read_text())
                            for h in (a, b))
        assert state_a["log_history"] == state_b["log_history"] and state_a["global_step"] == step
    for host in (a, b):
        assert not list((host.disk / "ds").glob(".tmp-*")) and not list((host.disk / "ds").glob(".disk-probe-*"))
    # The adapter export is gathered to rank 0: complete on host A, and only there.
    assert (a.disk / "ds" / "adapter_model.safetensors").is_file()
    assert not (b.disk / "ds" / "adapter_model.safetensors").exists()
    recipe = json.loads((a.disk / "ds" / "adapter_config.json").read_text())
    assert recipe["meft_config"]["num_frozen_layers"] == 1  # the lower third of 3 layers


@pytest.mark.slow
def test_kill_during_save_then_rerun_resumes_the_same_run(deepspeed_run):
    hosts = deepspeed_run
    a, b = hosts.hosts
    codes, logs = _run(hosts, "deepspeed", "killed", fault=f"kill_in_save:1:{2 * SAVE_STEPS}")
    assert codes[0] not in (0, None) and codes[1] not in (0, None), (codes, logs[0][-3000:])
    # Host A committed step 4, host B died before committing it: only step 2 is complete on both disks.
    assert (a.disk / "killed" / f"checkpoint-{2 * SAVE_STEPS}" / "trainer_state.json").is_file()
    assert not (b.disk / "killed" / f"checkpoint-{2 * SAVE_STEPS}").exists()
    assert (b.disk / "killed" / f".tmp-checkpoint-{2 * SAVE_STEPS}").is_dir()
    codes, logs = _run(hosts, "deepspeed", "killed")  # the same command again
    assert codes == [0, 0], "\n".join(log[-4000:] for log in logs)
    assert f"checkpoint-{SAVE_STEPS} at step {SAVE_STEPS}" in logs[0]
    uninterrupted, resumed = train_losses(a.disk / "ds"), train_losses(a.disk / "killed")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(SAVE_STEPS + 1, STEPS + 1):
        assert math.isclose(resumed[step], uninterrupted[step], rel_tol=1e-6, abs_tol=1e-6), step
    for host in (a, b):
        assert not list((host.disk / "killed").glob(".tmp-*"))


@pytest.mark.slow
def test_zero2_bf16_checkpoint_on_separate_disks_resumes(hosts):
    """ZeRO-2 keeps the trainable weights whole on every rank and DeepSpeed writes them (the model-states
    file) from rank 0 only: host B's checkpoint needs its own copy to resume. In bf16, the precision users
    train in (the fp32 master weights and optimizer state are in the checkpoint: the resumed losses are the
    uninterrupted run's)."""
    a, b = hosts.hosts
    for host in hosts.hosts:
        config = json.loads((host.disk / "ds_zero3.json").read_text())
        config["zero_optimization"], config["bf16"] = {"stage": 2}, {"enabled": True}
        (host.disk / "ds_zero2.json").write_text(json.dumps(config))
    zero2 = hosts.mount_point / "ds_zero2.json"
    codes, logs = _run(hosts, "deepspeed", "zero2", deepspeed=zero2)
    assert codes == [0, 0], "\n".join(log[-4000:] for log in logs)
    assert "deepspeed/mp_rank_00_model_states.pt" in _checkpoint_files(b, "zero2", SAVE_STEPS)
    codes, logs = _run(hosts, "deepspeed", "zero2-resumed", deepspeed=zero2,
                       resume_from_checkpoint=hosts.mount_point / "zero2" / f"checkpoint-{SAVE_STEPS}")
    assert codes == [0, 0], "\n".join(log[-4000:] for log in logs)
    uninterrupted, resumed = train_losses(a.disk / "zero2"), train_losses(a.disk / "zero2-resumed")
    for step in range(SAVE_STEPS + 1, STEPS + 1):
        assert math.isclose(resumed[step], uninterrupted[step], rel_tol=1e-6, abs_tol=1e-6), step


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "mpirun", "deepspeed-pdsh"])
def test_other_launchers_give_the_same_losses(deepspeed_run, launcher):
    """torchrun --nnodes 2 (one agent per host); MPICH's mpirun and deepspeed's default (pdsh) runner, started
    on host A and reaching host B through an ssh stand-in (hydra's -launcher-exec; `ssh` on PATH for pdsh).
    pdsh comes from the system packages (scripts/bootstrap.sh installs it as root with apt)."""
    if launcher == "deepspeed-pdsh" and shutil.which("pdsh") is None:
        message = "pdsh is not installed (scripts/bootstrap.sh installs it as root where apt-get exists)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    hosts = deepspeed_run
    codes, logs = _run(hosts, launcher, launcher)
    assert set(codes) == {0}, "\n".join(log[-4000:] for log in logs)
    reference, losses = train_losses(hosts.hosts[0].disk / "ds"), train_losses(hosts.hosts[0].disk / launcher)
    assert (hosts.hosts[1].disk / launcher / f"checkpoint-{SAVE_STEPS}" / "rng_state_1.pt").is_file()
    assert losses.keys() == reference.keys()
    for step, loss in reference.items():
        assert math.isclose(losses[step], loss, rel_tol=1e-6, abs_tol=1e-6), step


@pytest.mark.slow
def test_two_ranks_per_host(deepspeed_run):
    """2 hosts x 2 ranks: on each host its lowest rank commits both of its ranks' files. Micro-batch 2 gives
    the same global batches of 8 as the 2 x 1 run; the logged loss is a mean of per-rank token means and
    dropout draws differ per rank, so the losses agree only roughly."""
    hosts = deepspeed_run
    a, b = hosts.hosts
    (hosts.root / "hostfile2").write_text("".join(f"{h.name} slots=2\n" for h in hosts.hosts))
    port = free_port()
    processes = [hosts.start(h.index, [BIN / "deepspeed", "--hostfile", hosts.root / "hostfile2", "--no_ssh",
                                       "--node_rank", h.index, "--master_addr", hosts.master_addr, "--master_port",
                                       port, FAULT_SCRIPT] + _flags(hosts, "2x2", per_device_train_batch_size=2),
                             launch_env(), log_name=f"2x2-{h.name}") for h in hosts.hosts]
    codes = hosts.wait(processes, RUN_TIMEOUT)
    assert codes == [0, 0], "\n".join(p.log_path.read_text()[-4000:] for p in processes)
    for host, ranks in ((a, (0, 1)), (b, (2, 3))):
        files = _checkpoint_files(host, "2x2", SAVE_STEPS)
        assert {f"rng_state_{r}.pt" for r in ranks} | {"trainer_state.json"} <= files
        assert not any(f"rng_state_{r}.pt" in files for r in range(4) if r not in ranks)
    reference, losses = train_losses(a.disk / "ds"), train_losses(a.disk / "2x2")
    assert losses.keys() == reference.keys() and all(math.isfinite(v) for v in losses.values())
    for step, loss in reference.items():
        assert math.isclose(losses[step], loss, rel_tol=1e-2), step


# (fault kind, failing rank): the failing rank's host and the line that names it.
FAILURES = [("raise", 1), ("kill", 1), ("stop", 1), ("stop", 0)]


@pytest.mark.slow
@pytest.mark.parametrize("kind,rank", FAILURES, ids=[f"{k}-rank{r}" for k, r in FAILURES])
def test_a_failure_on_one_host_ends_every_host_quickly(hosts, kind, rank):
    output = f"fail-{kind}-{rank}"
    processes = _launch(hosts, "deepspeed", output, fault=f"{kind}:{rank}:{FAULT_STEP}", max_steps=500,
                        save_steps=1000)
    codes = hosts.wait(processes, timeout=FAILURE_LIMIT_S + 120)
    logs = [p.log_path.read_text() for p in processes]
    failing = hosts.hosts[rank]
    fault_time = float((failing.disk / f"{output}.fault_time").read_text())
    seconds = [round(p.ended_at - fault_time, 1) if p.ended_at else None for p in processes]
    print(f"{kind} on rank {rank}: launchers exited {codes} after {seconds} s")
    assert all(code not in (0, None) for code in codes), (codes, "\n".join(log[-3000:] for log in logs))
    assert all(s is not None and s < FAILURE_LIMIT_S for s in seconds), seconds
    error_lines = [line for line in logs[rank].splitlines() if line.startswith(f"error: rank {rank} on {failing.name}")]
    if kind == "raise":
        assert error_lines and "injected data error" in error_lines[0], logs[rank][-3000:]
    elif kind == "stop":  # the stopped rank cannot speak; its watchdog names it and ends it
        assert error_lines and "watchdog" in error_lines[0], logs[rank][-3000:]
    other = 1 - rank
    assert f"error: rank {other} on {hosts.hosts[other].name}" in logs[other], logs[other][-3000:]


@pytest.mark.slow
def test_a_stopped_rank_among_two_per_host_ends_all_four(hosts):
    """2 hosts x 2 ranks, global rank 3 (host B's second rank) stopped: its watchdog names and ends it, host B's
    launcher ends its other rank, and host A's two ranks fail their collectives: both launchers exit non-zero
    within the same limit as with one rank per host."""
    (hosts.root / "hostfile2").write_text("".join(f"{h.name} slots=2\n" for h in hosts.hosts))
    port, output = free_port(), "fail-stop-3-of-4"
    env = dict(launch_env(), MEFT_TEST_FAULT=f"stop:3:{FAULT_STEP}",
               MEFT_TEST_FAULT_TIME_FILE=str(hosts.mount_point / f"{output}.fault_time"))
    processes = [hosts.start(h.index, [BIN / "deepspeed", "--hostfile", hosts.root / "hostfile2", "--no_ssh",
                                       "--node_rank", h.index, "--master_addr", hosts.master_addr, "--master_port",
                                       port, FAULT_SCRIPT] + _flags(hosts, output, per_device_train_batch_size=2,
                                                                    max_steps=500, save_steps=1000),
                             env, log_name=f"{output}-{h.name}") for h in hosts.hosts]
    codes = hosts.wait(processes, timeout=FAILURE_LIMIT_S + 120)
    logs = [p.log_path.read_text() for p in processes]
    fault_time = float((hosts.hosts[1].disk / f"{output}.fault_time").read_text())
    seconds = [round(p.ended_at - fault_time, 1) if p.ended_at else None for p in processes]
    print(f"stop of rank 3 of 4: launchers exited {codes} after {seconds} s")
    assert all(code not in (0, None) for code in codes), (codes, "\n".join(log[-3000:] for log in logs))
    assert all(s is not None and s < FAILURE_LIMIT_S for s in seconds), seconds
    # Named by its watchdog either way: the store closed (host A's ranks ended first), or host B's launcher
    # ended the tree first (rank 2's collective failed) and the watchdog says its rank was the stopped one.
    stopped = [line for line in logs[1].splitlines() if line.startswith("error: rank 3 on hostb")]
    assert stopped and "watchdog" in stopped[0], logs[1][-3000:]
    assert any(f"error: rank {r} on hosta" in logs[0] for r in (0, 1)), logs[0][-3000:]


@pytest.mark.slow
def test_hosts_with_different_data_are_refused(hosts):
    b = hosts.hosts[1]
    (b.disk / "lm_changed.jsonl").write_text((b.disk / "lm.jsonl").read_text().replace("positive", "negative", 1))
    shutil.copy(hosts.hosts[0].disk / "lm.jsonl", hosts.hosts[0].disk / "lm_changed.jsonl")
    codes, logs = _run(hosts, "deepspeed", "refused", train_file=hosts.mount_point / "lm_changed.jsonl", timeout=180)
    assert all(code not in (0, None) for code in codes), codes
    for log in logs:
        errors = [line for line in log.splitlines() if line.startswith("error: the hosts' inputs differ")]
        assert errors, log[-3000:]
        assert all(part in errors[0] for part in ("--train_file", "rank 0 on hosta", "rank 1 on hostb")), errors[0]
    assert not (hosts.hosts[0].disk / "refused").exists()


# --- the pieces on their own (no namespaces needed)


def _serve_store(port: int) -> subprocess.Popen:
    """A rendezvous store in its own process, as rank 0 serves it (the test can stop or kill that process)."""
    code = ("import datetime, time\nfrom torch.distributed import TCPStore\n"
            f"store = TCPStore('127.0.0.1', {port}, is_master=True, wait_for_workers=False, "
            "timeout=datetime.timedelta(seconds=60))\nprint('serving', flush=True)\ntime.sleep(600)\n")
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "serving"
    return server


def _watched_count(port: int) -> int:
    """How often rank 7's watchdog has asked the store so far."""
    from torch.distributed import TCPStore

    client = TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=20))
    return client.add("meft_ds/watchdog/7", 0)


def _start_watched_rank(port: int, log, **watchdog) -> subprocess.Popen:
    """A stand-in rank 7 that starts its watchdog (start_watchdog's keyword arguments) and sleeps; stderr to `log`."""
    code = (f"import sys, time\nsys.path.insert(0, {str(REPO)!r})\n"
            "from meft_ds.training.watchdog import start_watchdog\n"
            f"start_watchdog('127.0.0.1', {port}, 7, **{watchdog!r})\ntime.sleep(300)\n")
    with open(log, "w") as stderr:
        return subprocess.Popen([sys.executable, "-c", code], stderr=stderr)


def _wait_until_watched(port: int, timeout: float = 120) -> None:
    """Until rank 7's watchdog has connected and asked the store once (it imports torch first)."""
    deadline = time.monotonic() + timeout
    while _watched_count(port) == 0 and time.monotonic() < deadline:
        time.sleep(0.5)


def _error_lines(log) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("error: rank 7 on ")]


# When the store's process stops or closes: before the watchdog's first connection (it needs a while to import
# torch on a busy host; a fault then used to leave the rank unwatched for good), or after it.
STORE_FATES = ["stopped-before-connect", "stopped-after-connect", "closed-before-connect"]


@pytest.mark.slow
def test_a_launcher_can_end_a_stopped_rank_through_its_watchdog(tmp_path):
    """The deepspeed launcher ends a failed host's process tree with SIGTERM to every process in it, then waits
    30 s. A stopped rank cannot act on its SIGTERM; its watchdog, terminated too, continues it first."""
    import psutil

    port = free_port()
    server = _serve_store(port)
    log = tmp_path / "rank.log"
    rank = _start_watched_rank(port, log, timeout_s=60.0)
    try:
        _wait_until_watched(port)
        tree = psutil.Process(rank.pid).children(recursive=True) + [psutil.Process(rank.pid)]
        assert len(tree) == 2
        rank.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 10  # a signal is delivered asynchronously: stopped before the launcher acts
        while tree[-1].status() != psutil.STATUS_STOPPED and time.monotonic() < deadline:
            time.sleep(0.05)
        assert tree[-1].status() == psutil.STATUS_STOPPED
        for process in tree:  # what deepspeed.launcher.launch.terminate_process_tree does
            process.terminate()
        assert rank.wait(timeout=10) == -signal.SIGTERM
        lines = _error_lines(log)
        assert lines and "was stopped" in lines[0], log.read_text()[-2000:]
    finally:
        rank.kill()
        server.kill()
        server.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("fate", STORE_FATES)
def test_the_watchdog_ends_its_rank_whenever_the_store_goes(tmp_path, fate):
    port = free_port()
    server = _serve_store(port)
    log = tmp_path / "rank.log"
    try:
        if fate.endswith("before-connect"):
            server.send_signal(signal.SIGSTOP if fate.startswith("stopped") else signal.SIGKILL)
        rank = _start_watched_rank(port, log, timeout_s=2.0, grace_s=1.0)
        if fate == "stopped-after-connect":
            _wait_until_watched(port)
            assert rank.poll() is None
            server.send_signal(signal.SIGSTOP)
            stopped_at = time.monotonic()
        try:
            code = rank.wait(timeout=120)  # the watchdog imports torch first: seconds to a minute here
        finally:
            rank.kill()
        assert code == -signal.SIGKILL, (code, log.read_text()[-2000:])
        lines = _error_lines(log)
        assert lines and "watchdog" in lines[0], log.read_text()[-2000:]
        if fate == "stopped-after-connect":  # timeout 2 s + grace 1 s + a poll, with room for a busy machine
            assert time.monotonic() - stopped_at < 30
    finally:
        server.kill()
        server.wait(timeout=30)




def test_auto_resume_starts_fresh_and_latest_needs_a_checkpoint(tmp_path):
    from meft_ds.training.checkpoint import resolve_resume_path

    assert resolve_resume_path("auto", str(tmp_path / "missing")) is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_resume_path("latest", str(tmp_path))
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / ".tmp-checkpoint-6").mkdir()  # an interrupted save
    assert resolve_resume_path("auto", str(tmp_path)) == tmp_path / "checkpoint-4"


def test_input_digests_see_a_changed_data_file_and_model_file(tmp_path):
    from types import SimpleNamespace

    from meft_ds.training.same_inputs import input_digests

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"hidden_size": 32}')
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "answer": "b"}\n')
    args = SimpleNamespace(model_name_or_path=str(tmp_path / "model"), train_file=str(tmp_path / "train.jsonl"),
                           validation_file=None, data_dir=None)
    before = input_digests(args, "zero3_bf16")
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "answer": "c"}\n')
    after_data = input_digests(args, "zero3_bf16")
    (tmp_path / "model" / "config.json").write_text('{"hidden_size": 64}')
    after_model = input_digests(args, "zero3_bf16")
    changed = lambda x, y: {k for k in x if x[k] != y.get(k)}  # noqa: E731
    assert changed(before, after_data) == {f"--train_file {tmp_path / 'train.jsonl'}"}
    assert changed(after_data, after_model) == {f"--model_name_or_path {tmp_path / 'model'}: config.json"}


def test_ddp_timeout_must_be_positive():
    from meft_ds.training import RunArgs

    with pytest.raises(ValueError, match="--ddp_timeout"):
        RunArgs(ddp_timeout=0, model_name_or_path="x")
    assert RunArgs(model_name_or_path="x").ddp_timeout == 1800
