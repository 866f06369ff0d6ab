// Command legacyrelay is a relay with the original Go relay's wire behaviour:
//
//	legacyrelay [-listen 127.0.0.1:0] [-max 50] [-public-host localhost]
//	            [-bind-host 127.0.0.1] [-timeout 0]
//
// It accepts muxado v1 sessions on the control address. For each session it
// accepts the first (non-extension) stream as the handshake stream, takes a
// port from a FIFO pool (CONTROL+1 .. CONTROL+max, a freed port goes to the
// back; waits without limit when the pool is empty), listens on it, writes
// "<public-host>:<port>" to the handshake stream and closes it (FIN). Every
// TCP connection to that port gets a new plain stream (Open) and bytes are
// copied both ways; when either direction ends both are closed (the
// original's full-close behaviour, kept on purpose). When the session dies
// the public listener is closed and the port goes back to the pool (the
// original's leaks are not copied).
//
// stdout (one event per line):
//
//	LISTEN host:port
//	REGISTERED <port>
//	UNREGISTERED <port>        (session ended, port back in the pool)
//	FAIL: <reason>             (exit 1; exit 2 on -timeout/usage)
//
// SIGTERM/SIGINT: exit 0.
package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/inconshreveable/muxado"
)

var outMu sync.Mutex

func emit(format string, args ...interface{}) {
	outMu.Lock()
	fmt.Fprintf(os.Stdout, format+"\n", args...)
	outMu.Unlock()
}

func diag(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "legacyrelay: "+format+"\n", args...)
}

func fail(status int, format string, args ...interface{}) {
	outMu.Lock()
	fmt.Fprintf(os.Stdout, "FAIL: "+format+"\n", args...)
	os.Exit(status)
}

type relay struct {
	pool       chan int // FIFO of free public ports
	publicHost string
	bindHost   string
	max        int
}

// takePort waits for a free port whose bind succeeds; it gives up when the
// session dies while waiting.
func (r *relay) takePort(dead <-chan struct{}) (int, net.Listener, bool) {
	failures := 0
	for {
		var port int
		select {
		case port = <-r.pool:
		case <-dead:
			return 0, nil, false
		}
		ln, err := net.Listen("tcp", net.JoinHostPort(r.bindHost, strconv.Itoa(port)))
		if err == nil {
			return port, ln, true
		}
		diag("port %d: %v (back to the pool)", port, err)
		r.pool <- port
		failures++
		if failures >= r.max {
			// every port failed once: back off instead of spinning
			failures = 0
			select {
			case <-time.After(time.Second):
			case <-dead:
				return 0, nil, false
			}
		}
	}
}

func (r *relay) handleSession(sess muxado.Session) {
	remote := sess.RemoteAddr()
	dead := make(chan struct{})
	go func() {
		code, err, debug := sess.Wait()
		diag("session %s ended: code=%d err=%v debug=%q", remote, code, err, debug)
		close(dead)
	}()

	// the first stream the service opens is the handshake stream
	hs, err := sess.Accept()
	if err != nil {
		diag("session %s: accept handshake: %v", remote, err)
		sess.Close()
		return
	}

	port, ln, ok := r.takePort(dead)
	if !ok {
		diag("session %s: died while waiting for a port", remote)
		return
	}

	if _, err := hs.Write([]byte(fmt.Sprintf("%s:%d", r.publicHost, port))); err != nil {
		diag("session %s: write handshake: %v", remote, err)
	}
	hs.Close()
	emit("REGISTERED %d", port)

	var once sync.Once
	release := func() {
		once.Do(func() {
			ln.Close()
		})
	}
	go func() {
		<-dead
		release()
	}()

	for {
		conn, err := ln.Accept()
		if err != nil {
			break
		}
		go proxy(sess, conn)
	}
	release()
	// the listener only fails for good when the session died; if not, end
	// the session so the port can be reused
	sess.Close()
	<-dead
	r.pool <- port
	emit("UNREGISTERED %d", port)
}

// proxy copies both ways; when either direction ends, both sides are
// closed (the original's full close).
func proxy(sess muxado.Session, conn net.Conn) {
	stream, err := sess.Open()
	if err != nil {
		diag("open stream for %s: %v", conn.RemoteAddr(), err)
		conn.Close()
		return
	}
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			conn.Close()
			stream.Close()
		})
	}
	go func() {
		io.Copy(stream, conn)
		closeBoth()
	}()
	go func() {
		io.Copy(conn, stream)
		closeBoth()
	}()
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "control address host:port")
	max := flag.Int("max", 50, "number of public ports (CONTROL+1 .. CONTROL+max)")
	publicHost := flag.String("public-host", "localhost", "host part of the address sent to services")
	bindHost := flag.String("bind-host", "127.0.0.1", "address the public ports are bound to")
	timeout := flag.Duration("timeout", 0, "give up (FAIL, exit 2) after this long; 0 = run until signalled")
	flag.Parse()

	if *timeout > 0 {
		time.AfterFunc(*timeout, func() {
			fail(2, "timeout after %s", *timeout)
		})
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		s := <-sigs
		diag("got %v, exiting", s)
		os.Exit(0)
	}()

	if *max < 1 {
		fail(2, "usage: -max must be >= 1")
	}

	l, err := muxado.Listen("tcp", *listen)
	if err != nil {
		fail(1, "listen %s: %v", *listen, err)
	}
	control := l.Addr().(*net.TCPAddr).Port
	if control+*max > 65535 {
		fail(1, "control port %d + max %d exceeds 65535", control, *max)
	}
	r := &relay{
		pool:       make(chan int, *max),
		publicHost: *publicHost,
		bindHost:   *bindHost,
		max:        *max,
	}
	for i := 1; i <= *max; i++ {
		r.pool <- control + i
	}
	emit("LISTEN %s", l.Addr())

	for {
		sess, err := l.Accept()
		if err != nil {
			fail(1, "accept: %v", err)
		}
		go r.handleSession(sess)
	}
}
