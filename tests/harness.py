"""Helpers for the integration scripts that drive a real `mlx-serving serve`: numbered checks, servers on free
ports that are killed when the script ends (on failure too), JSON over HTTP, and /metrics as a dict."""
import atexit, json, socket, subprocess, time, urllib.error, urllib.request

checks = 0
servers = []
atexit.register(lambda: [p.kill() for p in servers if p.poll() is None])


def check(cond, what):
    global checks
    if not cond:
        raise SystemExit(f"FAILED: {what}")
    checks += 1
    print(f"ok - {what}", flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(binary, args):
    """Starts `binary serve ARGS` and waits until /health answers; returns (process, port)."""
    port = free_port()
    return start_command([binary, "serve", "--port", str(port)] + args, port), port


def start_command(cmd, port, health="/health", **popen):
    """Starts any server command listening on `port` and waits until its `health` path answers 200; returns
    the process (killed when the script ends)."""
    proc = subprocess.Popen(cmd, **popen)
    servers.append(proc)
    for _ in range(1200):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{health}", timeout=1) as r:
                if r.status == 200:
                    return proc
        except Exception:
            if proc.poll() is not None:
                raise SystemExit(f"server exited with {proc.returncode}")
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not become healthy")


def stop(proc):
    proc.terminate()
    proc.wait(timeout=60)


def http(port, method, path, body=None):
    """(status, lower-cased headers, parsed JSON body)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, json.loads(e.read() or b"null")


def metrics(port):
    """Every sample of /metrics, keyed by name with labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def redis_server(port):
    """Starts a real redis-server on loopback `port` (no persistence) and waits until it accepts connections."""
    p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    servers.append(p)
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return p
        except OSError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")
