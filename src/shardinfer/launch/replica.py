"""A model replica across nodes (``slurm.nodes_per_replica`` > 1): how its leader and followers meet,
watch each other and stop together.

The engine's own processes do not notice a peer that is gone: a vLLM follower blocks forever on
its leader's queue, and a leader waits minutes on a dead follower. So each node of a replica keeps
a link with the leader (a TCP connection, a heartbeat every :data:`HEARTBEAT_S` seconds each way):

- the leader writes a rendezvous file (its address, the engine's port, the link's port) in
  ``RUN_DIR/slurm/replicas/<job>-<restart>/``; followers read it, connect and say hello;
- a peer is lost when its connection closes (a dead process: at once) or after
  :data:`SILENCE_S` seconds without a word (a dead or frozen node);
- a follower that never says hello within ``SHARDINFER_REPLICA_START_S`` seconds fails the
  replica's start, naming the node and its log;
- the leader says ``bye`` when its worker ends; a follower that hears it stops its engine processes.

Every node's runner leads its own process group, and a small reaper process kills the group when
the runner's end of a pipe closes (it died, even by SIGKILL): no engine process outlives its node's
runner.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shardinfer.engines.registry import Span
from shardinfer.errors import ConfigError, RunError
from shardinfer.ledger.rundir import RunDir, read_json, write_json_atomic

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
SILENCE_S = 30.0
SILENCE_VAR = "SHARDINFER_REPLICA_SILENCE_S"  # another silence limit (run.env), e.g. for tests
START_VAR = "SHARDINFER_REPLICA_START_S"  # how long a leader waits for its followers' hello
START_S = 600.0
SILENT = " (silent)"  # marks a loss by silence: the peer may still hold its node


@dataclass(frozen=True)
class Place:
    """Where this process stands: replica (= worker rank), node within it (0 leads), of how many."""

    replica: int
    node: int
    nodes: int
    job: str  # the SLURM job and restart this replica runs in: a fresh meeting place per start

    def directory(self, run_dir: RunDir) -> Path:
        return run_dir.slurm / "replicas" / self.job

    def rendezvous(self, run_dir: RunDir) -> Path:
        return self.directory(run_dir) / f"replica-{self.replica}.json"

    def failed_file(self, run_dir: RunDir, node: int) -> Path:
        return self.directory(run_dir) / f"replica-{self.replica}.node-{node}.failed"


def follower_log(run_dir: RunDir, replica: int, node: int) -> Path:
    return run_dir.logs / f"worker-{replica:05d}.node{node}.log"


def start_timeout_s() -> float:
    return _seconds(START_VAR, START_S)


def silence_timeout_s() -> float:
    """Seconds without a word after which a peer is lost (:data:`SILENCE_S` unless run.env says)."""
    return _seconds(SILENCE_VAR, SILENCE_S)


def _seconds(var: str, default: float) -> float:
    text = os.environ.get(var)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ConfigError(f"{var}={text!r} (run.env): give a number of seconds above 0, e.g. {default:g}")
    return value


def heartbeat_s() -> float:
    """The heartbeat's period: :data:`HEARTBEAT_S`, or a sixth of a shorter silence limit."""
    return min(HEARTBEAT_S, silence_timeout_s() / 6)


def node_address() -> str:
    """This node's address, as the other nodes of its replica reach it."""
    name = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    try:
        return socket.gethostbyname(name)
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return int(probe.getsockname()[1])


def node_names(env: dict[str, str] | None = None) -> list[str]:
    """The job's nodes in SLURM's order (empty when SLURM cannot say)."""
    env = dict(os.environ if env is None else env)
    if not env.get("SLURM_JOB_NODELIST"):
        return []
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True,
                             text=True, timeout=30, env=env).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return out.split()


# ---- the connection: JSON lines, a heartbeat, loss on EOF or silence ----

class Peer:
    """One end of a leader-follower connection."""

    def __init__(self, sock: socket.socket, name: str):
        self.sock, self.name = sock, name
        self._send_lock = threading.Lock()
        self._buffer = b""
        self.closed = False

    def send(self, kind: str, **fields: Any) -> bool:
        line = (json.dumps({"type": kind, **fields}) + "\n").encode()
        try:
            with self._send_lock:
                self.sock.sendall(line)
            return True
        except OSError:
            return False

    def receive(self, timeout_s: float) -> dict[str, Any] | None:
        """The next message; None on EOF. Raises TimeoutError after ``timeout_s`` of silence."""
        while b"\n" not in self._buffer:
            try:
                self.sock.settimeout(timeout_s)
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError from None
            except OSError:
                chunk = b""
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return dict(json.loads(line))

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.sock.close()


