#!/usr/bin/env python3
# SPDX-License-Identifier: LGPL-2.1-or-later
"""blockstream-nbd-relay, driven the way blockstreamd drives it, without the daemon.

The test plays the daemon: it binds the listening socket (fd 3), holds the other end of the
SOCK_SEQPACKET control socket (fd 4), and answers "connect <n>" by connecting to a real NBD
server (qemu-nbd on a private unix socket, or a permissive fake server that offers several
exports) and passing the fd. Real NBD clients (nbdinfo, nbdcopy from libnbd-bin) then read the
image through the relay; raw sockets check the handshake the relay proxies (only the pinned
export can be listed or opened, whatever a client sends) and the transmission phase after it
(requests checked and let in within a budget, replies followed, half-close, limits, timeouts).

Usage: test-nbd-relay.py RELAY [SELFTEST-RELAY] [--valgrind]
  RELAY           the installed binary
  SELFTEST-RELAY  the same source built with -DRELAY_SELFTEST (hooks for the seccomp and
                  timeout tests); those tests are skipped without it
  --valgrind      run every relay under memcheck (the selftest build, which then also allows
                  valgrind's own syscalls); any memcheck error fails the test
Prints TAP."""

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback

from unixsock import listening

args = [a for a in sys.argv[1:] if not a.startswith("--")]
VALGRIND = "--valgrind" in sys.argv[1:]
RELAY = args[0]
SELFTEST = args[1] if len(args) > 1 else None
VALGRIND_ERROR = 99
TIMEOUT = 60 if VALGRIND else 10  # for anything that should happen "at once"

tmpdir = tempfile.mkdtemp(prefix="test-nbd-relay-")


sock_counter = itertools.count()
EXPORT = "disk"  # the pinned name; qemu-nbd serves its image under it


class Failure(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failure(what)


def wait_until(pred, what, timeout=TIMEOUT):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(0.01)
    raise Failure("timed out waiting for " + what)


class Daemon(threading.Thread):
    """The daemon's end of the control socket. Records every line; with an upstream path,
    answers each "connect <n>" with a fresh connection to it."""

    def __init__(self, sock, upstream=None):
        super().__init__(daemon=True)
        self.sock = sock
        self.upstream = upstream
        self.lines = []
        self.cond = threading.Condition()
        self.eof = False
        self.reading = threading.Event()
        self.reading.set()
        self.start()

    def run(self):
        while True:
            self.reading.wait()
            try:
                data = self.sock.recv(4096)
            except OSError:
                data = b""
            if not data:
                with self.cond:
                    self.eof = True
                    self.cond.notify_all()
                return
            line = data.decode("ascii")
            with self.cond:
                self.lines.append(line)
                self.cond.notify_all()
            if line.startswith("connect ") and self.upstream:
                n = int(line.split()[1])
                up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                up.connect(self.upstream)
                socket.send_fds(self.sock, [b"upstream %d\n" % n], [up.fileno()])
                up.close()

    def wait_line(self, pred, what, timeout=TIMEOUT):
        """The first recorded line matching pred (a prefix string or a function)."""
        if isinstance(pred, str):
            prefix = pred
            pred = lambda l: l.startswith(prefix)  # noqa: E731
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                for l in self.lines:
                    if pred(l):
                        return l
                left = end - time.monotonic()
                if left <= 0 or self.eof:
                    raise Failure("no %s from the relay (got %r)" % (what, self.lines))
                self.cond.wait(left)

    def clients(self):
        with self.cond:
            c = [int(l.split()[1]) for l in self.lines if l.startswith("clients ")]
        return c[-1] if c else 0

    def wait_clients(self, k):
        wait_until(lambda: self.clients() == k, "clients %d (now %d)" % (k, self.clients()))

    def connects(self):
        with self.cond:
            return [int(l.split()[1]) for l in self.lines if l.startswith("connect ")]

    def send(self, line, fds=()):
        socket.send_fds(self.sock, [line], list(fds)) if fds else self.sock.send(line)


class Relay:
    """A relay on a listening socket, with the test as its daemon."""

    def __init__(self, listener=None, upstream=None, selftest=None, wait_ready=True, fd3=None, fd4=None,
                 extra_fds=(), ctrl_sndbuf=None, export=EXPORT, args=()):
        exe = RELAY
        env = {"PATH": "/usr/bin:/bin", "BLOCKSTREAM_LOG_LEVEL": "debug"}
        words = list(selftest or [])
        if VALGRIND:
            words.append("valgrind")
        if words:
            if not SELFTEST:
                raise Skip("no selftest build of the relay")
            exe = SELFTEST
            env["BLOCKSTREAM_RELAY_SELFTEST"] = ",".join(words)
        if "ASAN_OPTIONS" in os.environ:
            env["ASAN_OPTIONS"] = os.environ["ASAN_OPTIONS"]
        if "UBSAN_OPTIONS" in os.environ:
            env["UBSAN_OPTIONS"] = os.environ["UBSAN_OPTIONS"]

        if listener is None:
            path = os.path.join(tmpdir, "relay-%d.sock" % next(sock_counter))
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(128)
            self.address = path
        self.listener = listener
        self.ctrl, child_ctrl = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        if ctrl_sndbuf:
            child_ctrl.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, ctrl_sndbuf)
        self.log_r, log_w = os.pipe()

        argv = [exe, "--export=" + export] + list(args)
        if VALGRIND:
            argv = ["valgrind", "-q", "--vgdb=no", "--error-exitcode=%d" % VALGRIND_ERROR, "--leak-check=full",
                    "--show-leak-kinds=definite,indirect", "--errors-for-leak-kinds=definite,indirect",
                    "--track-fds=no"] + argv
            exe = shutil.which("valgrind")
        # posix_spawn, not preexec_fn: the Daemon threads make fork+Python unsafe. Everything the
        # test holds is close-on-exec; the dup2 targets are not.
        hi = [os.dup(x) if isinstance(x, int) else os.dup(x.fileno())
              for x in [fd3 if fd3 is not None else listener, fd4 if fd4 is not None else child_ctrl]]
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
            (os.POSIX_SPAWN_DUP2, log_w, 2),
            (os.POSIX_SPAWN_DUP2, hi[0], 3),
            (os.POSIX_SPAWN_DUP2, hi[1], 4),
        ] + [(os.POSIX_SPAWN_DUP2, fd, target) for fd, target in extra_fds]
        self.pid = os.posix_spawn(exe, argv, env, file_actions=actions)
        for fd in hi + [log_w]:
            os.close(fd)
        child_ctrl.close()
        self.status = None
        self.log = b""
        self.log_thread = threading.Thread(target=self._read_log, daemon=True)
        self.log_thread.start()
        self.daemon = Daemon(self.ctrl, upstream)
        if wait_ready:
            self.daemon.wait_line(lambda l: l == "ready\n", "ready")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read_log(self):
        while True:
            b = os.read(self.log_r, 65536)
            if not b:
                break
            self.log += b
        os.close(self.log_r)

    def connect(self):
        s = socket.socket(self.listener.family, socket.SOCK_STREAM)
        s.settimeout(TIMEOUT)
        s.connect(self.address)
        return s

    def wait(self, timeout=TIMEOUT):
        """Exit status: code >= 0, or -signal."""
        if self.status is None:
            end = time.monotonic() + timeout
            while True:
                pid, st = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.status = os.waitstatus_to_exitcode(st)
                    break
                if time.monotonic() > end:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    raise Failure("the relay did not exit")
                time.sleep(0.01)
            self.log_thread.join(TIMEOUT)
        return self.status

    def alive(self):
        return self.status is None and os.waitpid(self.pid, os.WNOHANG)[0] == 0

    def close(self):
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.wait()
        self.ctrl.close()
        self.listener.close()
        if VALGRIND and self.status == VALGRIND_ERROR:
            raise Failure("memcheck found errors:\n" + self.log.decode(errors="replace"))

    def log_lines(self, what):
        """How many lines of its log so far have `what` in them."""
        return sum(what in line for line in self.log.decode(errors="replace").splitlines())

    def wait_log_lines(self, what, n):
        wait_until(lambda: self.log_lines(what) >= n, "%d log lines with %r" % (n, what))

    def stop(self):
        """Ask it to stop; it must exit 0 (and, under valgrind, without memcheck errors)."""
        self.daemon.send(b"stop\n")
        st = self.wait()
        check(st == 0, "stop: exit status %r, log:\n%s" % (st, self.log.decode(errors="replace")))


