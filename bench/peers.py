"""The relays under test: install their tools, start each one on its own
127.0.0.1 port, wait for it to listen, stop it, and read its processes'
CPU time and memory from /proc."""

from __future__ import annotations

import atexit
import ctypes
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mtls

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
# Daemons live in sbin, which a non-login shell's PATH may lack.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])

# binary -> Debian package that ships it
TOOLS = {
    "iperf3": "iperf3",
    "haproxy": "haproxy",
    "nginx": "nginx-light",
    "socat": "socat",
    "redis-server": "redis-server",
    "redis-benchmark": "redis-tools",
}
NGINX_MODULE_DIRS = ["/usr/lib/nginx/modules", "/usr/share/nginx/modules", "/usr/lib64/nginx/modules"]


def which(name: str) -> str | None:
    return shutil.which(name, path=SEARCH_PATH)


def nginx_stream_module() -> str | None:
    """Path of the dynamic stream module, or "" when nginx has it built in."""
    nginx = which("nginx")
    if nginx:
        built = subprocess.run([nginx, "-V"], capture_output=True, text=True).stderr
        if "--with-stream" in built.split() and "--with-stream=dynamic" not in built:
            return ""
    for d in NGINX_MODULE_DIRS:
        so = Path(d) / "ngx_stream_module.so"
        if so.exists():
            return str(so)
    return None


def ensure_tools() -> list[str]:
    """apt-get install whatever is missing (update once, only if needed); returns what was installed."""
    missing = sorted({pkg for binary, pkg in TOOLS.items() if not which(binary)})
    if nginx_stream_module() is None:
        missing.append("libnginx-mod-stream")
    if not missing:
        return []
    if os.geteuid() != 0 or not which("apt-get"):
        sys.exit(f"missing tools {missing}: install these Debian packages (needs root and apt-get)")
    print(f"installing {' '.join(missing)} ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # policy-rc.d exit 101 stops the packages from starting their own daemons
    # (nginx on :80, redis on :6379) which would add noise to the run.
    policy = Path("/usr/sbin/policy-rc.d")
    ours = not policy.exists()
    if ours:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        subprocess.run(["apt-get", "update"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing], check=True, env=env)
    finally:
        if ours:
            policy.unlink()
    return missing


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def listening_socket(port: int) -> str | None:
    """The inode of the socket listening on `port`, from the kernel's socket tables, or None."""
    suffix = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[3] == "0A" and cols[1].endswith(suffix):
                        return cols[9]
        except FileNotFoundError:
            pass
    return None


def is_listening(port: int) -> bool:
    """Read the kernel's socket table rather than connecting: a probe connection
    would go through the relay to the backend (an iperf3 server takes it for a test)."""
    return listening_socket(port) is not None


# ---------------------------------------------------------------- processes

def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from field 3 (state) on; comm may hold spaces, so split after ')'."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rindex(")") + 2:].split()


def _all_stats() -> dict[int, list[str]]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st:
                out[int(name)] = st
    return out


def tree(root: int) -> list[int]:
    """root and all its live descendants (nginx workers, socat's per-connection children)."""
    stats = _all_stats()
    children: dict[int, list[int]] = {}
    for pid, st in stats.items():
        children.setdefault(int(st[1]), []).append(pid)
    out, todo = [], [root] if root in stats else []
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_split(*roots: int) -> tuple[float, float]:
    """(user, kernel) CPU seconds over the live trees: utime+cutime and stime+cstime. A live
    process counts its own time, one that exited and was reaped shows up in its parent's
    c-times, so each process is counted once. A process's stat already sums its threads."""
    user = kernel = 0
    for pid in (pid for root in roots for pid in tree(root)):
        st = _stat(pid)
        if st:
            user += int(st[11]) + int(st[13])
            kernel += int(st[12]) + int(st[14])
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, kernel / tick


def cpu_seconds(*roots: int) -> float:
    return sum(cpu_split(*roots))


