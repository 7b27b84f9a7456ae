"""A real multi-node Ray cluster on this machine: jobs submitted to it (``ray job submit`` and ``rau submit``), and a
Ray Train run with a worker on each node that survives losing a node.

Every node is its own ``ray start --block`` process (head: ``--head``; others: ``--address``) in its own process
session, with its own ``--temp-dir`` under a fresh /tmp folder and explicit ports, so nothing here touches another
Ray cluster on the machine: no /tmp/ray, no ray_current_cluster, never ``ray stop``; everything is stopped by PID.

Where the machine allows it (root with ``unshare``, ``nsenter`` and ``ip``; probed first), every node also gets its
own network namespace, like a separate machine. A fresh namespace cannot reach the head by itself (its loopback is
its own), so the nodes are wired with veth pairs to a bridge that lives *inside the head's namespace*: head
10.203.0.1, then .2, .3; the machine's own network is never changed, and it all vanishes with the processes. Clients
(``ray job submit``, ``rau submit``, the training driver) run in the head's namespace through ``nsenter``, as on the
head. Without those rights every node shares the host's network with its own ports (a second raylet on the same
host; Ray turns --node-ip-address=127.0.0.1 into the host's address). RAU_TEST_NO_NETNS=1 forces that path.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import yaml

from rau_ray.data.manifest import read_manifest
from rau_ray.models.checkpoint import read_history, read_weights_and_state

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SUBNET = "10.203.0"
SMOKE = "jobs/configs/data-smoke.yaml"  # 3 subjects x 2 slices, 64 px
STEPS = 12  # of the training run
OUTPUTS: dict[str, Path] = {}  # what each submission path wrote, to compare them


def _netns(pid: int | str) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


class Netns:
    """A network namespace of our own, held open by a ``sleep`` started with ``unshare --net``."""

    def __init__(self):
        self.proc = subprocess.Popen(["unshare", "--net", "sleep", "86400"], start_new_session=True)
        deadline = time.time() + 10
        while _netns(self.proc.pid) == _netns("self"):  # until unshare has switched before exec'ing sleep
            if self.proc.poll() is not None or time.time() > deadline:
                raise OSError("unshare --net did not give a new network namespace")
            time.sleep(0.02)
        self.inode = _netns(self.proc.pid)

    def prefix(self) -> list[str]:
        return ["nsenter", "-t", str(self.proc.pid), "-n"]

    def ip(self, *commands: str) -> None:
        """Run ``ip`` commands inside this namespace (and only there: checked before every call)."""
        assert self.proc.poll() is None and _netns(self.proc.pid) == self.inode != _netns("self")
        for command in commands:
            subprocess.run([*self.prefix(), "ip", *command.split()], check=True, capture_output=True, text=True)

    def processes(self) -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter():
            try:
                if p.pid != self.proc.pid and _netns(p.pid) == self.inode:
                    found.append(p)
            except OSError:
                pass
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def isolation_available() -> bool:
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("unshare", "nsenter", "ip")):
        return False
    try:
        probe = Netns()
        try:
            probe.ip("link set lo up")
        finally:
            probe.stop()
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


def _kill_and_wait(procs: list, timeout: float) -> None:
    """SIGKILL each process (gone already is fine) and wait for them to exit."""
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=timeout)


def free_port_block(size: int) -> int:
    """First port of ``size`` consecutive ports that nothing on this machine listens on now."""
    for _ in range(200):
        base = random.randrange(21000, 59000 - size)
        socks = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                socks.append(s)
                s.bind(("0.0.0.0", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


@dataclass
class Node:
    name: str
    ip: str
    proc: subprocess.Popen
    temp_dir: Path
    log: Path
    netns: Netns | None
    ports: dict = field(default_factory=dict)
    seen: dict = field(default_factory=dict)  # pid -> psutil.Process, every process of this node we saw

    def processes(self) -> list[psutil.Process]:
        """The node's live processes: ``ray start`` and its descendants, plus anything in its network namespace."""
        found = {}
        try:
            root = psutil.Process(self.proc.pid)
            found = {p.pid: p for p in [root, *root.children(recursive=True)]}
        except psutil.NoSuchProcess:
            pass
        if self.netns:
            found.update({p.pid: p for p in self.netns.processes()})
        self.seen.update(found)
        return list(found.values())


