# SPDX-License-Identifier: LGPL-2.1-or-later
"""A QMP peer that plays QEMU 7.2 with a scripted disk set, and turns hostile on request.

Used by test_hostile_qmp.py and bench/hostile-qmp-bench. It answers what blockstreamd asks on a
(re)connect (query-block-jobs, query-block, query-named-block-nodes) from the real QEMU 7.2
replies captured in tests/unit/data, with `n_disks` disks, and accepts block-stream. It keeps the
fds passed to it (add-fd, getfd), as QEMU does. Hostile behaviours, each a method: flap() a job
between paused and running, huge-value replies, many nodes, dropping every connection, commands
held unanswered. Everything it saw is counted (connections, commands)."""

import array
import copy
import json
import os
import socket
import threading
import time

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'unit', 'data')

GREETING = (b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, '
            b'"capabilities": ["oob"]}}\r\n')


class QmpError(Exception):
    """answer() raises it for a command QEMU refuses: the reply is {"error": ...} with its text."""


def _load(name):
    with open(os.path.join(DATA, name)) as f:
        return json.load(f)


class FakeQemu:
    def __init__(self, path, image_dir=None, n_disks=1, chain_depth=2, blocks=None):
        """blocks: query-block's entries as given (a guest that owns its QEMU says what it likes),
        instead of n_disks chains of chain_depth images in image_dir; no named nodes then, and
        an empty list for every other query."""
        self.path = path
        self.lock = threading.Lock()
        self.conn = None             # the current connection
        self.conns = []              # every connection accepted (close() shuts them all)
        self.connections = 0         # accepted so far
        self.connect_times = []      # time.monotonic() of each accept
        self.hangup_times = []       # time.monotonic() of each connection the daemon closed
        self.commands = {}           # name -> count
        self.sequence = []           # names, in the order they came
        self.jobs = {}               # job id -> status
        self.create_jobs = set()     # blockdev-create's jobs: they run until conclude_create_jobs()
        self.concluded = set()       # and then wait to be dismissed
        self.hostile_replies = None  # callable(cmd) -> bytes or None: replaces the honest answer
        self.hang_up_after_caps = False
        self.hold = set()            # command names left unanswered until release()
        self.held = []
        self.fds = []                # passed to it with a command (SCM_RIGHTS), kept until close()
        self.exit_after = set()      # command names: the process exits once it has answered one
        self.drop_after = set()      # command names: once one is answered, there are no disks
        self._done = threading.Event()
        self._send_lock = threading.Lock()
        self._given = blocks is not None
        self._blocks, self._nodes = (blocks, []) if self._given else self._disks(image_dir, n_disks, chain_depth)
        self._srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._srv.bind(path)
        self._srv.listen(16)
        self._srv.settimeout(0.2)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    # The disks: shaped like the captured chain of 3 (each image and node as QEMU 7.2 reports
    # them), with chain_depth backing images below each top, named per disk.
    @staticmethod
    def _disks(image_dir, n_disks, chain_depth):
        block0 = _load('query-block-chain3.json')[0]
        nodes0 = _load('query-named-block-nodes-chain3.json')
        image0 = copy.deepcopy(block0['inserted']['image'])
        for k in ('backing-image', 'backing-filename', 'full-backing-filename', 'backing-filename-format'):
            image0.pop(k, None)
        fmt0 = next(n for n in nodes0 if n['drv'] == 'qcow2')
        file0 = next(n for n in nodes0 if n['drv'] == 'file')
        blocks, nodes = [], []
        for i in range(n_disks):
            alias = 'vd%s' % chr(ord('a') + i) if i < 26 else 'disk%d' % i
            files = [os.path.join(image_dir, '%s-%d.qcow2' % (alias, level)) for level in range(chain_depth + 1)]
            image = None
            for level in range(chain_depth, -1, -1):
                img = copy.deepcopy(image0)
                img['filename'] = files[level]
                if image is not None:
                    img['backing-image'] = image
                    img['backing-filename'] = os.path.basename(files[level + 1])
                    img['full-backing-filename'] = files[level + 1]
                    img['backing-filename-format'] = 'qcow2'
                image = img
                for tmpl, drv in ((fmt0, 'qcow2'), (file0, 'file')):
                    n = copy.deepcopy(tmpl)
                    n['file'] = files[level]
                    n['node-name'] = 'top%d' % i if (level == 0 and drv == 'qcow2') else '%s-%d-%s' % (alias, level, drv)
                    n['image'] = copy.deepcopy(image0)
                    n['image']['filename'] = files[level]
                    n['backing_file_depth'] = chain_depth - level
                    nodes.append(n)
            b = copy.deepcopy(block0)
            b['device'] = ''
            b['qdev'] = '/machine/peripheral/%s/virtio-backend' % alias
            b['inserted']['node-name'] = 'top%d' % i
            b['inserted']['file'] = files[0]
            b['inserted']['image'] = image
            blocks.append(b)
        return blocks, nodes

    def _send(self, conn, obj_or_bytes):
        data = obj_or_bytes if isinstance(obj_or_bytes, bytes) else json.dumps(obj_or_bytes).encode() + b'\r\n'
        # One message at a time, as QEMU's monitor writes them: flap() sends from the test's
        # thread while the connection's thread answers polls, and a sendall() that blocks (the
        # daemon paces its reading) would otherwise let an answer land inside an event.
        with self._send_lock:
            try:
                conn.sendall(data)
            except OSError:
                pass

    def answer(self, cmd):
        name = cmd.get('execute')
        args = cmd.get('arguments') or {}
        if name == 'query-block-jobs':
            with self.lock:
                return [{'auto-finalize': True, 'io-status': 'ok', 'device': j, 'auto-dismiss': False,
                         'busy': False, 'len': 268435456, 'offset': 0, 'status': s, 'paused': s == 'paused',
                         'speed': 0, 'ready': False, 'type': 'stream'} for j, s in self.jobs.items()]
        if name == 'query-block':
            return self._blocks
        if name == 'query-named-block-nodes':
            return self._nodes
        if name == 'block-stream':
            with self.lock:
                self.jobs[args.get('job-id')] = 'running'
            return {}
        if name == 'blockdev-create':
            # As QEMU: a job id in use (running, or concluded and not dismissed) is refused.
            with self.lock:
                if args.get('job-id') in self.create_jobs | self.concluded:
                    raise QmpError("Job ID '%s' already in use" % args.get('job-id'))
                self.create_jobs.add(args.get('job-id'))
            return {}
        if name == 'job-dismiss' and args.get('id') in self.create_jobs:
            raise QmpError("Job '%s' in state 'running' cannot accept command verb 'dismiss'" % args.get('id'))
        if name == 'job-dismiss' and args.get('id') in self.concluded:
            with self.lock:
                self.concluded.discard(args.get('id'))
            print('dismissed %s' % args.get('id'), flush=True)
            return {}
        if name in ('query-block-exports',) or (self._given and name.startswith('query-')):
            return []
        return {}

    def _lines(self, conn):
        """The connection's lines, read with recvmsg(): the fds sent with them are kept."""
        buf = b''
        while True:
            while b'\n' in buf:
                line, buf = buf.split(b'\n', 1)
                yield line
            data, anc, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(16 * 4))
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array('i')
                    fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
                    with self.lock:
                        self.fds.extend(fds)
            if not data:
                return
            buf += data

    def _handle(self, conn):
        lines = self._lines(conn)
        try:
            self._send(conn, GREETING)
            first = json.loads(next(lines))
            self._send(conn, {'return': {}, 'id': first.get('id')})
            if self.hang_up_after_caps:
                conn.shutdown(socket.SHUT_RDWR)
                return
            while not self._done.is_set():
                line = next(lines, None)
                if line is None:
                    with self.lock:
                        self.hangup_times.append(time.monotonic())
                    return
                cmd = json.loads(line)
                name = cmd.get('execute')
                with self.lock:
                    self.commands[name] = self.commands.get(name, 0) + 1
                    self.sequence.append(name)
                with self.lock:
                    held = name in self.hold
                    if held:
                        self.held.append((conn, cmd))
                if held:
                    self._drop_after(name)
                    continue
                hostile = self.hostile_replies(cmd) if self.hostile_replies else None
                if hostile is not None:
                    self._send(conn, hostile)
                    continue
                try:
                    self._send(conn, {'return': self.answer(cmd), 'id': cmd.get('id')})
                except QmpError as e:
                    self._send(conn, {'error': {'class': 'GenericError', 'desc': str(e)}, 'id': cmd.get('id')})
                if name in self.exit_after:
                    os._exit(0)
                self._drop_after(name)
        except (OSError, ValueError, StopIteration):
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def _drop_after(self, name):
        if name in self.drop_after:
            with self.lock:
                self._blocks, self._nodes = [], []
            print('dropped the disks after %s' % name, flush=True)

    def _loop(self):
        while not self._done.is_set():
            try:
                conn, _ = self._srv.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self.connect_times.append(time.monotonic())
                self.conn = conn
                self.conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def conclude_create_jobs(self):
        """Every blockdev-create job ends now (concluded, waiting to be dismissed)."""
        with self.lock:
            ended, self.create_jobs = self.create_jobs, set()
            self.concluded |= ended
        for job in sorted(ended):
            self.send_raw(self.event('JOB_STATUS_CHANGE', {'id': job, 'status': 'concluded'}))

    def event(self, name, data):
        return (json.dumps({'timestamp': {'seconds': 1, 'microseconds': 0}, 'event': name, 'data': data})
                + '\r\n').encode()

    def flap(self, job_id, n):
        """n times paused then running, then paused, in one write; the job ends paused."""
        states = ['paused', 'running'] * n + ['paused']
        ev = b''.join(self.event('JOB_STATUS_CHANGE', {'id': job_id, 'status': s}) for s in states)
        with self.lock:
            conn = self.conn
            self.jobs[job_id] = 'paused'
        self._send(conn, ev)
        return states

    def release(self):
        """Answer the held commands, and hold nothing any more."""
        with self.lock:
            self.hold = set()
            held, self.held = self.held, []
        for conn, cmd in held:
            self._send(conn, {'return': self.answer(cmd), 'id': cmd.get('id')})

    def send_raw(self, data):
        """Bytes on the current connection, unasked."""
        with self.lock:
            conn = self.conn
        self._send(conn, data)

    @staticmethod
    def many_values_message(n=333333):
        """An event whose data holds n empty objects: ~3 bytes each on the wire, ~800 in json-c."""
        return b'{"event": "X", "data": {"v": [' + b','.join([b'{}'] * n) + b']}}\r\n'

    def close(self):
        self._done.set()
        self._thread.join(2)
        self._srv.close()
        with self.lock:
            conns, self.conns = self.conns, []
            fds, self.fds = self.fds, []
        for conn in conns:
            # Shut down, not only closed: the connection's thread may be reading from it, and
            # the peer sees the end only once the last reference goes.
            try:
                conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            except OSError:
                pass
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass


