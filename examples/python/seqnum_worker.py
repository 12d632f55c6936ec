#!/usr/bin/env python3
"""A takeoverd worker for the seqnum echo, in Python 3 with the standard
library only, written from docs/PROTOCOL.md ("The supervisor channel,
version 2", "Transport", "Names", "Crash safety of the seqnum echo").

Clients send 4-byte big-endian counters; every byte is echoed back, in order.
The echo is crash-safe: no protocol byte is ever held in user space. The
worker peeks at the receive queue, writes the complete messages it found,
and only then consumes (recv with MSG_TRUNC) as many bytes as the kernel
accepted. A worker told `recovered: true` reconciles every connection with
the kernel's TCP byte counters (TCP_INFO, SIOCINQ, SIOCOUTQ).

Run it under takeoverd:

    takeoverd --listen 127.0.0.1:1234 --worker examples/python/seqnum_worker.py

Options (after `--` on takeoverd's command line):

    --ack-timeout-ms MS   takeoverd's --ack-timeout-ms, when not 5000: how
                          long a message to takeoverd may wait for room
    --verbose             log every connection that ends

Design: one thread, one epoll instance. The channel (fd 3) is polled
level-triggered; every connection is registered edge-triggered as soon as
it is assigned and stays registered, with the bookkeeping the document asks
for (events before `ready` are forgotten, events after it are remembered
while not serving, and connections with work left are named in `wake`).

One file of about 700 lines on purpose: it is an example that a reader
copies and runs as it is (`--worker PATH`), and that shows a whole worker
built from the protocol document alone, standard library only.
"""

import array
import fcntl
import json
import os
import resource
import select
import signal
import socket
import struct
import sys
import termios
import time
import traceback

MAX_MSG = 65536            # bytes in one channel datagram
MAX_FDS = 253              # SCM_MAX_FD
MAX_ITEMS = 253            # items in one state/wake message, as seqnum-worker
PEEK_MAX = 65536           # bytes peeked at once on a connection
BUDGET = 16                # peek/echo rounds per connection per loop turn
MAX_EVENTS = 256

# Linux constants the standard library does not name.
SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)
SK_MEMINFO_RMEM_ALLOC, SK_MEMINFO_RCVBUF = 0, 1
TCP_ESTABLISHED, TCP_SYN_SENT, TCP_SYN_RECV = 1, 2, 3
TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_TIME_WAIT, TCP_CLOSE = 4, 5, 6, 7
TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_LISTEN, TCP_CLOSING = 8, 9, 10, 11
PEER_FIN_IN = {TCP_CLOSE_WAIT, TCP_LAST_ACK, TCP_CLOSING, TCP_TIME_WAIT, TCP_CLOSE}
OUR_FIN_QUEUED = {TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSING, TCP_LAST_ACK, TCP_TIME_WAIT, TCP_CLOSE}
TCP_INFO_LEN = 256         # we need bytes 0..136; the kernel copies what it has
SIOCINQ = termios.FIONREAD
SIOCOUTQ = termios.TIOCOUTQ

EV_CONN = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET

# Phases of this worker.
STAGING = "staging"        # hello sent, before ready: hold, forget events
READY = "ready"            # ready sent, before serve: hold, remember events
SERVING = "serving"
STOPPED = "stopped"        # after stop: hold, remember events

PID = os.getpid()
ack_timeout = 5.0
verbose = False


def log(text):
    try:
        os.write(2, ("seqnum_worker.py[%d]: %s\n" % (PID, text)).encode())
    except OSError:
        pass


def gone(why):
    """takeoverd is gone: exit at once, touching no connection."""
    log("takeoverd is gone (%s): exiting" % why)
    os._exit(1)


# --------------------------------------------------------------------------
# The channel