class Skip(Exception):
    pass


# The upstream: qemu-nbd serving a random image read-only, like QEMU's own NBD server would.
IMAGE_SIZE = 3 * 1024 * 1024 + 4096
image = os.path.join(tmpdir, "image.raw")
upstream_path = os.path.join(tmpdir, "upstream.sock")
qemu_nbd = None


def start_upstream():
    global qemu_nbd, image_sha
    data = os.urandom(IMAGE_SIZE)
    image_sha = hashlib.sha256(data).hexdigest()
    with open(image, "wb") as f:
        f.write(data)
    qemu_nbd = subprocess.Popen(["qemu-nbd", "--read-only", "--persistent", "--shared=16", "-k", upstream_path,
                                 "-x", EXPORT, "-f", "raw", image], stdin=subprocess.DEVNULL)
    wait_until(lambda: listening(upstream_path), "qemu-nbd listening")  # not only bound


def need_tools(*tools):
    for t in tools:
        if not shutil.which(t):
            raise Skip(t + " not installed")


def uri(relay, name=EXPORT):
    if relay.listener.family == socket.AF_UNIX:
        return "nbd+unix:///%s?socket=%s" % (name, relay.address)
    host, port = relay.address
    return "nbd://%s:%d/%s" % (host, port, name)


def nbdcopy_sha(relay):
    out = subprocess.run(["nbdcopy", uri(relay), "-"], stdout=subprocess.PIPE, timeout=TIMEOUT * 3, check=True)
    return hashlib.sha256(out.stdout).hexdigest()


# ---- the tests ----

def test_help_version():
    for a in ["--help", "--version"]:
        r = subprocess.run([RELAY, a], stdout=subprocess.PIPE, timeout=TIMEOUT)
        check(r.returncode == 0 and r.stdout, "%s: %r" % (a, r))
    r = subprocess.run([RELAY, "--bogus"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=TIMEOUT)
    check(r.returncode == 1, "an argument must fail: %r" % r)


def test_fds_closed():
    """Only 0-4 survive; fds 5 and 9 given at start are closed."""
    extra = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    with Relay(extra_fds=[(extra, 5), (extra, 9)]) as relay:
        os.close(extra)
        if not VALGRIND:  # valgrind keeps fds of its own
            fds = sorted(int(x) for x in os.listdir("/proc/%d/fd" % relay.pid))
            check(fds == [0, 1, 2, 3, 4], "open fds: %r" % fds)
        with open("/proc/%d/status" % relay.pid) as f:
            st = dict(l.split(":", 1) for l in f.read().splitlines())
        check(st["NoNewPrivs"].strip() == "1", "NoNewPrivs: %r" % st["NoNewPrivs"])
        check(st["Seccomp"].strip() == "2", "Seccomp: %r" % st["Seccomp"])
        relay.stop()


def test_nbd_unix():
    need_tools("nbdinfo", "nbdcopy")
    with Relay(upstream=upstream_path) as relay:
        out = subprocess.run(["nbdinfo", "--size", uri(relay)], stdout=subprocess.PIPE, timeout=TIMEOUT,
                             check=True).stdout
        check(int(out) == IMAGE_SIZE, "nbdinfo --size: %r" % out)
        check(nbdcopy_sha(relay) == image_sha, "nbdcopy read different bytes")
        out = subprocess.run(["nbdcopy", uri(relay, ""), "-"], stdout=subprocess.PIPE, timeout=TIMEOUT * 3,
                             check=True).stdout
        check(hashlib.sha256(out).hexdigest() == image_sha, "nbdcopy of \"\" read different bytes")
        r = subprocess.run(["nbdinfo", "--list", "--json", uri(relay)], stdout=subprocess.PIPE, timeout=TIMEOUT,
                           check=True)
        names = [e["export-name"] for e in json.loads(r.stdout)["exports"]]
        check(names == [EXPORT], "nbdinfo --list: %r" % names)
        r = subprocess.run(["nbdinfo", uri(relay, "other")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=TIMEOUT)
        check(r.returncode != 0, "nbdinfo opened another export: %r" % r)
        relay.daemon.wait_clients(0)
        check(relay.daemon.connects() == [1, 2, 3, 4, 5], "connect ids: %r" % relay.daemon.connects())
        relay.stop()


def test_nbd_tcp():
    need_tools("nbdcopy")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    with Relay(listener=listener, upstream=upstream_path) as relay:
        relay.address = listener.getsockname()
        check(nbdcopy_sha(relay) == image_sha, "nbdcopy over TCP read different bytes")
        relay.stop()


def test_nbd_concurrent():
    """Three nbdcopy at once, each reading the whole image."""
    need_tools("nbdcopy")
    with Relay(upstream=upstream_path) as relay:
        procs = [subprocess.Popen(["nbdcopy", uri(relay), "-"], stdout=subprocess.PIPE) for _ in range(3)]
        shas = []
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT * 3)
            check(p.returncode == 0, "nbdcopy failed")
            shas.append(hashlib.sha256(out).hexdigest())
        check(shas == [image_sha] * 3, "a concurrent nbdcopy read different bytes")
        relay.daemon.wait_clients(0)
        counts = [int(l.split()[1]) for l in relay.daemon.lines if l.startswith("clients ")]
        check(max(counts) >= 1 and counts[-1] == 0, "clients messages: %r" % counts)
        relay.stop()


def test_clients_count():
    """"clients k" tracks connections, waiting or relaying."""
    with Relay() as relay:
        socks = [relay.connect() for _ in range(3)]
        relay.daemon.wait_clients(3)
        wait_until(lambda: len(relay.daemon.connects()) == 3, "three connect messages")
        check(relay.daemon.connects() == [1, 2, 3], "connect ids: %r" % relay.daemon.connects())
        socks.pop().close()
        relay.daemon.wait_clients(2)
        for s in socks:
            s.close()
        relay.daemon.wait_clients(0)
        relay.stop()


def connect_announced(relay):
    """A new client, and its id once the relay has asked the daemon to connect it."""
    seen = len(relay.daemon.connects())
    c = relay.connect()
    n = wait_until(lambda: relay.daemon.connects()[seen:], "connect")[0]
    return c, n


def pair_with_fake_upstream(relay, handshake=True):
    """A client, and the test's end of its upstream: a socketpair handed over as the upstream.
    With handshake, the two ends have gone through NBD_OPT_GO: what follows is raw bytes."""
    c, n = connect_announced(relay)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    relay.daemon.send(b"upstream %d\n" % n, [theirs.fileno()])
    theirs.close()
    mine.settimeout(TIMEOUT)
    if handshake:
        go_through(c, mine)
    return c, mine


# ---- the NBD handshake, raw ----

NBDMAGIC, IHAVEOPT, REPLY_MAGIC = 0x4e42444d41474943, 0x49484156454f5054, 0x3e889045565a9
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 1, 2, 3, 5, 6, 7, 8
OPT_LIST_META, OPT_SET_META = 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META = 1, 2, 3, 4
ERR = 1 << 31
ERR_UNSUP, ERR_POLICY, ERR_INVALID, ERR_UNKNOWN, ERR_TOO_BIG = ERR | 1, ERR | 2, ERR | 3, ERR | 6, ERR | 9
FLAG_HAS_FLAGS, FLAG_READ_ONLY, FLAG_SEND_FLUSH, FLAG_SEND_FUA, FLAG_SEND_CACHE = 1, 2, 4, 8, 1 << 10


def recv_exact(s, n):
    data = b""
    while len(data) < n:
        b = s.recv(n - len(data))
        if not b:
            raise Failure("EOF after %d of %d bytes" % (len(data), n))
        data += b
    return data


def greeting(flags=3):
    return struct.pack(">QQH", NBDMAGIC, IHAVEOPT, flags)


def option(opt, data=b""):
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def name_data(name, info=()):
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(info)) + b"".join(
        struct.pack(">H", i) for i in info)


