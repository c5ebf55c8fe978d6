"""Two "hosts" on one machine for multi-node tests: each a Linux network namespace with its own address
(a veth pair joins them), its own host name (a UTS namespace) and its own disk (a mount namespace in which
the host's directory is bind-mounted over one common path, so every host sees "the same" path holding its
own files, as separate machines would).

Needs root (ip netns, unshare, mount). Traffic stays between the two namespaces' own addresses; nothing
else is reachable from them. Namespace and link names carry the pid and a random suffix, so concurrent
runs do not clash; the namespaces are deleted on exit, also after a failure.

    with TwoHosts(tmp_path) as hosts:
        a = hosts.start(0, ["deepspeed", "--no_ssh", "--node_rank", "0", ...])
        b = hosts.start(1, [...])
        codes = hosts.wait([a, b], timeout=300)
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SUBNET = "10.213.0"  # private to the namespaces this creates: the same addresses in two runs never meet
COMMAND_TIMEOUT = 20
INTERFACE = "meft0"  # the veth end's name inside each host


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)


def unavailable_reason() -> str | None:
    """Why two hosts cannot be made here (None when they can): creates and deletes a probe namespace."""
    missing = [tool for tool in ("ip", "unshare", "mount", "hostname") if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)}"
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    name = f"meftprobe{os.getpid()}"
    try:
        _ip("netns", "add", name)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        return f"`ip netns add` failed: {getattr(error, 'stderr', '') or error}".strip()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=COMMAND_TIMEOUT)
    return None


@dataclass
class Host:
    index: int
    name: str  # host name inside its UTS namespace, and the namespace's prefix
    netns: str
    interface: str
    address: str
    disk: Path  # this host's files, as the test sees them from outside


class TwoHosts:
    """Two namespaced hosts; `mount_point` is the path at which each host sees its own disk."""

    def __init__(self, root: Path, count: int = 2):
        tag = f"{os.getpid() % 100000}{secrets.token_hex(2)}"
        self.root = Path(root)
        self.mount_point = self.root / "disk"
        self.mount_point.mkdir(parents=True, exist_ok=True)
        self.hosts = []
        for index in range(count):
            letter = "ab"[index]
            disk = self.root / f"host{letter}"
            disk.mkdir(parents=True, exist_ok=True)
            # Interface names are at most 15 characters.
            self.hosts.append(Host(index, f"host{letter}", f"meft{tag}{letter}", f"mv{tag}{letter}",
                                   f"{SUBNET}.{index + 1}", disk))
        # Every host resolves every host name (hydra's proxies connect back by name), via its own /etc/hosts.
        self.hosts_file = self.root / "etc_hosts"
        self.hosts_file.write_text("127.0.0.1 localhost\n" + "".join(f"{h.address} {h.name}\n" for h in self.hosts))
        self.processes: list[subprocess.Popen] = []

    @property
    def master_addr(self) -> str:
        return self.hosts[0].address

    def __enter__(self) -> TwoHosts:
        try:
            a, b = self.hosts
            for host in self.hosts:
                _ip("netns", "add", host.netns)
            _ip("link", "add", a.interface, "type", "veth", "peer", "name", b.interface)
            for host in self.hosts:
                # Unique names while both ends are in this namespace; one name inside every host, so one
                # GLOO_SOCKET_IFNAME fits all (mpirun passes its environment to every host).
                _ip("link", "set", host.interface, "netns", host.netns)
                _ip("-n", host.netns, "link", "set", host.interface, "name", INTERFACE)
                _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", INTERFACE)
                _ip("-n", host.netns, "link", "set", "lo", "up")
                _ip("-n", host.netns, "link", "set", INTERFACE, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def prefix(self, index: int) -> list[str]:
        """The command prefix that runs what follows it on host `index`: its network, host name, disk at
        mount_point and /etc/hosts."""
        host = self.hosts[index]
        inner = (f"hostname {host.name} && mount --bind {shlex.quote(str(host.disk))} "
                 f"{shlex.quote(str(self.mount_point))} && mount --bind {shlex.quote(str(self.hosts_file))} "
                 "/etc/hosts && exec \"$@\"")
        return ["ip", "netns", "exec", host.netns, "unshare", "--mount", "--uts", "--propagation", "private",
                "sh", "-c", inner, "sh"]

    def write_ssh_shim(self, path: Path) -> Path:
        """An executable that behaves like `ssh [options] <host> <command...>` for these hosts (for hydra's
        -launcher-exec and pdsh-less runners): it runs the command through a shell on that host."""
        path.parent.mkdir(parents=True, exist_ok=True)
        cases = "".join(f"  {h.name}) exec {' '.join(shlex.quote(c) for c in self.prefix(h.index))} "
                        f"env GLOO_SOCKET_IFNAME={INTERFACE} sh -c \"$*\" ;;\n" for h in self.hosts)
        path.write_text("#!/bin/sh\n# ssh stand-in: drop options, then <host> <command...>\n"
                        "while [ $# -gt 0 ]; do case $1 in -[BbcDEeFIiJLlmOopQRSWw]) shift 2 ;; -*) shift ;; "
                        "*) break ;; esac; done\n"
                        "host=$1; shift\n"
                        f"case $host in\n{cases}  *) echo \"unknown host $host\" >&2; exit 255 ;;\nesac\n")
        path.chmod(0o755)
        return path

    def start(self, index: int, command: list, env: dict, log_name: str | None = None) -> subprocess.Popen:
        """Run `command` on host `index` (see `prefix`); output goes to <root>/<log_name or host name>.log.
        The process leads its own process group (see `kill`)."""
        host = self.hosts[index]
        env = dict(env, GLOO_SOCKET_IFNAME=INTERFACE)
        stem = log_name or host.name
        log_path = self.root / f"{stem}.log"
        for attempt in range(2, 100):  # a rerun of the same job keeps the earlier log
            if not log_path.exists():
                break
            log_path = self.root / f"{stem}-{attempt}.log"
        log = open(log_path, "w")
        process = subprocess.Popen(self.prefix(index) + [str(c) for c in command], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        process.log_path = log_path
        self.processes.append(process)
        return process

    def wait(self, processes: list[subprocess.Popen], timeout: float) -> list[int | None]:
        """Exit codes (None: still running at the deadline; it is then killed). Each process gets
        `ended_at` (time.time() when it was seen to exit, or None)."""
        deadline = time.monotonic() + timeout
        for process in processes:
            process.ended_at = None
        while time.monotonic() < deadline and any(p.ended_at is None for p in processes):
            for process in processes:
                if process.ended_at is None and process.poll() is not None:
                    process.ended_at = time.time()
            time.sleep(0.2)
        codes = [process.poll() for process in processes]
        for process, code in zip(processes, codes):
            if code is None:
                self.kill(process)
        return codes

    @staticmethod
    def kill(process: subprocess.Popen) -> None:
        """SIGKILL the whole process group (the launcher and every rank it started; stopped ones too)."""
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                self.kill(process)
        for host in self.hosts:
            # Kill anything left in the namespace (a rank that left its launcher's process group).
            pids = subprocess.run(["ip", "netns", "pids", host.netns], capture_output=True, text=True,
                                  timeout=COMMAND_TIMEOUT).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, timeout=COMMAND_TIMEOUT)
