#!/usr/bin/env python3
"""Go<->Go smoke check of the interop peer: gopeer client <-> gopeer server, both real remotedialer.

Starts `gopeer echo`, `gopeer server` and `gopeer client` on loopback with OS-chosen ports, then:
  1. a short echo through a server-initiated stream (server forward port),
  2. a short echo through a client-initiated stream (client forward port),
  3. --mib MiB one way, SHA-256 checked, through both stream kinds and in both directions
     (upload: we send into the forward port, our own TCP target receives; download: the other
     way), printing the throughput; the sender's close must arrive after all the data,
  4. a dial to an unknown client key: the forward connection is closed with nothing written,
  5. a websocket request without X-Tunnel-ID: HTTP 401 "failed authentication",
  6. a Connect the client's authorizer refuses: the Go client logs "connect not allowed",
     drops the session and reconnects (a second {"connected":true} line).
With --bulk-echo-mib N it also tries an N MiB full-duplex echo, which remotedialer itself can
deadlock (see README.md); that probe only reports, it never fails the run.

Everything is bounded in time; all processes are killed at the end. Exit status 0 = all passed.

Usage: tests/interop/smoke_go_go.py [--gopeer PATH] [--mib N] [--bulk-echo-mib N]
(without --gopeer it runs tests/interop/build.sh first).
"""

import argparse
import hashlib
import http.client
import json
import os
import queue
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OVERALL_DEADLINE = time.monotonic() + 300  # the whole run, whatever happens
IO_TIMEOUT = 30  # any one socket operation
BLOCK = 1 << 20
PASSED = 0


def ok(msg):
    global PASSED
    PASSED += 1
    print("ok   " + msg, flush=True)