def memory_kib(*roots: int) -> dict[str, int]:
    """VmRSS and Pss summed over the trees. RSS counts shared pages once per
    process; PSS splits them, which is the honest sum for forking relays."""
    rss = pss = n = 0
    for pid in (pid for root in roots for pid in tree(root)):
        try:
            with open(f"/proc/{pid}/status") as f:
                rss += next((int(l.split()[1]) for l in f if l.startswith("VmRSS:")), 0)
            with open(f"/proc/{pid}/smaps_rollup") as f:
                pss += next((int(l.split()[1]) for l in f if l.startswith("Pss:")), 0)
            n += 1
        except (FileNotFoundError, ProcessLookupError):
            pass
    return {"rss_kib": rss, "pss_kib": pss, "processes": n}


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> None:
    """In the child before exec: killed when the bench dies, even by SIGKILL (no atexit then)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Proc:
    """A child started in its own session, so that one killpg reaches everything
    it forks. Every live Proc is stopped at exit, whatever the exit path, and dies
    with the bench if the bench is killed."""

    live: set["Proc"] = set()

    def __init__(self, name: str, argv: list[str], logdir: Path, env: dict | None = None, cwd: Path | None = None):
        self.name = name
        self.log = logdir / f"{name.replace('/', '_')}.{time.monotonic_ns()}.log"
        with open(self.log, "wb") as out:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True, env=env, cwd=cwd, preexec_fn=_die_with_parent)
        self.pid = self.popen.pid
        Proc.live.add(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _why(self, what: str) -> str:
        """One summary line (with the log's last line) for the console, then the log tail for the JSON."""
        tail = self.tail()
        return f"{self.name} {what}: {tail.splitlines()[-1] if tail else '(no output)'}\n{tail}"

    def wait_listening(self, port: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not is_listening(port):
            if not self.alive():
                raise RuntimeError(self._why(f"exited with {self.popen.returncode}"))
            if time.monotonic() > deadline:
                raise RuntimeError(self._why(f"not listening on {port} after {timeout:.0f}s"))
            time.sleep(0.02)

    def _group_alive(self) -> bool:
        return any(st[2] == str(self.pid) for st in _all_stats().values())

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the whole group, then SIGKILL whatever is left after `grace`.
        Stays in `live` until done, so a second Ctrl-C mid-stop still leaves it to stop_all."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            # Signal the group only while its id is still ours: while the leader is
            # unreaped or some member remains, the kernel cannot hand the id out again.
            if self.alive() or self._group_alive():
                try:
                    os.killpg(self.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and (self.alive() or self._group_alive()):
                time.sleep(0.05)
            if not (self.alive() or self._group_alive()):
                break
        try:
            self.popen.wait(timeout=1)
        except subprocess.TimeoutExpired:
            pass
        Proc.live.discard(self)


@atexit.register
def stop_all() -> None:
    for proc in list(Proc.live):
        proc.stop(grace=2.0)


# ------------------------------------------------------------------- CPU placement

# role (relay, server, client) -> CPU list for taskset, when --pin or --pin-layout is given, for every
# relay alike. Without it the scheduler places them, and on two cores that placement moves results by
# ±10% and more. A layout names what shares CPU 1 with the relay: "apart" (--pin) leaves the relay
# alone there, "with-server" puts the backend server beside it, "with-client" the load generator.
PIN_LAYOUTS = {
    "apart": {"relay": "1", "server": "0", "client": "0"},
    "with-server": {"relay": "1", "server": "1", "client": "0"},
    "with-client": {"relay": "1", "server": "0", "client": "1"},
}
PIN: dict[str, str] = {}


def pin_layout(pin: bool, layout: str | None) -> str | None:
    """Pin the roles as --pin (apart) or --pin-layout asks; the layout in force, or None."""
    name = layout or ("apart" if pin else None)
    if name:
        PIN.update(PIN_LAYOUTS[name])
    return name


def describe_layout(name: str) -> str:
    cpus = PIN_LAYOUTS[name]
    return f"--pin-layout {name}: " + ", ".join(f"{role} on CPU {cpu}" for role, cpu in cpus.items()) + " (taskset)"


def pinned(role: str, argv: list[str]) -> list[str]:
    cpus = PIN.get(role)
    return ["taskset", "-c", cpus, *argv] if cpus else argv


# ------------------------------------------------------------------- relays

@dataclass
class RelaySpec:
    name: str                # row label: direct, fastmesh, fastmesh[py], haproxy, pair[exchange], ...
    kind: str                # direct | fastmesh | haproxy | nginx | socat | prototype | pair | routed
    args: list[str] = field(default_factory=list)   # extra fastmesh CLI args
    env: dict[str, str] = field(default_factory=dict)
    tls: str = ""            # "client": TLS toward the upstream; "server": TLS from clients (mtls.py)
    tls_protocols: str = ""  # nginx's protocol list for that TLS, e.g. "TLSv1.3" ("": nginx's default)
    outbound: "RelaySpec | None" = None   # a pair's two relays: clients reach `outbound`,
    inbound: "RelaySpec | None" = None    # which relays to `inbound`, in front of the backend

    def describe(self) -> dict:
        """What the JSON records of a row."""
        if self.kind == "pair":
            return {"kind": "pair", "outbound": self.outbound.describe(), "inbound": self.inbound.describe()}
        return {"kind": self.kind, "args": self.args, "env": self.env, **({"tls": self.tls} if self.tls else {}),
                **({"tls_protocols": self.tls_protocols} if self.tls_protocols else {})}


NODE_METADATA = REPO / "examples" / "node-metadata"


ROUTED = "fastmesh[routed]"


def routed_spec() -> RelaySpec:
    """fastmesh configured by Istio's kinds (ServiceEntry, WorkloadEntry, DestinationRule with a
    subset and LEAST_CONN, VirtualService tcp route): the routing-overhead bar."""
    return RelaySpec(ROUTED, "routed")


def _routed_config(port: int, upstream: int, tmp: Path) -> Path:
    path = tmp / f"routed-{port}.yaml"
    path.write_text(f"""\
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {{name: backend}}
spec:
  hosts: [backend.default.svc.cluster.local]
  ports: [{{number: {upstream}, name: tcp}}]
  resolution: STATIC
  endpoints: [{{address: {HOST}, labels: {{version: v1}}}}]
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: backend}}
spec:
  host: backend
  trafficPolicy: {{loadBalancer: {{simple: LEAST_CONN}}, connectionPool: {{tcp: {{maxConnections: 100000}}}}}}
  subsets: [{{name: v1, labels: {{version: v1}}}}]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {{name: backend}}
spec:
  hosts: [backend]
  tcp: [{{route: [{{destination: {{host: backend, subset: v1}}, weight: 100}}]}}]
---
apiVersion: fastmesh.io/v1alpha1
kind: Sidecar
metadata: {{name: bench}}
spec:
  outbound: [{{port: {port}, bind: {HOST}, host: backend, servicePort: {upstream}}}]
  metrics: {HOST}:0
  admin: {HOST}:0
""")
    return path


def _pair(name: str, outbound: RelaySpec, inbound: RelaySpec) -> RelaySpec:
    return RelaySpec(name, "pair", outbound=outbound, inbound=inbound)


OUTBOUND_SIDECAR = ["--node-metadata", str(NODE_METADATA / "ratings-v2.yaml")]
INBOUND_SIDECAR = ["--direction", "inbound", "--node-metadata", str(NODE_METADATA / "mongodb-v1.yaml")]


def _fastmesh_pair(name: str, outbound: list[str], inbound: list[str], tls: bool = False) -> RelaySpec:
    return _pair(name, RelaySpec(name, "fastmesh", [*OUTBOUND_SIDECAR, *outbound], tls="client" if tls else ""),
                 RelaySpec(f"{name}:inbound", "fastmesh", [*INBOUND_SIDECAR, *inbound], tls="server" if tls else ""))


def relay_pair(kind: str, tls: bool = False, protocols: str = "", label: str = "") -> RelaySpec:
    """The same two hops made of haproxy or nginx: `kind[pair]`, or `kind[tls-pair]` with mutual TLS
    between them (mtls.py); `protocols`: nginx's TLS versions on both sides, in a row `kind[label]`."""
    name = f"{kind}[{label or ('tls-pair' if tls else 'pair')}]"
    return _pair(name, RelaySpec(name, kind, tls="client" if tls else "", tls_protocols=protocols),
                 RelaySpec(f"{name}:inbound", kind, tls="server" if tls else "", tls_protocols=protocols))


def sidecar_pairs() -> list[RelaySpec]:
    """Two fastmesh sidecars in a row (ratings-v2's outbound, then the database's
    inbound), with the peer metadata exchange (fastmesh's plaintext variant) on
    and off: the exchange-cost bars."""
    return [
        _fastmesh_pair("pair[exchange]", ["--mesh-peer", "--plaintext-exchange"], ["--plaintext-exchange"]),
        _fastmesh_pair("pair[no-exchange]", ["--no-exchange"], ["--no-exchange"]),
    ]


def mtls_pairs() -> list[RelaySpec]:
    """Pairs whose middle hop is mutual TLS: fastmesh with the exchange
    negotiated by ALPN (Istio's way between sidecars) and without it, HAProxy and
    nginx stream set up as their users would for a mesh (mtls.py), and the
    plaintext fastmesh pair for reference."""
    tls_pair = [
        _fastmesh_pair("pair[mtls]", ["--mesh-peer"], [], tls=True),
        _fastmesh_pair("pair[mtls-no-exchange]", ["--mesh-peer", "--no-exchange"], ["--no-exchange"], tls=True),
    ]
    tls_pair += [relay_pair(kind, tls=True) for kind in ("haproxy", "nginx")]
    # nginx before 1.23.4 speaks TLS 1.2 between the pair unless told otherwise; Istio's sidecars, fastmesh,
    # HAProxy and later nginx speak TLS 1.3: the same nginx, told to.
    tls_pair.append(relay_pair("nginx", tls=True, protocols="TLSv1.3", label="tls13-pair"))
    return [*tls_pair, sidecar_pairs()[0]]


def parse_variant(text: str) -> RelaySpec:
    """NAME=ARGS, e.g. 'py=FASTMESH_NO_EXTENSIONS=1' or 'w2=--workers 2';
    leading VAR=VALUE words of ARGS go to the environment, the rest to the CLI."""
    name, _, rest = text.partition("=")
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"bad variant {text!r}: expected NAME=ARGS")
    words = shlex.split(rest)
    env = {}
    while words and "=" in words[0] and not words[0].startswith("-"):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    return RelaySpec(f"fastmesh[{name}]", "fastmesh", words, env)


def fastmesh_env(extra: dict[str, str]) -> dict[str, str]:
    # Run the working tree's package even when it is not pip-installed; a variant's
    # FASTMESH_SRC=DIR runs the package in DIR instead (another build, side by side).
    env = dict(os.environ, **extra)
    src = env.pop("FASTMESH_SRC", None) or str(REPO / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def fastmesh_version(spec: RelaySpec) -> str | None:
    """`fastmesh --version` (which names the engine), or None if it does not run."""
    r = subprocess.run([sys.executable, "-m", "fastmesh", "--version"], capture_output=True, text=True,
                       env=fastmesh_env(spec.env), timeout=60)
    return r.stdout.strip() if r.returncode == 0 else None


@dataclass
class Options:
    haproxy_threads: int = 1
    socat_backlog: int | None = None   # None: socat's own default of 5, as the command is usually written
    nofile: int = 1 << 20    # RLIMIT_NOFILE hard limit the relays inherit
    certs: mtls.MeshCerts | None = None   # the mesh identities of TLS rows

    @property
    def haproxy_maxconn(self) -> int:
        """20000, unless the descriptor limit cannot hold it: haproxy refuses to start
        when it cannot raise its limit to 2 fds per connection plus splice pipes
        (maxpipes = maxconn/4, 2 fds each), i.e. 2.5 x maxconn."""
        return min(20000, int((self.nofile - 100) / 2.5))


def _haproxy(spec: RelaySpec, port: int, upstream: int, tmp: Path, opts: Options) -> list[str]:
    cfg = tmp / f"haproxy-{port}.cfg"
    # Hour-long timeouts: nothing may be cut during a run (the idle test holds
    # connections silent). splice-auto lets haproxy move bytes kernel-side.
    cfg.write_text(f"""\
global
    maxconn {opts.haproxy_maxconn}
    nbthread {opts.haproxy_threads}
defaults
    mode tcp
    option splice-auto
    maxconn {opts.haproxy_maxconn}
    timeout connect 5s
    timeout client 1h
    timeout server 1h
listen relay
    bind {HOST}:{port}{mtls.haproxy_bind(spec.tls, opts.certs)}
    server backend {HOST}:{upstream}{mtls.haproxy_server(spec.tls, opts.certs)}
""")
    return [which("haproxy"), "-db", "-f", str(cfg)]


def _nginx(spec: RelaySpec, port: int, upstream: int, tmp: Path, opts: Options) -> list[str]:
    prefix = Path(tempfile.mkdtemp(prefix=f"nginx-{port}-", dir=tmp))  # a port may come round again in one run
    module = nginx_stream_module()
    load = f"load_module {module};\n" if module else ""
    (prefix / "nginx.conf").write_text(f"""\
{load}worker_processes 1;
worker_rlimit_nofile {min(50000, opts.nofile)};
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 20000; }}
stream {{
    server {{
        listen {HOST}:{port}{mtls.nginx_listen(spec.tls)};
        proxy_pass {HOST}:{upstream};
        proxy_timeout 1h;
{mtls.nginx_directives(spec.tls, opts.certs, spec.tls_protocols)}    }}
}}
""")
    # -e: the error log before the config is read; -p: keep every path in the temp dir.
    return [which("nginx"), "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]


def _socat(spec: RelaySpec, port: int, upstream: int, tmp: Path, opts: Options) -> list[str]:
    backlog = f",backlog={opts.socat_backlog}" if opts.socat_backlog else ""
    return [which("socat"), f"TCP-LISTEN:{port},bind={HOST},fork,reuseaddr,nodelay{backlog}",
            f"TCP:{HOST}:{upstream},nodelay"]


PROTOTYPE = REPO / "bench" / "uring"
# --relays names of bench/uring's minimal C relay, on each of its two backends: the floor a relay's
# own code can reach on this kernel, the io_uring one being what an io_uring engine could at best save.
PROTOTYPES = {"proto-epoll": "epoll", "proto-uring": "uring"}


def prototype_binary(tmp: Path) -> Path:
    """bench/uring's relay, built once per run into `tmp` (gcc and liburing-dev)."""
    binary = tmp / "uring-prototype"
    if not binary.exists():
        r = subprocess.run(["make", "-s", "-C", str(PROTOTYPE), f"OUT={binary}"], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"building bench/uring/relay failed (gcc and liburing-dev needed): {r.stderr[-300:]}")
    return binary


def _prototype(spec: RelaySpec, port: int, upstream: int, tmp: Path, opts: Options) -> list[str]:
    return [str(prototype_binary(tmp)), f"--{PROTOTYPES[spec.name]}", "--listen", f"{HOST}:{port}",
            "--upstream", f"{HOST}:{upstream}"]


def _fastmesh(spec: RelaySpec, port: int, upstream: int, tmp: Path, opts: Options) -> list[str]:
    # Admin and metrics on free ports: telemetry stays on unless a variant says --no-metrics.
    tls = mtls.fastmesh_args(spec.tls, opts.certs) if spec.tls else []
    return [sys.executable, "-m", "fastmesh", "serve", "--listen", f"{HOST}:{port}",
            "--upstream", f"{HOST}:{upstream}", "--admin", f"{HOST}:0", "--metrics", f"{HOST}:0", *spec.args, *tls]


@dataclass
class Relay:
    name: str
    port: int                # where clients connect
    proc: Proc | None        # None for direct
    behind: Proc | None = None  # a pair's inbound sidecar

    @property
    def pids(self) -> list[int]:
        """The relay's processes (CPU and memory are summed over their trees)."""
        return [p.pid for p in (self.proc, self.behind) if p is not None]


@contextmanager
def running(spec: RelaySpec, upstream: int, tmp: Path, opts: Options) -> Iterator[Relay]:
    """Start the relay in front of `upstream`, yield once it listens, always stop it."""
    if spec.kind == "direct":
        yield Relay(spec.name, upstream, None)
        return
    if spec.kind == "pair":
        with running(spec.inbound, upstream, tmp, opts) as inbound:
            with running(spec.outbound, inbound.port, tmp, opts) as outbound:
                yield Relay(spec.name, outbound.port, outbound.proc, behind=inbound.proc)
        return
    port = free_port()
    env = None
    if spec.kind == "fastmesh":
        argv, env = _fastmesh(spec, port, upstream, tmp, opts), fastmesh_env(spec.env)
    elif spec.kind == "routed":
        argv = [sys.executable, "-m", "fastmesh", "serve", "-c", str(_routed_config(port, upstream, tmp))]
        env = fastmesh_env(spec.env)
    else:
        argv = {"haproxy": _haproxy, "nginx": _nginx, "socat": _socat,
                "prototype": _prototype}[spec.kind](spec, port, upstream, tmp, opts)
    proc = Proc(spec.name, pinned("relay", argv), tmp, env=env, cwd=tmp)
    try:
        proc.wait_listening(port)
        yield Relay(spec.name, port, proc)
    finally:
        proc.stop()