def meta_data(name, queries=()):
    return struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries)) + b"".join(
        struct.pack(">I", len(q)) + q for q in queries)


def reply(opt, typ, data=b""):
    return struct.pack(">QIII", REPLY_MAGIC, opt, typ, len(data)) + data


def read_reply(s):
    magic, opt, typ, n = struct.unpack(">QIII", recv_exact(s, 20))
    check(magic == REPLY_MAGIC, "reply magic %x" % magic)
    return opt, typ, recv_exact(s, n)


def read_option(s):
    magic, opt, n = struct.unpack(">QII", recv_exact(s, 16))
    check(magic == IHAVEOPT, "option magic %x" % magic)
    return opt, recv_exact(s, n)


def client_start(c, flags=3):
    """The client's side of the greeting: returns once options can be sent. flags 3: fixed
    newstyle, no zeroes after EXPORT_NAME's answer."""
    check(recv_exact(c, 18)[:16] == greeting()[:16], "no NBD greeting")
    c.sendall(struct.pack(">I", flags))


# ---- the transmission phase, raw ----

REQUEST_MAGIC, SIMPLE_MAGIC, STRUCTURED_MAGIC = 0x25609513, 0x67446698, 0x668E33EF
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = range(8)
CMD_FLAG_FUA, CMD_FLAG_REQ_ONE = 1, 8
CHUNK_NONE, CHUNK_OFFSET_DATA = 0, 1
READ_MAX = 32 << 20  # the protocol's and QEMU's largest read, and the relay's budget per connection
IN_FLIGHT_MAX = 16   # QEMU's requests per connection, and the relay's


def request(cmd, handle, offset=0, length=0, flags=0):
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, handle, offset, length)


def free_request(handle, length=0):
    """A request that costs nothing of the relay's budget and has no payload either way: a block
    status of one extent."""
    return request(CMD_BLOCK_STATUS, handle, 0, length, CMD_FLAG_REQ_ONE)


def read_request(s):
    """(command, handle, offset, length) of the next request on s."""
    magic, _, cmd, handle, offset, length = struct.unpack(">IHHQQI", recv_exact(s, 28))
    check(magic == REQUEST_MAGIC, "request magic %x" % magic)
    return cmd, handle, offset, length


def simple_reply(handle, error=0, data=b""):
    return struct.pack(">IIQ", SIMPLE_MAGIC, error, handle) + data


def chunk(handle, typ, payload=b"", done=False):
    return struct.pack(">IHHQI", STRUCTURED_MAGIC, 1 if done else 0, typ, handle, len(payload)) + payload


def pattern(offset, length):
    """The bytes the fake server's export holds at offset: each 8-byte word its own offset."""
    first = offset - offset % 8
    words = b"".join(struct.pack(">Q", o) for o in range(first, offset + length + 8, 8))
    return words[offset - first:offset - first + length]


def check_reads(c, handle=7, offset=5, length=4000):
    """A read through the relay: the reply carries the fake server's bytes."""
    c.sendall(request(CMD_READ, handle, offset, length))
    check(recv_exact(c, 16 + length) == simple_reply(handle, 0, pattern(offset, length)),
          "no transmission phase, or the read came back wrong")


def nothing_comes(s, what, wait=0.5):
    """Nothing arrives on s for wait seconds (the relay holds it back: the relay's hold is what
    is checked, not a race, as everything before it has arrived)."""
    s.settimeout(wait)
    try:
        b = s.recv(1)
    except socket.timeout:
        return
    finally:
        s.settimeout(TIMEOUT)
    check(False, "%s: got %r" % (what, b))


def go_through(c, up, size=1 << 20, flags=FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE):
    """Both sides of a fixed-newstyle handshake through the relay, up to the transmission phase.
    QEMU offers flush, FUA and cache requests on read-only exports too; the relay's clients are
    told of none."""
    up.sendall(greeting())
    client_start(c)
    check(recv_exact(up, 4) == struct.pack(">I", 3), "client flags not passed on")
    c.sendall(option(OPT_GO, name_data(EXPORT.encode())))
    opt, data = read_option(up)
    check((opt, data) == (OPT_GO, name_data(EXPORT.encode())), "GO passed on as %r %r" % (opt, data))
    up.sendall(reply(OPT_GO, REP_INFO, struct.pack(">HQH", 0, size, flags)) + reply(OPT_GO, REP_ACK))
    opt, typ, data = read_reply(c)
    check((opt, typ) == (OPT_GO, REP_INFO), "GO's info: %r" % ((opt, typ),))
    _, got_size, got_flags = struct.unpack(">HQH", data)
    want = (flags | FLAG_READ_ONLY | FLAG_HAS_FLAGS) & ~(FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_CACHE)
    check(got_size == size and got_flags == want, "export info %r %r" % (got_size, got_flags))
    check(read_reply(c)[:2] == (OPT_GO, REP_ACK), "GO's ACK")


def recv_all(s):
    data = b""
    while True:
        b = s.recv(1 << 20)
        if not b:
            return data
        data += b


class FakeServer:
    """A permissive NBD server that offers several exports and opens any name: what QEMU's one
    server per process looks like to the relay. Records every option it gets; after GO or
    EXPORT_NAME it answers requests: reads with pattern(), anything else with a bare reply, until
    DISC. hostile= makes its replies to INFO/GO break the rules."""

    EXPORTS = [b"disk", b"other", b"bsm-1"]
    SIZE = 1 << 20

    def __init__(self, hostile=None):
        self.path = os.path.join(tmpdir, "fake-%d.sock" % next(sock_counter))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(16)
        self.hostile = hostile
        self.seen = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def options(self):
        with self.lock:
            return list(self.seen)

    def _accept(self):
        while True:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _serve(self, s):
        try:
            s.sendall(greeting())
            (cflags,) = struct.unpack(">I", recv_exact(s, 4))
            while True:
                opt, data = read_option(s)
                with self.lock:
                    self.seen.append((opt, data))
                if opt == OPT_LIST:
                    s.sendall(b"".join(reply(opt, REP_SERVER, struct.pack(">I", len(e)) + e) for e in self.EXPORTS)
                              + reply(opt, REP_ACK))
                elif opt in (OPT_INFO, OPT_GO):
                    if self.hostile == "long":
                        s.sendall(struct.pack(">QIII", REPLY_MAGIC, opt, REP_INFO, 1 << 20) + b"x" * 65536)
                    elif self.hostile == "wrong-option":
                        s.sendall(reply(OPT_LIST, REP_ACK))
                    elif self.hostile == "server-list":
                        s.sendall(reply(opt, REP_SERVER, struct.pack(">I", 5) + b"other"))
                    s.sendall(reply(opt, REP_INFO, struct.pack(">HQH", 0, self.SIZE, FLAG_HAS_FLAGS))
                              + reply(opt, REP_ACK))
                    if opt == OPT_GO:
                        break
                elif opt == OPT_EXPORT_NAME:
                    s.sendall(struct.pack(">QH", self.SIZE, FLAG_HAS_FLAGS) + (b"" if cflags & 2 else b"\0" * 124))
                    break
                elif opt in (OPT_LIST_META, OPT_SET_META):
                    s.sendall(reply(opt, REP_META, struct.pack(">I", 1) + b"base:allocation") + reply(opt, REP_ACK))
                elif opt == OPT_STRUCTURED_REPLY:
                    s.sendall(reply(opt, REP_ACK))
                elif opt == OPT_ABORT:
                    s.sendall(reply(opt, REP_ACK))
                    return
                else:
                    s.sendall(reply(opt, ERR_UNSUP))
            while True:  # transmission
                cmd, handle, offset, length = read_request(s)
                if cmd == CMD_DISC:
                    return
                s.sendall(simple_reply(handle, 0, pattern(offset, length) if cmd == CMD_READ else b""))
        except (OSError, Failure):
            pass
        finally:
            s.close()

    def close(self):
        self.sock.close()