class Peer:
    """A gopeer process: stdout JSON lines arrive on a queue, stderr goes to a temp file."""

    def __init__(self, binary, name, args):
        self.name = name
        self.err = tempfile.NamedTemporaryFile(prefix=f"gopeer-{name}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([binary, *args], stdout=subprocess.PIPE, stderr=self.err,
                                     stdin=subprocess.DEVNULL)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for raw in self.proc.stdout:
            self.lines.put(json.loads(raw))

    def next_line(self, timeout=10):
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.name}: no stdout line within {timeout}s") from None

    def stderr_text(self):
        with open(self.err.name, errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def connect(addr):
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=IO_TIMEOUT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exactly(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def send_random(s, size, seed):
    """Send `size` pseudo-random bytes, then close; return their SHA-256."""
    h, rng, left = hashlib.sha256(), random.Random(seed), size
    while left:
        block = rng.randbytes(min(left, BLOCK))
        h.update(block)
        s.sendall(block)
        left -= len(block)
    s.close()
    return h.digest()


def recv_to_eof(s):
    """Read until EOF; return (byte count, SHA-256)."""
    h, n = hashlib.sha256(), 0
    while True:
        assert time.monotonic() < OVERALL_DEADLINE, "overall deadline passed"
        chunk = s.recv(BLOCK)
        if not chunk:
            return n, h.digest()
        h.update(chunk)
        n += len(chunk)


def in_thread(fn, *args):
    """Run fn(*args) in a thread; the returned join() gives its result or raises its error."""
    box = {}

    def run():
        try:
            box["ok"] = fn(*args)
        except BaseException as e:  # handed to the joining thread
            box["err"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def join():
        t.join(timeout=max(1, OVERALL_DEADLINE - time.monotonic()))
        if t.is_alive():
            raise AssertionError("worker thread did not finish in time")
        if "err" in box:
            raise box["err"]
        return box["ok"]
    return join


def one_way(fwd, header, target_ln, size, upload):
    """Move `size` bytes through the tunnel in one direction; return (MiB/s, seconds).

    The sender closes its socket when done; because the protocol has no half-close, that
    closes the whole stream, and the receiver must still get every byte before its EOF."""
    start = time.monotonic()
    s = connect(fwd)
    s.sendall(header.encode())
    t, _ = target_ln.accept()
    t.settimeout(IO_TIMEOUT)
    sender, receiver = (s, t) if upload else (t, s)
    with s, t:
        sent = in_thread(send_random, sender, size, 7)
        got_n, got_hash = recv_to_eof(receiver)
        sent_hash = sent()
    elapsed = time.monotonic() - start
    assert got_n == size, f"received {got_n} of {size} bytes"
    assert got_hash == sent_hash, "SHA-256 differs"
    return size / BLOCK / elapsed, elapsed


def small_echo(fwd, header):
    with connect(fwd) as s:
        msg = b"hello through the tunnel\n" * 3
        # header and payload in one write: the forward listener must not lose buffered payload
        s.sendall(header.encode() + msg)
        got = recv_exactly(s, len(msg))
        assert got == msg, f"echo mismatch: {got!r}"


def bulk_echo_probe(fwd, header, size):
    """Full-duplex echo of `size` bytes; returns a one-line report (never raises on a stall)."""
    with connect(fwd) as s:
        s.settimeout(10)
        s.sendall(header.encode())
        progress = {"sent": 0}

        def sender():
            block = b"\x5a" * BLOCK
            while progress["sent"] < size:
                s.sendall(block)
                progress["sent"] += BLOCK
        in_thread(sender)
        start, got = time.monotonic(), 0
        try:
            while got < size:
                chunk = s.recv(BLOCK)
                if not chunk:
                    return f"closed after {got} of {size} bytes echoed"
                got += len(chunk)
        except TimeoutError:
            return (f"STALLED: no echo for 10 s after {got >> 20} MiB echoed "
                    f"({progress['sent'] >> 20} MiB sent)")
        secs = time.monotonic() - start
        return f"{size >> 20} MiB echoed in {secs:.2f} s ({size / BLOCK / secs:.0f} MiB/s each way)"


def expect_closed_without_data(fwd, header):
    """The forward connection must end (EOF or reset) without a single byte coming back."""
    with connect(fwd) as s:
        s.sendall(header.encode())
        try:
            data = s.recv(1)
        except ConnectionResetError:
            data = b""
        assert data == b"", "expected the forward connection to be closed with no data"


def http_status(ws_url, headers):
    hostport = ws_url.split("//", 1)[1].split("/", 1)[0]
    host, port = hostport.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=IO_TIMEOUT)
    try:
        c.request("GET", "/connect", headers=headers)
        r = c.getresponse()
        return r.status, r.read().decode()
    finally:
        c.close()


def wait_for(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gopeer", help="gopeer binary (default: build with build.sh)")
    ap.add_argument("--mib", type=int, default=100, help="size of each one-way transfer")
    ap.add_argument("--bulk-echo-mib", type=int, default=0, help="also probe a full-duplex echo")
    opts = ap.parse_args()
    binary = opts.gopeer or subprocess.run([os.path.join(HERE, "build.sh")], check=True,
                                           stdout=subprocess.PIPE, text=True,
                                           timeout=600).stdout.strip()
    key = "smoke-client"
    peers = []
    target_ln = socket.create_server(("127.0.0.1", 0))  # our own TCP target for one-way tests
    target_ln.settimeout(IO_TIMEOUT)
    target = "127.0.0.1:%d" % target_ln.getsockname()[1]
    try:
        echo = Peer(binary, "echo", ["echo", "--listen", "127.0.0.1:0"])
        peers.append(echo)
        server = Peer(binary, "server", ["server", "--listen", "127.0.0.1:0",
                                         "--forward-listen", "127.0.0.1:0"])
        peers.append(server)
        echo_addr = echo.next_line()["addr"]
        srv = server.next_line()
        client = Peer(binary, "client", ["client", "--url", srv["ws"], "--id", key,
                                         "--forward-listen", "127.0.0.1:0",
                                         "--docker-socket", "/var/run/docker.sock"])
        peers.append(client)
        cli_fwd = client.next_line()["forward"]
        assert client.next_line() == {"connected": True}

        small_echo(srv["forward"], f"{key} tcp {echo_addr}\n")
        ok("server-initiated stream echoes")
        small_echo(cli_fwd, f"tcp {echo_addr}\n")
        ok("client-initiated stream echoes")

        size = opts.mib << 20
        for kind, fwd, header in [("server-initiated", srv["forward"], f"{key} tcp {target}\n"),
                                  ("client-initiated", cli_fwd, f"tcp {target}\n")]:
            for upload in (True, False):
                rate, secs = one_way(fwd, header, target_ln, size, upload)
                way = "forward port -> target" if upload else "target -> forward port"
                ok(f"{kind} stream, {opts.mib} MiB {way}, SHA-256 matches: "
                   f"{secs:.2f} s, {rate:.0f} MiB/s")

        if opts.bulk_echo_mib:
            for kind, fwd, header in [("server-initiated", srv["forward"], f"{key} tcp {echo_addr}\n"),
                                      ("client-initiated", cli_fwd, f"tcp {echo_addr}\n")]:
                print(f"note {kind} full-duplex echo probe: "
                      f"{bulk_echo_probe(fwd, header, opts.bulk_echo_mib << 20)}", flush=True)

        expect_closed_without_data(srv["forward"], f"no-such-key tcp {echo_addr}\n")
        wait_for(lambda: "failed to find Session for client no-such-key" in server.stderr_text(),
                 5, "the server's dial error in its log")
        ok("dial to an unknown client key closes the forward connection")

        status, body = http_status(srv["ws"], {"Connection": "Upgrade", "Upgrade": "websocket"})
        assert (status, body) == (401, "failed authentication"), (status, body)
        ok("no X-Tunnel-ID: 401 failed authentication")

        # A Connect the client refuses kills the whole session (spec 2.6); the client reconnects.
        # The dial itself "succeeds" (the protocol has no acknowledgement); then the stream dies.
        expect_closed_without_data(srv["forward"], f"{key} unix /not/the/docker.sock\n")
        wait_for(lambda: "connect not allowed" in client.stderr_text(), 5, "'connect not allowed'")
        assert client.next_line(timeout=10) == {"connected": True}, "client did not reconnect"
        small_echo(srv["forward"], f"{key} tcp {echo_addr}\n")
        ok("refused Connect: client logs 'connect not allowed', reconnects, works again")
    except BaseException:
        for p in peers:
            print(f"--- {p.name} stderr ({p.err.name}):\n{p.stderr_text()[-4000:]}", file=sys.stderr)
        raise
    finally:
        target_ln.close()
        for p in peers:
            p.stop()
    for p in peers:
        os.unlink(p.err.name)
    print(f"smoke_go_go: {PASSED} passed, 0 failed")


if __name__ == "__main__":
    try:
        main()
    except AssertionError as e:
        print(f"FAIL {e}", file=sys.stderr)
        sys.exit(1)