def _beat(peers: Callable[[], list[Peer]], stop: threading.Event) -> None:
    while not stop.wait(heartbeat_s()):
        for peer in peers():
            peer.send("beat")


def watch(peer: Peer, on_message: Callable[[dict[str, Any]], None], on_lost: Callable[[str], None],
          silence_s: float | None = None) -> threading.Thread:
    """Read ``peer`` in a thread: each message to ``on_message``, its loss to ``on_lost``."""
    silence_s = silence_timeout_s() if silence_s is None else silence_s

    def run() -> None:
        while True:
            try:
                message = peer.receive(silence_s)
            except TimeoutError:
                on_lost(f"{peer.name} silent for {silence_s:.0f} s{SILENT}")
                return
            if message is None:
                if not peer.closed:
                    on_lost(f"{peer.name} gone (connection closed)")
                return
            if message["type"] != "beat":
                on_message(message)
    thread = threading.Thread(target=run, name=f"replica-watch-{peer.name}", daemon=True)
    thread.start()
    return thread


# ---- the leader ----

@dataclass(frozen=True)
class Rendezvous:
    master_addr: str
    master_port: int
    link_port: int
    leader_host: str
    pid: int


class Leader:
    """The leader's side: listen, publish the rendezvous, wait for every follower, watch them."""

    def __init__(self, run_dir: RunDir, place: Place, hosts: list[str] | None = None, *,
                 silence_s: float | None = None):
        self.run_dir, self.place = run_dir, place
        self.silence_s = silence_timeout_s() if silence_s is None else silence_s
        self.hosts = hosts or []  # the replica's nodes, leader first (names for the messages)
        self.followers: dict[int, Peer] = {}
        self.lost = threading.Event()
        self.lost_reason = ""
        self.unreachable = False  # a follower fell silent or never came up: only SLURM can stop it
        self._ended: dict[int, bool] = {}  # follower -> its link closed (True) or fell silent (False)
        self._ended_changed = threading.Condition()
        self._stop = threading.Event()
        self._server: socket.socket | None = None
        self.on_lost: Callable[[str], None] = lambda reason: None

    def host(self, node: int) -> str:
        return self.hosts[node] if node < len(self.hosts) else f"replica node {node}"

    def open(self) -> Span:
        """Listen, write the rendezvous; the engine's span of node 0."""
        address = node_address()
        self._server = socket.create_server((address, 0))
        meet = Rendezvous(master_addr=address, master_port=free_port(address),
                          link_port=int(self._server.getsockname()[1]), leader_host=socket.gethostname(),
                          pid=os.getpid())
        path = self.place.rendezvous(self.run_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, asdict(meet))
        log.info("replica %d: leader on %s, waiting for %d follower(s) (rendezvous %s)", self.place.replica,
                 address, self.place.nodes - 1, path)
        return Span(nodes=self.place.nodes, node=0, master_addr=meet.master_addr, master_port=meet.master_port)

    def wait_followers(self, timeout_s: float | None = None) -> None:
        """Until every follower said hello; fails with the node and its log when one did not."""
        assert self._server is not None
        timeout_s = start_timeout_s() if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        self._server.settimeout(1.0)
        while len(self.followers) < self.place.nodes - 1:
            self._check_failed_files()
            if time.monotonic() > deadline:
                self.unreachable = True
                raise RunError(self._not_up(timeout_s))
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            self._hello(conn)
        self._server.close()
        for node, peer in self.followers.items():
            watch(peer, functools.partial(self._message, node), functools.partial(self._peer_lost, node),
                  self.silence_s)
        threading.Thread(target=_beat, args=(lambda: list(self.followers.values()), self._stop), daemon=True,
                         name="replica-heartbeat").start()
        log.info("replica %d: every follower is up (%s)", self.place.replica,
                 ", ".join(self.host(n) for n in sorted(self.followers)))

    def _hello(self, conn: socket.socket) -> None:
        peer = Peer(conn, "follower")
        try:
            message = peer.receive(30.0)
        except TimeoutError:
            message = None
        if not message or message.get("type") != "hello":
            peer.close()
            return
        node = int(message["node"])
        peer.name = f"follower {self.host(node)} (replica node {node})"
        self.followers[node] = peer
        log.info("replica %d: %s said hello (pid %s, log %s)", self.place.replica, peer.name, message.get("pid"),
                 message.get("log"))

    def _check_failed_files(self) -> None:
        for node in range(1, self.place.nodes):
            path = self.place.failed_file(self.run_dir, node)
            if path.is_file():
                raise RunError(f"replica {self.place.replica} did not start: {self.host(node)} (replica node "
                               f"{node}) failed: {read_json(path)['error']}; its log: "
                               f"{follower_log(self.run_dir, self.place.replica, node)}")

    def _not_up(self, timeout_s: float) -> str:
        missing = [n for n in range(1, self.place.nodes) if n not in self.followers]
        nodes = "; ".join(f"{self.host(n)} (replica node {n}) did not come up within {timeout_s:.0f} s; its log: "
                          f"{follower_log(self.run_dir, self.place.replica, n)}" for n in missing)
        return (f"replica {self.place.replica} did not start: {nodes}; job output: {self.run_dir.slurm}. "
                f"Raise {START_VAR} (run.env) if the nodes start slowly")

    def _message(self, node: int, message: dict[str, Any]) -> None:
        if message["type"] == "failed":
            self._lose(f"follower {self.host(node)} (replica node {node}) failed: {message.get('error')}; its "
                       f"log: {follower_log(self.run_dir, self.place.replica, node)}")

    def _peer_lost(self, node: int, reason: str) -> None:
        with self._ended_changed:
            self._ended[node] = not reason.endswith(SILENT)
            self._ended_changed.notify_all()
        self._lose(reason)

    def _lose(self, reason: str) -> None:
        if self.lost.is_set() or self._stop.is_set():
            return
        self.unreachable = reason.endswith(SILENT)
        reason = reason.removesuffix(SILENT)
        self.lost_reason = reason
        self.lost.set()
        self.on_lost(reason)

    def hold_if_lost(self, wait_s: float | None = None) -> None:
        """Before an engine error is turned into failed rows: if a follower is lost (it may be seen a
        moment after the engine's own error), wait for the replica to be stopped instead."""
        if self.lost.wait(2 * heartbeat_s() if wait_s is None else wait_s):
            while True:  # the watcher's thread ends the process
                time.sleep(60)

    def bye(self, wait_s: float = 0.0) -> bool:
        """The worker ended: the followers stop their engine processes and exit. With ``wait_s``:
        wait that long for each follower's link to close; False when one did not (frozen, or silent
        since: only SLURM can stop it)."""
        if self._stop.is_set():
            return True  # said already
        self._stop.set()
        for peer in self.followers.values():
            peer.send("bye")
        deadline = time.monotonic() + wait_s
        with self._ended_changed:
            while len(self._ended) < len(self.followers) and time.monotonic() < deadline:
                self._ended_changed.wait(max(0.0, deadline - time.monotonic()))
            closed = wait_s <= 0 or (len(self._ended) == len(self.followers) and all(self._ended.values()))
        for peer in self.followers.values():
            peer.close()
        if not closed:
            self.unreachable = True
            log.error("replica %d: a follower did not stop within %.0f s of the leader's bye (%s)",
                      self.place.replica, wait_s, ", ".join(self.host(n) for n in self.followers
                                                             if not self._ended.get(n)))
        return closed