class LocalCluster:
    """A head and worker nodes on this machine, each a ``ray start --block`` we own and stop by PID."""

    def __init__(self, root: Path, isolated: bool, env: dict):
        self.root, self.isolated, self.env = root, isolated, env
        self.nodes: list[Node] = []
        self.bridge: Netns | None = None
        self.stopped = False

    # ---- nodes
    def start_head(self, resources: dict) -> Node:
        ip = f"{SUBNET}.1" if self.isolated else "127.0.0.1"
        netns = None
        if self.isolated:
            netns = self.bridge = Netns()
            netns.ip("link set lo up", "link add rau-br type bridge", f"addr add {ip}/24 dev rau-br",
                     "link set rau-br up")
        base = free_port_block(12 + 100)
        self.gcs_port, self.dashboard_port = base, base + 1
        ports = {"port": base, "dashboard-port": base + 1, "ray-client-server-port": base + 2}
        head = self._start("head", ip, netns, ["--head", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                              *[f"--{k}={v}" for k, v in ports.items()]], resources, base + 3)
        self.address = f"{ip}:{self.gcs_port}"
        self.jobs_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.wait_nodes(1)
        return head

    def add_node(self, name: str, resources: dict) -> Node:
        ip = f"{SUBNET}.{len(self.nodes) + 1}" if self.isolated else "127.0.0.1"
        netns = None
        if self.isolated:  # a veth pair: one end on the head's bridge, the other the new machine's eth0
            netns = Netns()
            veth = f"rau-{name}"[:15]
            self.bridge.ip(f"link add {veth} type veth peer name eth0 netns {netns.proc.pid}",
                           f"link set {veth} master rau-br", f"link set {veth} up")
            netns.ip("link set lo up", f"addr add {ip}/24 dev eth0", "link set eth0 up")
        node = self._start(name, ip, netns, [f"--address={self.address}"], resources, free_port_block(9 + 100))
        self.wait_nodes(sum(1 for n in self.nodes if n.proc.poll() is None))
        return node

    def _start(self, name: str, ip: str, netns: Netns | None, args: list, resources: dict, base: int) -> Node:
        temp_dir = self.root / name
        temp_dir.mkdir(parents=True)
        ports = {"node-manager-port": base, "object-manager-port": base + 1, "dashboard-agent-listen-port": base + 2,
                 "dashboard-agent-grpc-port": base + 3, "metrics-export-port": base + 4,
                 "runtime-env-agent-port": base + 5, "min-worker-port": base + 9, "max-worker-port": base + 108}
        cmd = [str(BIN / "ray"), "start", "--block", *args, f"--node-ip-address={ip}", f"--temp-dir={temp_dir}",
               "--num-cpus=1", f"--resources={json.dumps(resources)}", "--object-store-memory=100000000",
               "--disable-usage-stats", *[f"--{k}={v}" for k, v in ports.items()]]
        log = self.root / f"{name}.log"
        env = dict(self.env)
        if netns:  # torch's gloo advertises the address its hostname resolves to (127.0.0.1, shared /etc/hosts
            # here); on its own network each node says which interface is its network, as on multi-NIC hosts
            env["GLOO_SOCKET_IFNAME"] = "rau-br" if netns is self.bridge else "eth0"
        with open(log, "w") as out:
            proc = subprocess.Popen([*(netns.prefix() if netns else []), *cmd], stdout=out, stderr=subprocess.STDOUT,
                                    env=env, cwd=self.root, start_new_session=True)
        node = Node(name, ip, proc, temp_dir, log, netns, ports)
        self.nodes.append(node)
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray start of {name} failed:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        node.processes()
        return node

    def wait_nodes(self, alive: int, timeout: float = 90) -> list[dict]:
        """Until the head's state API lists ``alive`` live nodes (asked from inside the head's namespace)."""
        script = ("import json,os,sys,time,urllib.request\n"
                  "url, want, deadline = sys.argv[1], int(sys.argv[2]), time.time() + float(sys.argv[3])\n"
                  "err = None\n"
                  "while True:\n"
                  "    try:\n"
                  "        req = urllib.request.Request(url, headers={'Authorization': 'Bearer '\n"
                  "                                     + os.environ['RAY_AUTH_TOKEN']})\n"
                  "        data = json.load(urllib.request.urlopen(req, timeout=5))\n"
                  "        nodes = [n for n in data['data']['result']['result'] if n['state'] == 'ALIVE']\n"
                  "        if len(nodes) == want:\n"
                  "            print(json.dumps(nodes)); break\n"
                  "        err = f'{len(nodes)} live'\n"
                  "    except Exception as e:\n"
                  "        err = e\n"
                  "    if time.time() > deadline:\n"
                  "        sys.exit(f'timeout waiting for {want} live nodes: {err!r}')\n"
                  "    time.sleep(0.5)\n")
        url = f"{self.jobs_url}/api/v0/nodes?limit=100&detail=true"
        r = self.run([sys.executable, "-c", script, url, str(alive), str(timeout)], timeout=timeout + 30)
        assert r.returncode == 0, r.stderr + r.stdout
        return json.loads(r.stdout)

    def kill_node(self, node: Node) -> None:
        """The machine is gone: every process of the node SIGKILLed at once, its network with it."""
        procs = node.processes()
        os.killpg(node.proc.pid, signal.SIGKILL)
        _kill_and_wait(procs, timeout=20)
        node.proc.wait(timeout=20)
        if node.netns:
            node.netns.stop()

    # ---- clients, run as on the head
    def client_env(self, **extra) -> dict:
        return {**self.env, "RAY_ADDRESS": self.address, **extra}

    def run(self, cmd: list, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
        prefix = self.bridge.prefix() if self.isolated else []
        return subprocess.run([*prefix, *map(str, cmd)], capture_output=True, text=True, timeout=timeout,
                              env=kw.pop("env", self.client_env()), cwd=kw.pop("cwd", REPO), **kw)

    def popen(self, cmd: list, **kw) -> subprocess.Popen:
        prefix = self.bridge.prefix() if self.isolated else []
        return subprocess.Popen([*prefix, *map(str, cmd)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=kw.pop("env", self.client_env()), cwd=kw.pop("cwd", REPO), **kw)

    def train_workers(self) -> dict[str, list[int]]:
        """Node name -> PIDs of its live Ray Train workers (processes titled ``ray::RayTrainWorker...``)."""
        found = {}
        for node in self.nodes:
            pids = []
            for p in node.processes() if node.proc.poll() is None else []:
                try:
                    if any("RayTrainWorker" in part for part in p.cmdline()):
                        pids.append(p.pid)
                except psutil.Error:
                    pass
            found[node.name] = pids
        return found

    # ---- teardown
    def stop(self) -> None:
        """Worker nodes first (together), the head last: SIGTERM to each ``ray start`` (it stops its processes), then
        SIGKILL whatever is left of them, by PID."""
        workers = [n for n in self.nodes if n.name != "head"]
        for group in (workers, [n for n in self.nodes if n.name == "head"]):
            procs = {p.pid: p for node in group for p in node.processes()}
            for node in group:
                if node.proc.poll() is None:
                    node.proc.send_signal(signal.SIGTERM)
            deadline = time.time() + 30
            for node in group:
                try:
                    node.proc.wait(timeout=max(0.1, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    pass
            procs.update({p.pid: p for node in group for p in node.processes()})
            _, alive = psutil.wait_procs(list(procs.values()), timeout=10)
            _kill_and_wait(alive, timeout=10)
            for node in group:
                if node.proc.poll() is None:
                    node.proc.kill()
                    node.proc.wait()
                if node.netns:
                    node.netns.stop()
        if self.bridge:
            self.bridge.stop()
        self.stopped = True

    def leftovers(self) -> list[str]:
        """Any process of ours still running: one we saw, or one whose command line names our temp folder."""
        left = []
        for node in self.nodes:
            left += [f"{node.name}: {p.pid}" for p in node.seen.values() if p.is_running()
                     and p.status() != psutil.STATUS_ZOMBIE]
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(str(self.root) in part for part in p.info["cmdline"] or []):
                    left.append(f"{p.pid}: {' '.join(p.info['cmdline'])[:200]}")
            except psutil.Error:
                pass
        return left


@pytest.fixture(scope="module")
def cluster():
    # a short root: Ray's unix socket paths must stay under ~107 characters
    root = Path(tempfile.mkdtemp(prefix="rau-cluster-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # nothing pointing at other clusters
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
               # Ray's token authentication with a token of this cluster's own (not ~/.ray/auth_token)
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32),
               PYTHONUNBUFFERED="1", RAU_CACHE=os.environ.get("RAU_CACHE", str(root / "cache")),
               # a dead node is declared dead in ~3 s instead of ~15-30 s
               RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000",
               RAY_health_check_failure_threshold="3", RAY_health_check_initial_delay_ms="1000",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="5",  # SIGTERM: drain 5 s, not 30, before stopping
               # Ray Train's controller polls its workers every 0.5 s, not 2 s (ray_session.LOCAL_TRAIN_ENV)
               RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5")
    # RAU_TEST_NO_NETNS=1 takes the path of machines without the rights: every node on the host's network
    c = LocalCluster(root, isolation_available() and not os.environ.get("RAU_TEST_NO_NETNS"), env)
    try:
        c.start_head({"node_a": 1})
        c.add_node("b", {"node_b": 1})
        yield c
    finally:
        if not c.stopped:
            c.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_two_nodes_joined(cluster):
    nodes = cluster.wait_nodes(2)
    assert len({n["node_id"] for n in nodes}) == 2
    if cluster.isolated:  # separate machines as far as the network goes
        assert sorted(n["node_ip"] for n in nodes) == [f"{SUBNET}.1", f"{SUBNET}.2"]
        assert len({n.netns.inode for n in cluster.nodes}) == 2


def _manifest_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ray_job_submit_cli_runs_a_jobs_entrypoint(cluster, tmp_path):
    """The documented plain form: the repository as working_dir (.gitignore keeps .venv / runs out of the upload)."""
    out = tmp_path / "data"
    r = cluster.run([BIN / "ray", "job", "submit", "--address", cluster.jobs_url, "--log-color", "false",
                     "--working-dir", REPO,
                     "--submission-id", "rau-cli-smoke", "--", "python", "jobs/make_data.py", "--config", SMOKE,
                     "--out", out], timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Job 'rau-cli-smoke' succeeded" in r.stdout + r.stderr
    assert len(read_manifest(out).rows) == 6  # 3 subjects x 2 slices, written by the job's driver
    OUTPUTS["ray job submit"] = out
    status = cluster.run([BIN / "ray", "job", "status", "--address", cluster.jobs_url, "--log-color", "false",
                          "rau-cli-smoke"])
    assert "Job 'rau-cli-smoke' succeeded" in status.stdout + status.stderr


def test_rau_submit_follows_the_job_to_succeeded(cluster, tmp_path):
    out = tmp_path / "data"
    r = cluster.run([BIN / "rau", "submit", "--address", cluster.jobs_url, "--config", SMOKE, "--follow",
                     "--submission-id", "rau-submit-smoke", "make_data", "--", "--out", out], timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(r.stdout[r.stdout.rindex("\n{") + 1:])  # the logs stream first, the final state last
    assert result["status"] == "SUCCEEDED" and result["submission_id"] == "rau-submit-smoke"
    assert '"samples": 6' in r.stdout  # the job's own output, streamed
    assert len(read_manifest(out).rows) == 6
    if "ray job submit" in OUTPUTS:  # same seed, the other submission path: byte-identical files
        assert _manifest_bytes(out) == _manifest_bytes(OUTPUTS["ray job submit"])
    # a job that fails is reported as FAILED, exit status 1
    bad = cluster.run([BIN / "rau", "submit", "--address", cluster.jobs_url, "--config", SMOKE, "make_data", "--",
                       "--out", "/proc/rau-cannot-write-here"], timeout=240)
    assert bad.returncode == 1, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert json.loads(bad.stdout)["status"] == "FAILED"


def test_train_run_has_a_worker_on_each_node_and_survives_losing_one(cluster, ct_manifest, tmp_path):
    """The segmenter job (DDP over gloo between the nodes) with 2 workers x 1 CPU, SPREAD: one worker per node.
    Node b dies after the first checkpoint; a replacement node joins; the run restarts from that checkpoint."""
    manifest = ct_manifest(n=5, size=64, slices=2)
    storage = f"file://{tmp_path}/runs"  # a URI every node reaches (here one filesystem, on a cluster s3:// / NFS)
    config = tmp_path / "seg.yaml"
    config.write_text(yaml.safe_dump({
        "manifest": manifest, "name": "spread", "mode": "rau", "batch_size": 2, "lr": 0.01, "max_steps": STEPS,
        "log_every": 1, "eval_every": 100, "checkpoint_every": 3, "eval_items": 2,
        "scale": {"num_workers": 2, "cpus_per_worker": 1, "storage_path": storage, "max_failures": 2,
                  "placement_strategy": "SPREAD"}}))
    driver = cluster.popen([BIN / "rau", "train", "seg", "--config", config])
    try:
        run_dir = tmp_path / "runs" / "spread"
        snapshot = run_dir / "checkpoint_manager_snapshot.json"  # Ray Train writes it once a checkpoint is registered
        deadline = time.time() + 240
        while not (snapshot.is_file() and "checkpoint_dir_name" in snapshot.read_text()):
            assert driver.poll() is None, driver.communicate()[1][-3000:]
            assert time.time() < deadline, "no checkpoint after 240 s"
            time.sleep(0.2)
        workers = cluster.train_workers()
        assert [len(workers["head"]), len(workers["b"])] == [1, 1], workers  # one worker per node (SPREAD, 1 CPU each)

        cluster.kill_node(cluster.nodes[1])  # node b dies mid-run
        cluster.add_node("c", {"node_c": 1})  # its replacement joins (on a real cluster: the autoscaler)
        on_c = []
        while driver.poll() is None and time.time() < deadline + 120:
            on_c = on_c or cluster.train_workers().get("c", [])
            time.sleep(0.5)
        out, err = driver.communicate(timeout=60)
        assert driver.returncode == 0, err[-4000:]
        assert on_c, "the restarted run put no worker on the replacement node"
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()

    summary = json.loads((run_dir / "summary.json").read_text())
    history = read_history(summary["checkpoint"])
    steps = [row["step"] for row in history]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # one row per step, in order, to the end
    resumed = max(row["resumed_from"] for row in history)
    assert resumed >= 3 and resumed % 3 == 0  # restarted from a checkpoint, not from step 0
    assert [row["step"] for row in history if row["resumed_from"] == resumed][0] == resumed + 1  # and went on
    assert read_weights_and_state(summary["checkpoint"])[1]["step"] == STEPS


def test_everything_started_is_stopped(cluster):
    cluster.stop()
    assert cluster.leftovers() == []
    if cluster.isolated:  # the machine's own network never saw the bridge or the veths: they lived in our namespaces
        assert "rau-" not in subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