@contextlib.contextmanager
def relay_with_fake(hostile=None, **relay_kw):
    """A relay whose daemon connects its clients to a FakeServer; both closed at the end."""
    server = FakeServer(hostile=hostile)
    try:
        with Relay(upstream=server.path, **relay_kw) as relay:
            yield relay, server
    finally:
        server.close()


def started_client(relay):
    c = relay.connect()
    client_start(c)
    return c


def check_closed(c, what):
    try:
        rest = recv_all(c)
    except ConnectionResetError:
        rest = b""
    check(rest == b"", "%s: not closed (got %r)" % (what, rest[:64]))


def check_serves(relay):
    """A well-behaved client still gets the pinned export, to the transmission phase."""
    c = started_client(relay)
    c.sendall(option(OPT_GO, name_data(EXPORT.encode())))
    check(read_reply(c)[1] == REP_INFO, "GO: no INFO")
    check(read_reply(c)[1] == REP_ACK, "GO: no ACK")
    check_reads(c)
    c.close()


def test_pinned_list():
    """NBD_OPT_LIST names the pinned export only, answered by the relay itself."""
    with relay_with_fake() as (relay, server):
        c = started_client(relay)
        c.sendall(option(OPT_LIST))
        opt, typ, data = read_reply(c)
        check((opt, typ) == (OPT_LIST, REP_SERVER), "LIST: %r" % ((opt, typ),))
        check(data == struct.pack(">I", len(EXPORT)) + EXPORT.encode(), "LIST named %r" % data)
        check(read_reply(c)[:2] == (OPT_LIST, REP_ACK), "LIST: no ACK after the one export")
        # Still negotiating: GO for the pinned name works on the same connection.
        c.sendall(option(OPT_GO, name_data(EXPORT.encode())))
        check(read_reply(c)[1] == REP_INFO and read_reply(c)[1] == REP_ACK, "GO after LIST")
        check([o for o, _ in server.options()] == [OPT_GO], "the server saw %r" % server.options())
        c.close()
        relay.stop()


def test_pinned_other_names():
    """INFO, GO and the meta-context options for any other name are refused by the relay (the
    server never sees them); "" means the pinned export and goes on under its name."""
    with relay_with_fake() as (relay, server):
        c = started_client(relay)
        for opt, data in ((OPT_INFO, name_data(b"other")), (OPT_GO, name_data(b"bsm-1", [0, 1])),
                          (OPT_GO, name_data(b"disk ")), (OPT_GO, name_data(b"Disk")), (OPT_INFO, name_data(b"x")),
                          (OPT_LIST_META, meta_data(b"other", [b"base:"])), (OPT_SET_META, meta_data(b"other"))):
            c.sendall(option(opt, data))
            check(read_reply(c)[:2] == (opt, ERR_UNKNOWN), "option %d for %r not refused" % (opt, data))
        check(server.options() == [], "the server saw %r" % server.options())
        # The pinned name, and "" for it.
        c.sendall(option(OPT_LIST_META, meta_data(b"", [b"base:"])))
        check(read_reply(c)[:2] == (OPT_LIST_META, REP_META), "LIST_META_CONTEXT for \"\"")
        check(read_reply(c)[:2] == (OPT_LIST_META, REP_ACK), "LIST_META_CONTEXT's ACK")
        c.sendall(option(OPT_INFO, name_data(b"", [0])))
        opt, typ, data = read_reply(c)
        check((opt, typ) == (OPT_INFO, REP_INFO), "INFO for \"\": %r" % ((opt, typ),))
        check(struct.unpack(">HQH", data)[2] & FLAG_READ_ONLY, "the export is not announced read-only")
        check(read_reply(c)[:2] == (OPT_INFO, REP_ACK), "INFO's ACK")
        check(server.options() == [(OPT_LIST_META, meta_data(b"disk", [b"base:"])), (OPT_INFO, name_data(b"disk", [0]))],
              "the server saw %r" % server.options())
        c.sendall(option(OPT_GO, name_data(b"")))
        check(read_reply(c)[1] == REP_INFO and read_reply(c)[1] == REP_ACK, "GO for \"\"")
        check_reads(c)
        c.close()
        relay.stop()


def test_export_name_other():
    """NBD_OPT_EXPORT_NAME of another export: the connection is closed and the server never sees
    it; the pinned one (and "") opens, read-only."""
    with relay_with_fake() as (relay, server):
        for name in (b"other", b"bsm-1", b"x" * 4096):
            c = started_client(relay)
            c.sendall(option(OPT_EXPORT_NAME, name))
            check_closed(c, "EXPORT_NAME %r" % name[:16])
        check(server.options() == [], "the server saw %r" % server.options())
        for name in (EXPORT.encode(), b""):
            c = started_client(relay)
            c.sendall(option(OPT_EXPORT_NAME, name))
            size, flags = struct.unpack(">QH", recv_exact(c, 10))
            check(size == FakeServer.SIZE and flags & FLAG_READ_ONLY, "EXPORT_NAME %r: %r %r" % (name, size, flags))
            check_reads(c)
            c.close()
        # A client that did not ask for no zeroes gets the server's 124 after the flags (they were
        # read as a reply, and the pair closed: review 31b).
        c = relay.connect()
        client_start(c, flags=1)
        c.sendall(option(OPT_EXPORT_NAME, EXPORT.encode()))
        size, flags, zeroes = struct.unpack(">QH124s", recv_exact(c, 134))
        check(size == FakeServer.SIZE and zeroes == b"\0" * 124, "EXPORT_NAME without no-zeroes: %r %r" % (size, zeroes))
        check_reads(c)
        c.close()
        check(server.options() == [(OPT_EXPORT_NAME, EXPORT.encode())] * 3, "the server saw %r" % server.options())
        relay.stop()


def test_hostile_options():
    """Oversize, malformed and unknown options, TLS and ABORT: refused or closed by the relay,
    which stays up for the next client."""
    with relay_with_fake() as (relay, server):
        # One connection, answered and still negotiating.
        c = started_client(relay)
        for opt, data, want in ((OPT_STARTTLS, b"", ERR_POLICY), (99, b"junk" * 100, ERR_UNSUP),
                                (OPT_LIST, b"x", ERR_INVALID), (OPT_INFO, struct.pack(">I", 100) + b"disk", ERR_INVALID),
                                (OPT_GO, name_data(b"disk", [1, 2])[:-2], ERR_INVALID),
                                (OPT_SET_META, meta_data(b"disk", [b"a", b"b"])[:-1], ERR_INVALID),
                                (OPT_LIST_META, meta_data(b"disk") + b"!", ERR_INVALID)):
            c.sendall(option(opt, data))
            check(read_reply(c)[:2] == (opt, want), "option %d %r: not answered %x" % (opt, data[:16], want))
        c.close()
        # Oversize: ERR_TOO_BIG, then closed.
        c = started_client(relay)
        c.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, 4097) + b"x" * 4097)
        check(read_reply(c)[:2] == (OPT_GO, ERR_TOO_BIG), "oversize option not refused")
        check_closed(c, "oversize option")
        c = started_client(relay)
        c.sendall(struct.pack(">QII", IHAVEOPT, 99, 0xffffffff))
        check(read_reply(c)[:2] == (99, ERR_TOO_BIG), "4 GiB option not refused")
        check_closed(c, "4 GiB option")
        # Garbage instead of an option.
        c = started_client(relay)
        c.sendall(b"GET / HTTP/1.0\r\n\r\n")
        check_closed(c, "garbage")
        # ABORT: acknowledged, closed.
        c = started_client(relay)
        c.sendall(option(OPT_ABORT))
        check(read_reply(c)[:2] == (OPT_ABORT, REP_ACK), "ABORT not acknowledged")
        check_closed(c, "ABORT")
        # Options without end, each answered by the relay itself: closed after 64 (the relay's
        # other clients waited while it answered them: review 31b).
        c = started_client(relay)
        c.sendall(b"".join(option(99) for _ in range(64)))
        for k in range(64):
            check(read_reply(c)[:2] == (99, ERR_UNSUP), "option %d not answered" % k)
        c.sendall(option(99))
        check_closed(c, "a 65th option")
        # A client that leaves halfway through an option.
        c = started_client(relay)
        c.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, 100) + b"x")
        c.close()
        check(server.options() == [], "the server saw %r" % server.options())
        check(relay.alive(), "the relay died")
        check_serves(relay)
        relay.daemon.wait_clients(0)
        relay.stop()