# ---- a follower ----

class Follower:
    """A follower's side: find the leader, say hello, watch it."""

    def __init__(self, run_dir: RunDir, place: Place, log_path: Path, *, silence_s: float | None = None):
        self.run_dir, self.place, self.log_path = run_dir, place, log_path
        self.silence_s = silence_timeout_s() if silence_s is None else silence_s
        self.peer: Peer | None = None
        self._stop = threading.Event()

    def connect(self, timeout_s: float | None = None) -> Span:
        timeout_s = start_timeout_s() if timeout_s is None else timeout_s
        meet = self._rendezvous(timeout_s)
        sock = socket.create_connection((meet.master_addr, meet.link_port), timeout=30)
        self.peer = Peer(sock, f"leader {meet.leader_host} (pid {meet.pid})")
        self.peer.send("hello", node=self.place.node, host=socket.gethostname(), pid=os.getpid(),
                       log=str(self.log_path))
        log.info("replica %d node %d: joined the leader on %s", self.place.replica, self.place.node,
                 meet.leader_host)
        return Span(nodes=self.place.nodes, node=self.place.node, master_addr=meet.master_addr,
                    master_port=meet.master_port)

    def _rendezvous(self, timeout_s: float) -> Rendezvous:
        path = self.place.rendezvous(self.run_dir)
        deadline = time.monotonic() + timeout_s
        while not path.is_file():
            if time.monotonic() > deadline:
                raise RunError(f"replica {self.place.replica} node {self.place.node}: no leader within "
                               f"{timeout_s:.0f} s ({path} never appeared); see the leader's log "
                               f"{self.run_dir.worker_log(self.place.replica)}")
            time.sleep(0.2)
        return Rendezvous(**read_json(path))

    def watch(self, on_bye: Callable[[], None], on_lost: Callable[[str], None]) -> None:
        assert self.peer is not None
        peer = self.peer

        def message(m: dict[str, Any]) -> None:
            if m["type"] == "bye":
                self._stop.set()
                on_bye()

        def lost(reason: str) -> None:
            if not self._stop.is_set():
                on_lost(reason.removesuffix(SILENT))
        watch(peer, message, lost, self.silence_s)
        threading.Thread(target=_beat, args=(lambda: [peer], self._stop), daemon=True,
                         name="replica-heartbeat").start()

    def failed(self, error: str) -> None:
        """Tell the leader (or, before the link, the rendezvous directory) why this node stopped."""
        if self.peer is not None and self.peer.send("failed", error=error):
            return
        path = self.place.failed_file(self.run_dir, self.place.node)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"error": error})