def main(argv):
    """python3 fakeqemu.py SOCKET IMAGE_DIR [--open-disks] [--exit-after=NAME] [--drop-disks-after=NAME]
    [--hold=NAME] [WATCHES DUPS]: a fake QEMU in a process of its own (the daemon then looks through
    that process's open files, as through a QEMU's), until its standard input closes, or until it
    has answered command NAME (--exit-after); --drop-disks-after: it has no disks once it answered
    (or held) NAME, and prints so; --hold: it never answers NAME. A line "conclude-create-jobs" on
    its standard input ends its blockdev-create jobs; it prints "dismissed ID" for each dismissed.
    --open-disks: it holds its first disk's images open as QEMU does (the top read-write, its
    backing read-only), those that exist in IMAGE_DIR. With WATCHES
    and DUPS it first holds an epoll set watching WATCHES eventfds, dup'd into DUPS more fds (fewer
    if its fd limit is lower): each of those fds' /proc fdinfo lists every watch, and the kernel
    formats it whole at each read. Prints how many."""
    import resource
    import select
    import sys
    keep = []
    exit_after = [a.split('=', 1)[1] for a in argv if a.startswith('--exit-after=')]
    drop_after = [a.split('=', 1)[1] for a in argv if a.startswith('--drop-disks-after=')]
    hold = [a.split('=', 1)[1] for a in argv if a.startswith('--hold=')]
    argv = [a for a in argv if not a.startswith(('--exit-after=', '--drop-disks-after=', '--hold='))]
    if '--open-disks' in argv:
        argv = [a for a in argv if a != '--open-disks']
        for level in range(3):
            image = os.path.join(argv[2], 'vda-%d.qcow2' % level)
            if os.path.exists(image):
                keep.append(os.open(image, (os.O_RDWR if level == 0 else os.O_RDONLY) | os.O_CLOEXEC))
    if len(argv) > 3:
        watches, dups = int(argv[3]), int(argv[4])
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        dups = min(dups, hard - watches - 256)
        ep = select.epoll()
        keep.append(ep)
        for _ in range(watches):
            e = os.eventfd(0)
            ep.register(e, select.EPOLLIN)
            keep.append(e)
        keep += [os.dup(ep.fileno()) for _ in range(dups)]
        print('%d watches, %d fds of them' % (watches, dups + 1), flush=True)
    fake = FakeQemu(argv[1], argv[2])
    fake.exit_after = set(exit_after)
    fake.drop_after = set(drop_after)
    fake.hold = set(hold)
    print('ready', flush=True)
    for line in sys.stdin:  # commands, one a line
        if line.strip() == 'conclude-create-jobs':
            fake.conclude_create_jobs()
    fake.close()


if __name__ == '__main__':
    import sys
    main(sys.argv)