def test_hostile_server_replies():
    """A server that breaks the rules (an endless reply, a reply to another option, a reply type
    that does not belong) costs its client the connection, nothing more."""
    for hostile in ("long", "wrong-option", "server-list"):
        with relay_with_fake(hostile=hostile) as (relay, server):
            c = started_client(relay)
            c.sendall(option(OPT_GO, name_data(EXPORT.encode())))
            check_closed(c, "server reply %s" % hostile)
            check(relay.alive(), "the relay died of %s" % hostile)
            relay.daemon.wait_clients(0)
            relay.stop()


def test_handshake_timeout():
    """A client that never picks an export is closed when the handshake's time is up."""
    with relay_with_fake(selftest=["timeout"]) as (relay, server):
        c = started_client(relay)
        relay.daemon.wait_clients(1)
        check_closed(c, "a silent client")
        relay.daemon.wait_clients(0)
        check(b"no export chosen" in relay.log or wait_until(lambda: b"no export chosen" in relay.log, "log"),
              "not logged")
        relay.stop()


def test_client_gone_while_server_silent():
    """A client that leaves while the server has not even sent its greeting frees its slot at
    once, not when the handshake's time is up (a QEMU that does not accept would otherwise let
    64 departed clients lock everyone out)."""
    with Relay() as relay:
        c, up = pair_with_fake_upstream(relay, handshake=False)
        relay.daemon.wait_clients(1)
        c.close()
        relay.daemon.wait_clients(0)
        check(up.recv(1) == b"", "the upstream of a departed client was not closed")
        up.close()
        relay.stop()


def test_bad_arguments():
    for a in (["--export="], ["--export=a b"], ["--export=" + "x" * 257], ["--export=\x7f"], [],
              ["--export=disk", "--export=disk"], ["--export=disk", "--clients=0"],
              ["--export=disk", "--clients=1025"], ["--export=disk", "--clients=-1"],
              ["--export=disk", "--clients="], ["--export=disk", "--budget=33554431"],
              ["--export=disk", "--budget=1099511627777"], ["--export=disk", "--budget=1e9"],
              ["--export=disk", "--budget"], ["--clients=8"], ["--export=disk", "--verbose"]):
        r = subprocess.run([RELAY] + a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=TIMEOUT)
        check(r.returncode == 1, "%r must fail: %r" % (a, r))


def test_control_backpressure():
    """The daemon reads late: the relay's messages wait, none is lost."""
    with Relay(ctrl_sndbuf=1) as relay:  # the minimum: a few messages fill it
        relay.daemon.reading.clear()
        time.sleep(0.1)  # let the reader block in reading.wait()
        socks = [relay.connect() for _ in range(40)]
        time.sleep(0.3)
        check(relay.alive(), "relay died")
        relay.daemon.reading.set()
        try:
            wait_until(lambda: len(relay.daemon.connects()) == 40, "40 connect messages")
        except Failure as e:
            # Say what the relay did: which connects arrived, and its own account (a client it
            # expired, a send that failed), so that a failure on a loaded machine explains itself.
            log = [l for l in relay.log.decode(errors="replace").splitlines() if "connected" not in l]
            raise Failure("%s: got %r, relay %s; its log: %r" % (
                e, relay.daemon.connects(), "alive" if relay.alive() else "dead", log[-20:]))
        check(relay.daemon.connects() == list(range(1, 41)), "connect ids: %r" % relay.daemon.connects())
        relay.daemon.wait_clients(40)
        for s in socks:
            s.close()
        relay.daemon.wait_clients(0)
        relay.stop()


def test_client_gone_with_a_read_in_flight():
    """A client that closes with a read sent on leaves it to be drained: the server's side stays
    open until its reply came (read and dropped at once, also when its header had come before the
    relay saw the client go), then closes; the slot is free again."""
    with Relay() as relay:
        for data in (b"", b"r" * 5000):
            c, up = pair_with_fake_upstream(relay)
            c.sendall(request(CMD_READ, 1, 0, len(data)))
            check(read_request(up) == (CMD_READ, 1, 0, len(data)), "the read")
            c.close()
            nothing_comes(up, "EOF to the server with a read in flight")
            up.sendall(simple_reply(1, 0, data))
            check(recv_all(up) == b"", "the server's side not closed once the reply came")
            relay.daemon.wait_clients(0)
            up.close()
        relay.stop()


def test_drains_and_eofs_at_any_round():
    """tx_step() stops after 16 rounds a wakeup. A reply header that the 16th round of a drain
    completed waited for a client that was gone, and no fd event came to end it (the drain sat
    until its 30 s deadline); a half-closed client whose last reply ended in the 16th round never
    had its EOF passed on (the pair stayed for good). With n replies buffered at once, one of the
    n below ends on the 16th round for each case. Each case waits for the relay's log to say it read
    the client's EOF before the replies come (it finds the client gone when it passes them on)."""
    with Relay() as relay:
        for n in range(1, 12):
            # A client gone with a 4 KiB read and n empty ones in flight.
            c, up = pair_with_fake_upstream(relay)
            c.sendall(request(CMD_READ, 0, 0, 4096) + b"".join(request(CMD_READ, k, 0, 0) for k in range(1, n + 1)))
            for _ in range(n + 1):
                read_request(up)
            eofs = relay.log_lines(": EOF, passed on once")
            c.close()
            relay.wait_log_lines(": EOF, passed on once", eofs + 1)  # before the replies come
            up.sendall(simple_reply(0, 0, b"r" * 4096) + b"".join(simple_reply(k) for k in range(1, n + 1)))
            check(recv_all(up) == b"", "%d replies drained: the server's side not closed" % (n + 1))
            up.close()
            relay.daemon.wait_clients(0)
            # A half-closed client with n empty reads in flight, all answered at once.
            c, up = pair_with_fake_upstream(relay)
            c.sendall(b"".join(request(CMD_READ, k, 0, 0) for k in range(1, n + 1)))
            eofs = relay.log_lines(": EOF, passed on once")
            c.shutdown(socket.SHUT_WR)
            for _ in range(n):
                read_request(up)
            relay.wait_log_lines(": EOF, passed on once", eofs + 1)  # before the replies come
            up.sendall(b"".join(simple_reply(k) for k in range(1, n + 1)))
            check(recv_exact(c, 16 * n) == b"".join(simple_reply(k) for k in range(1, n + 1)), "the replies")
            check(recv_all(up) == b"", "%d replies: the client's EOF not passed on" % n)
            up.shutdown(socket.SHUT_WR)
            check(recv_all(c) == b"", "no EOF to the client")
            c.close()
            up.close()
            relay.daemon.wait_clients(0)
        relay.stop()


def test_turns_of_refused_clients_do_not_use_up_the_look():
    """With --budget, a look at the waiting requests gave at most 64 turns, counting on each to
    put a request in flight whose reply would wake the relay for the next. A client refused in its
    turn (a write behind its read) puts nothing in flight: 200 of them waiting ahead of a read of
    the same user used up the look that room made, and with nothing in flight and no timer that
    read waited for good (review 33f)."""
    with Relay(args=["--budget=%d" % (2 * READ_MAX), "--clients=300"]) as relay:
        big = [pair_with_fake_upstream(relay) for _ in range(2)]
        for c, up in big:  # the budget taken, the replies held
            c.sendall(request(CMD_READ, 1, 0, READ_MAX))
            check(read_request(up)[1] == 1, "a big read")
        refused = []
        for k in range(200):
            c, up = pair_with_fake_upstream(relay)
            c.sendall(request(CMD_READ, 2, 0, 4096) + request(CMD_WRITE, 3, 0, 512))
            refused.append((c, up))
        c, up = pair_with_fake_upstream(relay)
        c.sendall(request(CMD_READ, 5, 0, 4096))
        nothing_comes(up, "a read let in past the budget")
        for _, bup in big:  # room for every read that waits, at one wakeup
            bup.sendall(simple_reply(1, 5))
        check(read_request(up)[1] == 5, "the read waiting behind the refused ones")
        for rc, rup in refused:
            check_closed(rc, "a client refused in its turn")
            rup.close()
        for bc, bup in big:
            bc.close()
            bup.close()
        relay.stop()