# ---- process hygiene ----

def lead_own_group() -> bool:
    """Make this process lead a process group of its own (its engine processes join it)."""
    with contextlib.suppress(OSError):  # a session leader already leads its group
        os.setpgid(0, 0)
    return os.getpgrp() == os.getpid()


_reaper: int | None = None  # this process's reaper, left out of stop_group


def start_reaper() -> int | None:
    """Fork a process that kills this process's group when this process dies, even by SIGKILL.
    Call before any thread starts. Returns its pid (None when this process leads no group)."""
    global _reaper
    if os.getpgrp() != os.getpid():
        return None
    runner = os.getpid()
    # the reaper reads a pipe whose only writer is this process (not inheritable: the engine's processes
    # do not get it): end of file = this process is gone, however it died
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(read_end)
        _reaper = pid
        return pid
    try:  # the reaper
        os.close(write_end)
        _reap_when_closed(read_end, runner)
    finally:
        os._exit(0)


def _reap_when_closed(read_end: int, runner: int) -> None:
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)  # it outlives every signal its runner gets
    while True:
        try:
            if not os.read(read_end, 1):
                break
        except InterruptedError:
            continue
    with contextlib.suppress(ProcessLookupError):
        os.killpg(runner, signal.SIGKILL)  # the group, this process too


def group_members(pgid: int) -> list[int]:
    """The processes of a process group (from /proc)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def stop_group(grace_s: float = 2.0) -> None:
    """Stop every other process of this process's group: TERM, then KILL after ``grace_s``."""
    me = os.getpid()
    if os.getpgrp() != me:
        return
    others = [p for p in group_members(me) if p not in (me, _reaper)]
    for pid in others:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while others and time.monotonic() < deadline:
        time.sleep(0.1)
        others = [p for p in group_members(me) if p not in (me, _reaper)]
    for pid in others:
        _signal(pid, signal.SIGKILL)
    if others:
        log.warning("killed %d process(es) of this node's replica that did not stop in %.0f s", len(others),
                    grace_s)


def cancel_step(env: dict[str, str] | None = None) -> bool:
    """End this SLURM job step (every task of it): the only way to stop a follower that cannot be
    reached. Returns whether scancel was asked."""
    env = dict(os.environ if env is None else env)
    job, step = env.get("SLURM_JOB_ID"), env.get("SLURM_STEP_ID")
    if not job or step is None:
        return False
    log.error("cancelling job step %s.%s: a follower node cannot be reached to stop it", job, step)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(["scancel", f"{job}.{step}"], capture_output=True, timeout=60, env=env)
    return True


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