def channel_setup():
    fd_text = os.environ.pop("TAKEOVERD_FD", None)   # programs we start must not see it
    if fd_text is None:
        sys.stderr.write("seqnum_worker.py: TAKEOVERD_FD is not set; run me under takeoverd:\n"
                         "  takeoverd --listen 127.0.0.1:1234 --worker %s\n" % sys.argv[0])
        os._exit(2)
    fd = int(fd_text)
    os.set_inheritable(fd, False)                    # FD_CLOEXEC
    chan = socket.socket(fileno=fd)
    if chan.family != socket.AF_UNIX or chan.type != socket.SOCK_SEQPACKET:
        log("fd %d is not an AF_UNIX SOCK_SEQPACKET socket" % fd)
        os._exit(2)
    chan.setblocking(False)                          # O_NONBLOCK is set already: tell Python
    return chan


def encode(msg):
    return json.dumps(msg, separators=(",", ":")).encode()


def send(msg):
    """One datagram, no fds. Waits for room until the ack timeout."""
    data = encode(msg)
    if len(data) > MAX_MSG:
        raise ValueError("message of %d bytes" % len(data))
    deadline = time.monotonic() + ack_timeout
    while True:
        try:
            chan.send(data, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            return
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                log("the channel stayed full for %.1f s: exiting" % ack_timeout)
                os._exit(1)
            p = select.poll()
            p.register(chan.fileno(), select.POLLOUT)
            p.poll(max(1, int(left * 1000)))
        except InterruptedError:
            continue
        except (BrokenPipeError, ConnectionResetError) as e:
            gone(e.strerror)


def send_list(kind, field, items):
    """`state`/`wake` lists, split over as many messages as the limits need."""
    chunks = [items[i:i + MAX_ITEMS] for i in range(0, len(items), MAX_ITEMS)]
    while chunks:
        chunk = chunks.pop(0)
        if len(encode({"type": kind, field: chunk})) > MAX_MSG:
            if len(chunk) == 1:
                raise ValueError("one %s item is larger than a message" % kind)
            half = len(chunk) // 2
            chunks[0:0] = [chunk[:half], chunk[half:]]
            continue
        send({"type": kind, field: chunk})


def fail(reason):
    """We cannot go on: nack and exit (never touching a connection)."""
    log("failing: " + reason)
    try:
        send({"type": "nack", "reason": reason[:1024]})
    finally:
        os._exit(1)


def close_fds(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def recv_channel():
    """One datagram: (message dict, fds), or None when nothing is queued."""
    while True:
        try:
            data, anc, flags, _ = chan.recvmsg(MAX_MSG + 1, socket.CMSG_SPACE(MAX_FDS * 4),
                                               socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
            break
        except BlockingIOError:
            return None
        except InterruptedError:
            continue
        except ConnectionResetError:
            gone("ECONNRESET")
    # Own every fd that arrived before looking at anything else.
    fds, bad_cmsg = [], False
    for level, kind, cdata in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(cdata[:len(cdata) - len(cdata) % a.itemsize])
            fds.extend(a)
        else:
            bad_cmsg = True
    if not data and not fds:
        gone("end of channel")
    if flags & socket.MSG_CTRUNC:
        close_fds(fds)
        fail("a message's fds were truncated (MSG_CTRUNC): out of fds?")
    if flags & socket.MSG_TRUNC or len(data) > MAX_MSG:
        close_fds(fds)
        fail("a message longer than %d bytes" % MAX_MSG)
    if bad_cmsg:
        close_fds(fds)
        fail("a control message other than SCM_RIGHTS")
    try:
        msg = json.loads(data)
        if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
            raise ValueError("not an object with a string type")
    except ValueError as e:
        close_fds(fds)
        fail("malformed message (%s): %r" % (e, data[:200]))
    return msg, fds


# --------------------------------------------------------------------------
# Connections

class Conn:
    __slots__ = ("name", "sock", "fd", "consumed", "next", "peer", "known_mid",
                 "has_work", "out_blocked", "nodelay", "logged")

    def __init__(self, name, sock):
        self.name = name
        self.sock = sock
        self.fd = sock.fileno()
        self.consumed = 0          # stream bytes consumed, counted from a message boundary
        self.next = None           # seqnum expected next, when known (logs only)
        self.peer = None
        self.known_mid = False     # takeoverd's state for it is in the middle of a message
        self.has_work = False      # readiness seen and not acted on, or a blocked echo
        self.out_blocked = False
        self.nodelay = False
        self.logged = 0

    def take_state(self, state):
        """A state from takeoverd (assign, or a forwarded `state`)."""
        consumed, nxt, peer = 0, None, None
        if isinstance(state, dict):
            c = state.get("consumed")
            if isinstance(c, int) and not isinstance(c, bool) and c >= 0:
                consumed = c
            n = state.get("next")
            if isinstance(n, int) and not isinstance(n, bool):
                nxt = n & 0xFFFFFFFF
            p = state.get("peer")
            if isinstance(p, str):
                peer = p
        self.consumed, self.next, self.peer = consumed, nxt, peer
        self.known_mid = consumed % 4 != 0

    def state(self):
        s = {"consumed": self.consumed}
        if self.next is not None:
            s["next"] = self.next
        if self.peer is not None:
            s["peer"] = self.peer
        return s


def valid_name(name):
    return (isinstance(name, str) and 1 <= len(name) <= 255
            and all("!" <= ch <= "~" and ch != ":" for ch in name))


def check_tcp_stream(sock):
    dom = sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
    typ = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    acc = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if dom not in (socket.AF_INET, socket.AF_INET6):
        return "not a TCP socket (domain %d)" % dom
    if typ != socket.SOCK_STREAM:
        return "not a stream socket (type %d)" % typ
    if acc != 0:
        return "a listening socket"
    return None


def tcp_info(sock):
    b = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
    if len(b) < 136:
        raise OSError("TCP_INFO too short (%d bytes): Linux 4.1 or later needed" % len(b))
    state = b[0]
    acked, received = struct.unpack_from("=QQ", b, 120)
    return state, acked, received


def ioctl_int(fd, request):
    buf = array.array("i", [0])
    fcntl.ioctl(fd, request, buf, True)
    return buf[0]


def kernel_offsets(c):
    """(written, consumed, inq, tcpi_state): exact stream offsets."""
    for _ in range(1000):
        a = tcp_info(c.sock)
        inq = ioctl_int(c.fd, SIOCINQ)
        outq = ioctl_int(c.fd, SIOCOUTQ)
        b = tcp_info(c.sock)
        if a == b:
            break
    else:
        raise OSError("TCP_INFO never settled")
    state, acked, received = a
    written = acked + outq
    consumed = received - inq
    if state in PEER_FIN_IN:
        consumed -= 1
    if state in OUR_FIN_QUEUED:
        written -= 1
    return written, consumed, inq, state


def peer_fin_in(c):
    try:
        return tcp_info(c.sock)[0] in PEER_FIN_IN
    except OSError:
        return False


def rcvbuf_pressure(c):
    """More than half the receive buffer charged to what is queued."""
    try:
        b = c.sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 9 * 4)
        mem = struct.unpack_from("=%dI" % (len(b) // 4), b)
        return mem[SK_MEMINFO_RMEM_ALLOC] * 2 > mem[SK_MEMINFO_RCVBUF]
    except (OSError, struct.error, IndexError):
        return False


peekbuf = bytearray(PEEK_MAX)
peekview = memoryview(peekbuf)
trashbuf = bytearray(PEEK_MAX)


def discard(c, count):
    """Consume `count` bytes without copying them; returns how many went."""
    done = 0
    while done < count:
        try:
            n = c.sock.recv_into(trashbuf, min(count - done, PEEK_MAX),
                                 socket.MSG_TRUNC | socket.MSG_DONTWAIT)
        except InterruptedError:
            continue
        except BlockingIOError:
            break
        if n <= 0:
            break
        done += n
    return done


def check_seqnums(c, start, end, off):
    """Log discontinuities among the complete messages in peekbuf[start:end]."""
    if off != 0:
        c.next = None      # we only saw the tail of that message
        i = (4 - off) % 4
    else:
        i = 0
    i += start
    while i + 4 <= end:
        v = struct.unpack_from(">I", peekbuf, i)[0]
        if c.next is not None and v != c.next and c.logged < 3:
            c.logged += 1
            log("%s: seqnum %d where %d was expected" % (c.name, v, c.next))
        c.next = (v + 1) & 0xFFFFFFFF
        i += 4
    if i != end:
        c.next = None      # we echoed part of a message


# --------------------------------------------------------------------------
# The worker

chan = None
ep = None
conns = {}        # name -> Conn
by_fd = {}        # fd -> Conn
runq = {}         # name -> Conn: served in the next turns (fairness budget)
phase = STAGING
stop_due = False


def watch(c):
    ep.register(c.fd, EV_CONN)
    by_fd[c.fd] = c


def drop(c):
    """Forget a connection and close our copy (the caller decides shutdown)."""
    try:
        ep.unregister(c.fd)     # before close: other copies keep the registration alive
    except OSError:
        pass
    by_fd.pop(c.fd, None)
    conns.pop(c.name, None)
    runq.pop(c.name, None)
    c.sock.close()


def end(c, why):
    """The connection is over: end it for every holder, then say so."""
    if verbose:
        log("%s ends: %s" % (c.name, why))
    try:
        c.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    drop(c)
    send({"type": "closed", "name": c.name})


def schedule(c):
    c.has_work = True
    if phase == SERVING:
        runq[c.name] = c


def serve(c):
    """Echo what is complete; never blocks; leaves everything unsent queued."""
    c.has_work = False
    runq.pop(c.name, None)
    if not c.nodelay:          # shared option, set only once we serve (seqnum-worker sets it too)
        c.nodelay = True
        try:
            c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
    for _ in range(BUDGET):
        try:
            got = c.sock.recv_into(peekbuf, PEEK_MAX, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            c.out_blocked = False
            return
        except InterruptedError:
            continue
        except OSError as e:
            end(c, "recv: %s" % e.strerror)
            return
        if got == 0:
            end(c, "end of stream")
            return
        off = c.consumed % 4
        head = (4 - off) % 4
        n = head + (got - head) // 4 * 4 if got >= head else 0
        partial = False
        if n == 0:
            # Only part of a message is queued. Echo it anyway when it can
            # never complete (the peer's FIN is in: the end of the stream
            # then shows up next round) or when it would keep the window
            # shut; else wait for the rest (an edge will come).
            if peer_fin_in(c) or rcvbuf_pressure(c):
                n, partial = got, True
            else:
                c.out_blocked = False
                return
        try:
            sent = c.sock.send(peekview[:n], socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:
            sent = 0
        except InterruptedError:
            continue
        except OSError as e:
            end(c, "send: %s" % e.strerror)
            return
        if sent:
            check_seqnums(c, 0, sent, off)
            took = discard(c, sent)
            c.consumed += took
            if took != sent:
                # Cannot happen (the bytes were peeked a moment ago): the
                # stream would be out of step, so end the connection.
                end(c, "consumed %d of %d echoed bytes" % (took, sent))
                return
        if sent < n:
            c.out_blocked = True        # EPOLLOUT (edge) brings us back
            c.has_work = True
            return
        c.out_blocked = False
        if n == got < PEEK_MAX and not partial:
            return                       # all echoed; bytes arriving later raise a new edge
    schedule(c)                          # budget spent: more next turn


def reconcile(c):
    """After a crash: the true position from the kernel, not the state."""
    written, consumed, inq, state = kernel_offsets(c)
    extra = written - consumed
    if extra > 0:
        # Echoed, not consumed: the holder died between write and consume.
        if extra > inq:
            raise OSError("%d bytes echoed but only %d queued" % (extra, inq))
        took = discard(c, extra)
        if took != extra:
            raise OSError("discarded %d of %d bytes" % (took, extra))
    pos = max(written, consumed)
    if pos != c.consumed:
        c.next = None
    c.consumed = pos
    if verbose or extra > 0:
        log("%s reconciled: written %d, consumed %d, %d discarded" % (c.name, written, consumed, max(extra, 0)))


def on_assign(msg, fds):
    entries = msg.get("entries")
    if set(msg) - {"type", "entries"} or not isinstance(entries, list):
        close_fds(fds)
        fail("malformed assign")
    if len(entries) != len(fds):
        close_fds(fds)
        fail("assign: %d entries, %d fds" % (len(entries), len(fds)))
    news = []
    for i, (e, fd) in enumerate(zip(entries, fds)):
        problem = None
        if not isinstance(e, dict) or set(e) - {"name", "kind", "state"}:
            problem = "a malformed entry"
        elif not valid_name(e.get("name")):
            problem = "a bad name %r" % (e.get("name"),)
        elif e.get("kind") != "tcp-stream":
            problem = "kind %r" % (e.get("kind"),)
        sock = None
        if problem is None:
            try:
                sock = socket.socket(fileno=fd)
                problem = check_tcp_stream(sock)
            except OSError as err:
                problem = "fd: %s" % err.strerror
        if problem is not None:
            if sock is not None:
                sock.detach()
            close_fds(fds)
            fail("assign: %s: %s" % (e.get("name") if isinstance(e, dict) else "?", problem))
        sock.setblocking(False)      # only ever set, never cleared: the flag is shared
        news.append((e, sock))
    for e, sock in news:
        old = conns.get(e["name"])
        if old is not None:          # a second assign of a name we hold: keep the newer copy
            drop(old)
        c = Conn(e["name"], sock)
        c.take_state(e.get("state"))
        conns[c.name] = c
        watch(c)                     # edge-triggered from now on; events before ready are forgotten
        if phase == SERVING:
            serve(c)                 # the client may have sent its first request already
        elif phase in (READY, STOPPED):
            c.has_work = True        # nobody has served it: serve it once when we serve


def on_serve(msg):
    global phase
    if phase != READY:
        fail("serve while %s" % phase)
    send({"type": "serving", "count": len(conns)})   # first, before any closed
    recovered = bool(msg.get("recovered", False))
    log("serving %d connections%s" % (len(conns), " (recovered)" if recovered else ""))
    phase = SERVING
    if recovered:
        for c in list(conns.values()):
            try:
                reconcile(c)
            except OSError as e:
                end(c, "cannot reconcile: %s" % (e.strerror or e))
                continue
            c.has_work = True        # serve each once without waiting for an event
    for c in list(conns.values()):
        if c.has_work:
            runq[c.name] = c


def on_message(msg, fds):
    global phase, stop_due
    t = msg["type"]
    if t == "assign":
        on_assign(msg, fds)
        return
    if fds:
        close_fds(fds)
        fail("%s came with %d fds" % (t, len(fds)))
    if t == "ping":
        send({"type": "pong"})
    elif t == "release":
        names = msg.get("names")
        if not isinstance(names, list):
            fail("malformed release")
        for n in names:
            c = conns.get(n) if isinstance(n, str) else None
            if c is not None:
                drop(c)              # close, never shutdown: it is not only ours
    elif t == "sync":
        if phase != STAGING:
            fail("sync while %s" % phase)
        send({"type": "ready", "count": len(conns)})
        phase = READY
    elif t == "state":
        entries = msg.get("entries")
        if not isinstance(entries, list):
            fail("malformed state")
        if phase == SERVING:
            log("ignoring a state message while serving")
            return
        for e in entries:
            if isinstance(e, dict) and isinstance(e.get("name"), str):
                c = conns.get(e["name"])
                if c is not None:
                    c.take_state(e.get("state"))
    elif t == "wake":
        names = msg.get("names")
        if not isinstance(names, list):
            fail("malformed wake")
        for n in names:
            c = conns.get(n) if isinstance(n, str) else None
            if c is not None:
                schedule(c)
    elif t == "serve":
        on_serve(msg)
    elif t == "stop":
        if phase == SERVING:
            phase = STOPPED
            runq.clear()             # their has_work stays set: they go in wake
        stop_due = True              # answered at the end of this turn
    elif t == "resume":
        if phase != STOPPED:
            log("ignoring resume while %s" % phase)
            return
        phase, stop_due = SERVING, False   # nothing more for that stop
        log("resuming %d connections" % len(conns))
        for c in conns.values():
            if c.has_work:
                runq[c.name] = c
    elif t == "exit":
        os._exit(0)                  # the kernel closes our copies; no shutdown
    elif t == "refuse":
        log("takeoverd refused us: %s" % msg.get("reason"))
        os._exit(1)
    else:
        fail("unexpected message %r" % t)


def on_conn_event(c):
    if phase == STAGING:
        return                       # the predecessor's input: forget it
    if phase == SERVING:
        serve(c)
    else:
        c.has_work = True            # remember, for serve, resume or wake


def answer_stop():
    global stop_due
    stop_due = False
    states = []
    for c in conns.values():
        if c.consumed % 4 != 0 or c.known_mid:
            states.append({"name": c.name, "state": c.state()})
            c.known_mid = c.consumed % 4 != 0
    send_list("state", "entries", states)
    wake = [c.name for c in conns.values() if c.has_work]
    send_list("wake", "names", wake)
    send({"type": "stopped"})
    log("stopped: %d connections, %d states, %d to wake" % (len(conns), len(states), len(wake)))


def main():
    global chan, ep, ack_timeout, verbose
    args = sys.argv[1:]
    while args:
        a = args.pop(0)
        if a == "--ack-timeout-ms" and args:
            ack_timeout = int(args.pop(0)) / 1000.0
        elif a == "--verbose":
            verbose = True
        else:
            sys.stderr.write("usage: %s [--ack-timeout-ms MS] [--verbose]\n" % sys.argv[0])
            os._exit(2)

    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))   # as a crash: touch nothing
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    chan = channel_setup()
    send({"type": "hello", "version": 2, "pid": PID})      # first thing

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass

    ep = select.epoll()
    chan_fd = chan.fileno()
    ep.register(chan_fd, select.EPOLLIN)                   # level-triggered

    while True:
        events = ep.poll(0 if runq and phase == SERVING else -1, MAX_EVENTS)
        mine = []
        chan_ready = False
        for fd, _ in events:
            if fd == chan_fd:
                chan_ready = True
            else:
                mine.append(fd)
        if chan_ready:                                     # the channel first: a stop must not wait
            while True:
                got = recv_channel()
                if got is None:
                    break
                on_message(*got)
        for fd in mine:
            c = by_fd.get(fd)
            if c is not None:
                on_conn_event(c)
        if phase == SERVING and runq:
            for c in list(runq.values()):
                if phase == SERVING and conns.get(c.name) is c:
                    serve(c)
        if stop_due:
            full = len(events) == MAX_EVENTS
            while full:                                    # readiness already reported lands in wake
                more = ep.poll(0, MAX_EVENTS)
                full = len(more) == MAX_EVENTS
                for fd, _ in more:
                    c = by_fd.get(fd)
                    if c is not None:
                        c.has_work = True
            answer_stop()


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except BaseException:
        log("crashed:\n" + traceback.format_exc())
        os._exit(1)                  # no cleanup that could touch a connection