def test_a_look_cut_short_goes_on():
    """A look at the waiting requests stops after 64 turns that let a request in, counting on
    their replies to wake the relay; but their clients need not read them, and a free block
    status (REQ_ONE, no budget) waits only behind others. 70 such turns ahead of a read left it
    waiting for good, with room, nothing that would come and no timer (review 33g). The rest of
    the look comes at once now."""
    with Relay(args=["--budget=%d" % (2 * READ_MAX), "--clients=300"]) as relay:
        big = [pair_with_fake_upstream(relay) for _ in range(2)]
        for c, up in big:  # the budget taken, the replies held
            c.sendall(request(CMD_READ, 1, 0, READ_MAX))
            check(read_request(up)[1] == 1, "a big read")
        first = pair_with_fake_upstream(relay)
        first[0].sendall(request(CMD_READ, 2, 0, 4096))  # waits: the others queue behind it
        nothing_comes(first[1], "a read let in past the budget")
        free = []
        for k in range(70):
            c, up = pair_with_fake_upstream(relay)
            c.sendall(request(CMD_BLOCK_STATUS, 3, 0, 4096, CMD_FLAG_REQ_ONE))
            free.append((c, up))
        c, up = pair_with_fake_upstream(relay)
        c.sendall(request(CMD_READ, 5, 0, 4096))
        for _, bup in big:  # room, at one wakeup; none of the replies after it will come
            bup.sendall(simple_reply(1, 5))
        check(read_request(up)[1] == 5, "the read waiting behind 70 free turns")
        for fc, fup in free + [first] + big:
            fc.close()
            fup.close()
        relay.stop()


def test_half_close():
    """shutdown(SHUT_WR) is passed on each way once what came before it has gone through, and
    to the server once every reply came too (QEMU closes at EOF, and keeps the buffers of the
    reads it has until it has read their data, out of the budget); a half-closed pair still gets
    its replies."""
    with Relay() as relay:
        c, up = pair_with_fake_upstream(relay)
        c.sendall(request(CMD_READ, 1, 0, 5000) + free_request(2))
        c.shutdown(socket.SHUT_WR)
        check(read_request(up) == (CMD_READ, 1, 0, 5000) and read_request(up)[1] == 2, "upstream got the requests")
        nothing_comes(up, "EOF before the replies")
        up.sendall(simple_reply(1, 0, b"r" * 5000))
        time.sleep(0.1)
        check(relay.daemon.clients() == 1, "a half-closed pair is still a client")
        up.sendall(simple_reply(2))
        check(recv_all(up) == b"", "upstream did not get EOF after the replies")
        up.shutdown(socket.SHUT_WR)
        check(recv_all(c) == simple_reply(1, 0, b"r" * 5000) + simple_reply(2),
              "client did not get the replies then EOF")
        relay.daemon.wait_clients(0)
        c.close()
        up.close()
        relay.stop()


def serve_reads(up, n, structured=False):
    """The test's upstream: answers n requests as they come, reads with random bytes (one
    OFFSET_DATA chunk, then a bare DONE, if structured); returns {handle: bytes sent}."""
    sent = {}
    for _ in range(n):
        cmd, handle, offset, length = read_request(up)
        data = os.urandom(length) if cmd == CMD_READ else b""
        sent[handle] = data
        if structured:
            up.sendall(chunk(handle, CHUNK_OFFSET_DATA, struct.pack(">Q", offset) + data)
                       + chunk(handle, CHUNK_NONE, done=True))
        else:
            up.sendall(simple_reply(handle, 0, data))
    return sent


def test_bulk_reads():
    """Reads of 8 MiB in all, 64 at once from the client, in both reply forms: byte-exact, each
    reply whole and in the server's order, through the bounded pipe and the budget."""
    for structured in (False, True):
        with Relay() as relay:
            c, up = pair_with_fake_upstream(relay)
            reads = [(k, k * 131072, 131072) for k in range(64)]
            result = {}
            t = threading.Thread(target=lambda: result.update(serve_reads(up, len(reads), structured)))
            t.start()
            c.sendall(b"".join(request(CMD_READ, k, off, n) for k, off, n in reads))
            got = {}
            for _ in reads:
                if structured:
                    magic, flags, typ, handle, n = struct.unpack(">IHHQI", recv_exact(c, 20))
                    check((magic, flags, typ) == (STRUCTURED_MAGIC, 0, CHUNK_OFFSET_DATA), "chunk %r" % ((magic, flags, typ),))
                    got[handle] = recv_exact(c, n)[8:]
                    check(recv_exact(c, 20) == chunk(handle, CHUNK_NONE, done=True), "no DONE chunk")
                else:
                    magic, error, handle = struct.unpack(">IIQ", recv_exact(c, 16))
                    check((magic, error) == (SIMPLE_MAGIC, 0), "reply %r" % ((magic, error),))
                    got[handle] = recv_exact(c, reads[handle][2])
            t.join(TIMEOUT * 3)
            check(got == result, "the replies differ from what the server sent (structured %s)" % structured)
            c.close()
            up.close()
            relay.daemon.wait_clients(0)
            relay.stop()


def test_reads_in_flight_bounded():
    """The reads let through to the server add up to 32 MiB at most (what QEMU holds for them
    until each reply is read): the rest wait until replies end, then all go through."""
    with Relay() as relay:
        c, up = pair_with_fake_upstream(relay)
        size = 8 << 20
        c.sendall(b"".join(request(CMD_READ, k, 0, size) for k in range(8)))
        first = [read_request(up)[1] for _ in range(READ_MAX // size)]
        check(first == [0, 1, 2, 3], "handles %r" % first)
        nothing_comes(up, "a read over the 32 MiB in flight")
        # One reply read whole by the relay lets one more in.
        got = []

        def client_reads():
            for _ in range(8):
                got.append(struct.unpack(">IIQ", recv_exact(c, 16))[2])
                recv_exact(c, size)
        t = threading.Thread(target=client_reads)
        t.start()
        up.sendall(simple_reply(0, 0, bytes(size)))
        check(read_request(up)[1] == 4, "no read let in after a reply")
        for k in range(1, 8):
            up.sendall(simple_reply(k, 0, bytes(size)))
            if k + 4 < 8:
                check(read_request(up)[1] == k + 4, "no read let in after reply %d" % k)
        t.join(TIMEOUT)
        check(got == list(range(8)), "replies %r" % got)
        # A failed read has no payload, and ends.
        c.sendall(request(CMD_READ, 9, 0, READ_MAX))
        check(read_request(up)[1:] == (9, 0, READ_MAX), "a 32 MiB read not let in")
        up.sendall(simple_reply(9, 5))
        check(recv_exact(c, 16) == simple_reply(9, 5), "the error reply")
        check_reads_through(c, up)
        relay.stop()


def check_reads_through(c, up, handle=77):
    c.sendall(request(CMD_READ, handle, 8, 8))
    check(read_request(up) == (CMD_READ, handle, 8, 8), "a read not passed on")
    up.sendall(simple_reply(handle, 0, b"12345678"))
    check(recv_exact(c, 24) == simple_reply(handle, 0, b"12345678"), "its reply not passed on")


def test_requests_in_flight_counted():
    """At most 16 requests in flight, whatever their size; a structured reply ends with its DONE
    chunk, a simple one at once."""
    with Relay() as relay:
        c, up = pair_with_fake_upstream(relay)
        c.sendall(b"".join(free_request(k, 1 << 30) for k in range(18)))
        check([read_request(up)[1] for _ in range(IN_FLIGHT_MAX)] == list(range(16)), "the first 16")
        nothing_comes(up, "a 17th request in flight")
        up.sendall(chunk(0, CHUNK_NONE))
        check(recv_exact(c, 20) == chunk(0, CHUNK_NONE), "a chunk not passed on")
        nothing_comes(up, "a request let in before its DONE chunk")
        up.sendall(chunk(0, CHUNK_NONE, done=True))
        check(recv_exact(c, 20) == chunk(0, CHUNK_NONE, done=True), "DONE not passed on")
        check(read_request(up)[1] == 16, "no request let in after DONE")
        up.sendall(simple_reply(1))
        check(recv_exact(c, 16) == simple_reply(1), "a simple reply not passed on")
        check(read_request(up)[1] == 17, "no request let in after a simple reply")
        # DISC goes on, uncounted, once every reply came (QEMU closes at it, and keeps the buffers
        # of the reads it has until it has read their data); nothing may follow it.
        c.sendall(request(CMD_DISC, 99))
        nothing_comes(up, "DISC before the replies")
        up.sendall(b"".join(simple_reply(k) for k in range(2, 18)))
        check(recv_exact(c, 16 * 16) == b"".join(simple_reply(k) for k in range(2, 18)), "the replies")
        check(read_request(up)[:2] == (CMD_DISC, 99), "DISC not passed on")
        c.sendall(free_request(100))
        check_closed(c, "a request after DISC")
        relay.stop()


def test_block_status_costs():
    """A block status request costs 1 MiB of the 32 (QEMU's extent array for it), none with
    REQ_ONE (one extent)."""
    with Relay() as relay:
        c, up = pair_with_fake_upstream(relay)
        c.sendall(request(CMD_READ, 0, 0, READ_MAX - (1 << 20)) + request(CMD_BLOCK_STATUS, 1, 0, 1 << 30)
                  + request(CMD_BLOCK_STATUS, 2, 0, 1 << 30, CMD_FLAG_REQ_ONE)
                  + request(CMD_BLOCK_STATUS, 3, 0, 1 << 30))
        check([read_request(up)[1] for _ in range(3)] == [0, 1, 2], "the first three")
        nothing_comes(up, "a block status over the budget")
        up.sendall(simple_reply(1, 22))
        check(recv_exact(c, 16) == simple_reply(1, 22), "the error reply")
        check(read_request(up)[1] == 3, "no block status let in after a reply")
        relay.stop()


def test_server_gone_with_requests_waiting():
    """The server's EOF while requests wait for the budget: they can never be answered, the
    client gets EOF and its place is free (it was held for good)."""
    with Relay() as relay:
        c, up = pair_with_fake_upstream(relay)
        c.sendall(b"".join(request(CMD_READ, k, 0, 8 << 20) for k in range(5)))
        check([read_request(up)[1] for _ in range(4)] == [0, 1, 2, 3], "the first four")
        up.close()
        check_closed(c, "the server gone")
        relay.daemon.wait_clients(0)
        relay.stop()


def test_reply_to_a_request_not_sent():
    """A server that answers a request before it has it (it predicts the handles and stops
    reading) costs its pair the connection: the relay never has more unsent requests than fit."""
    with Relay() as relay:
        c, n = connect_announced(relay)
        up, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the kernel's least: a few KiB
        relay.daemon.send(b"upstream %d\n" % n, [theirs.fileno()])
        theirs.close()
        up.settimeout(TIMEOUT)
        go_through(c, up)
        c.sendall(b"".join(free_request(k) for k in range(2000)))
        ended = []

        def client():
            try:
                recv_all(c)
            except ConnectionResetError:
                pass  # closed with requests it sent unread: a reset
            ended.append(True)
        t = threading.Thread(target=client)
        t.start()
        try:
            for k in range(2000):  # never reading a request
                up.sendall(simple_reply(k))
        except OSError:
            pass  # the relay closed it
        t.join(TIMEOUT)
        check(ended, "the pair was not closed")
        check(relay.alive(), "the relay died")
        relay.daemon.wait_clients(0)
        up.close()
        relay.stop()


def test_requests_refused():
    """What a read-only export never does, or no NBD client sends, closes the client before the
    server sees it (a write's payload would be read into QEMU's memory first). The read it had
    sent on is drained first (QEMU keeps its buffer until it has read the data, whatever becomes
    of the connection): the server's side is closed once its reply came, and dropped. The relay
    serves the next client."""
    bad = [("a write", request(CMD_WRITE, 1, 0, 4096) + b"w" * 4096), ("a trim", request(CMD_TRIM, 1, 0, 4096)),
           ("write zeroes", request(CMD_WRITE_ZEROES, 1, 0, 4096)), ("an unknown command", request(8, 1)),
           ("a bad magic", b"GET / HTTP/1.0\r\n\r\n" + b"x" * 10), ("a read over 32 MiB", request(CMD_READ, 1, 0, READ_MAX + 1)),
           ("a handle in flight", request(CMD_READ, 1000, 512, 512)), ("a flush", request(CMD_FLUSH, 1)),
           ("a read with FUA", request(CMD_READ, 1, 0, 512, CMD_FLAG_FUA)),
           ("a cache request (QEMU's copy-on-read: a write into the guest's image)", request(CMD_CACHE, 1, 0, 4096))]
    with Relay() as relay:
        for what, data in bad:
            c, up = pair_with_fake_upstream(relay)
            c.sendall(request(CMD_READ, 1000, 0, 512))
            check(read_request(up) == (CMD_READ, 1000, 0, 512), "the read before %s" % what)
            c.sendall(data)
            check_closed(c, what)
            nothing_comes(up, "%s: bytes or EOF to the server with a read in flight" % what)
            up.sendall(simple_reply(1000, data=b"r" * 512))
            seen = recv_all(up)
            check(seen == b"", "%s: the server saw %r" % (what, seen[:64]))
            up.close()
            relay.daemon.wait_clients(0)
        c, up = pair_with_fake_upstream(relay)
        check_reads_through(c, up)
        relay.stop()


def test_hostile_replies():
    """A reply to no request in flight, an oversized chunk or no reply at all costs that pair its
    connection, nothing more."""
    bad = [("a reply to no request", simple_reply(5)), ("a second reply", simple_reply(1) + simple_reply(1)),
           ("a 33 MiB chunk", struct.pack(">IHHQI", STRUCTURED_MAGIC, 1, CHUNK_OFFSET_DATA, 1, READ_MAX + 65537)),
           ("garbage", b"x" * 100000)]
    with Relay() as relay:
        for what, data in bad:
            c, up = pair_with_fake_upstream(relay)
            c.sendall(request(CMD_READ, 1, 0, 0))
            check(read_request(up)[1] == 1, "the read")
            up.sendall(data)
            try:
                rest = recv_all(c)
            except ConnectionResetError:
                rest = b""
            check(rest in (b"", simple_reply(1)), "%s: the client got %r" % (what, rest[:64]))
            relay.daemon.wait_clients(0)
            up.close()
        c, up = pair_with_fake_upstream(relay)
        check_reads_through(c, up)
        relay.stop()


def test_error_closes_pair_only():
    """A reset on one pair leaves the others running."""
    with Relay() as relay:
        c1, up1 = pair_with_fake_upstream(relay)
        c2, up2 = pair_with_fake_upstream(relay)
        relay.daemon.wait_clients(2)
        up1.sendall(b"x" * 100000)
        up1.close()
        c1.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        c1.close()
        relay.daemon.wait_clients(1)
        check_reads_through(c2, up2)
        relay.stop()
        check(c2.recv(1) == b"", "stop did not close the client")


def test_refused():
    with Relay() as relay:
        c, n = connect_announced(relay)
        relay.daemon.wait_clients(1)
        relay.daemon.send(b"refused %d no exports today\n" % n)
        check(c.recv(1) == b"", "refused client not closed")
        relay.daemon.wait_clients(0)
        # The relay logs before it closes the client, but the log reaches us through a pipe
        # that a thread of ours reads: wait for it rather than race that thread.
        wait_until(lambda: b"no exports today" in relay.log, "the reason in the relay's log")
        # A late upstream for it is dropped, not an error.
        a, b = socket.socketpair()
        relay.daemon.send(b"upstream %d\n" % n, [b.fileno()])
        b.close()
        check(a.recv(1) == b"", "late upstream not closed")
        check(relay.alive(), "relay died on a late upstream")
        relay.stop()


def test_longest_message():
    """256 bytes with the newline is the limit, and allowed."""
    with Relay() as relay:
        c, n = connect_announced(relay)
        msg = b"refused %d " % n
        msg += b"x" * (255 - len(msg)) + b"\n"
        check(len(msg) == 256, "length %d" % len(msg))
        relay.daemon.send(msg)
        check(c.recv(1) == b"", "refused client not closed")
        relay.daemon.wait_clients(0)
        relay.stop()


def test_client_gone_while_waiting():
    with Relay() as relay:
        c = relay.connect()
        relay.daemon.wait_clients(1)
        c.close()
        relay.daemon.wait_clients(0)
        relay.stop()


def test_limit():
    """64 clients; the 65th is accepted and closed at once, the 64 stay."""
    with Relay() as relay:
        socks = [relay.connect() for _ in range(64)]
        relay.daemon.wait_clients(64)
        extra = relay.connect()
        check(extra.recv(1) == b"", "65th client not closed")
        check(b"Too many clients" in relay.log or wait_until(lambda: b"Too many clients" in relay.log, "log"),
              "not logged")
        check(relay.daemon.clients() == 64, "count changed")
        socks.pop().close()
        relay.daemon.wait_clients(63)
        again = relay.connect()  # room again
        relay.daemon.wait_clients(64)
        for s in socks + [again, extra]:
            s.close()
        relay.daemon.wait_clients(0)
        relay.stop()


def test_upstream_timeout():
    with Relay(selftest=["timeout"]) as relay:  # 1 s instead of 10
        c = relay.connect()
        relay.daemon.wait_clients(1)
        t = time.monotonic()
        check(c.recv(1) == b"", "client not closed")
        check(0.5 < time.monotonic() - t < TIMEOUT, "closed after %.1f s" % (time.monotonic() - t))
        relay.daemon.wait_clients(0)
        relay.stop()


def test_stop():
    with Relay(upstream=upstream_path) as relay:
        c = relay.connect()
        c.recv(8)  # NBD greeting: relaying
        w = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        relay.daemon.upstream = None
        w.connect(relay.address)
        relay.daemon.wait_clients(2)
        relay.stop()
        recv_all(c)  # the rest of the greeting, then EOF (not a timeout)
        check(w.recv(1) == b"", "waiting client not closed")


def test_control_eof():
    with Relay() as relay:
        c = relay.connect()
        relay.daemon.wait_clients(1)
        relay.ctrl.shutdown(socket.SHUT_RDWR)
        check(relay.wait() == 0, "exit status %r on EOF" % relay.status)
        check(b"error" not in relay.log.lower(), "EOF logged an error: %r" % relay.log)
        check(c.recv(1) == b"", "client not closed")


def test_listener_shut_down():
    """A listening socket shut down under it: nothing more can come, exit 1 (not spin)."""
    with Relay() as relay:
        relay.listener.shutdown(socket.SHUT_RDWR)
        check(relay.wait() == 1, "exit status %r" % relay.status)
        relay.daemon.wait_line("error ", "error line")


def garbage(msg, fds=(), what="", error="Unexpected message"):
    with Relay() as relay, relay.connect() as c:
        relay.daemon.wait_clients(1)
        relay.daemon.send(msg, fds)
        st = relay.wait()
        check(st == 1, "%s: exit status %r" % (what, st))
        line = relay.daemon.wait_line("error ", "error line")
        check(error in line, "%s: %r" % (what, line))
        check(c.recv(1) == b"", "%s: client not closed" % what)


def test_garbage():
    a, b = socket.socketpair()
    garbage(b"hello\n", what="unknown")
    garbage(b"stop", what="no newline")
    garbage(b"stop\nstop\n", what="two lines")
    garbage(b"stop\0\n", what="NUL")
    garbage(b"refused 1 " + b"x" * 246 + b"\n", what="257 bytes", error="Oversized")
    garbage(b"stop\n", [b.fileno()], what="fd with stop")
    garbage(b"refused 1 x\n", [b.fileno()], what="fd with refused")
    garbage(b"upstream 1\n", what="upstream without fd")
    garbage(b"upstream 1\n", [b.fileno(), b.fileno()], what="upstream with two fds")
    garbage(b"upstream 7\n", [b.fileno()], what="upstream for a client never announced")
    garbage(b"upstream 01\n", [b.fileno()], what="leading zero")
    garbage(b"upstream -1\n", [b.fileno()], what="sign")
    garbage(b"upstream 99999999999999999999999\n", [b.fileno()], what="overflow")
    garbage(b"\n", what="empty line")
    a.close()
    b.close()


def test_upstream_twice():
    with Relay() as relay:
        c, up = pair_with_fake_upstream(relay)
        a, b = socket.socketpair()
        relay.daemon.send(b"upstream 1\n", [b.fileno()])
        check(relay.wait() == 1, "second upstream accepted")
        a.close()
        b.close()


def test_bad_fds():
    # fd 3 not listening: reported on fd 4.
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with b, Relay(listener=a, wait_ready=False) as relay:
        relay.daemon.wait_line("error ", "error line")
        check(relay.wait() == 1, "exit status %r" % relay.status)
    # fd 4 not SEQPACKET: only the log.
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b, Relay(fd4=a, wait_ready=False) as relay:
        check(relay.wait() == 1, "exit status %r" % relay.status)
        check(b"SOCK_SEQPACKET" in relay.log, "not logged: %r" % relay.log)


def forbidden(call):
    if VALGRIND:
        raise Skip("valgrind handles SIGSYS itself")
    with Relay(selftest=[call], wait_ready=False) as relay:
        relay.daemon.wait_line(lambda l: l == "ready\n", "ready")
        check(relay.wait() == -signal.SIGSYS, "%s after setup: exit status %r, not SIGSYS" % (call, relay.status))


def test_seccomp_open():
    forbidden("open")


def test_seccomp_socket():
    forbidden("socket")


def test_seccomp_sendmsg_other_fd():
    forbidden("sendmsg")


def test_seccomp_sendmsg_control():
    """The relay talks to the daemon with send(): sendmsg, which could pass an fd, is not even
    allowed on the control socket."""
    forbidden("sendmsg-control")


def test_seccomp_write_other_fd():
    forbidden("write")


TESTS = [v for k, v in list(globals().items())
         if k.startswith("test_") and os.environ.get("RELAY_TEST_ONLY", k[5:]) == k[5:]]


def main():
    print("1..%d" % len(TESTS), flush=True)
    failed = 0
    try:
        if shutil.which("qemu-nbd"):
            start_upstream()
        for i, t in enumerate(TESTS, 1):
            name = t.__name__[5:]
            start = time.monotonic()
            try:
                if t in (test_nbd_unix, test_nbd_tcp, test_nbd_concurrent, test_stop) and not qemu_nbd:
                    raise Skip("qemu-nbd not installed")
                t()
                print("ok %d - %s (%.1f s)" % (i, name, time.monotonic() - start), flush=True)
            except Skip as e:
                print("ok %d - %s # SKIP %s" % (i, name, e), flush=True)
            except Exception as e:
                failed += 1
                print("not ok %d - %s" % (i, name), flush=True)
                for l in ("%s\n%s" % (e, traceback.format_exc())).splitlines():
                    print("# " + l, file=sys.stderr, flush=True)
    finally:
        if qemu_nbd:
            qemu_nbd.kill()  # qemu-nbd 7.2 may not exit on SIGTERM (see test-pull.py); read-only
            qemu_nbd.wait()
        shutil.rmtree(tmpdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
