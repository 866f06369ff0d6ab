// Command muxpeer is a generic muxado v1 interop peer driven by the Python
// test-suite. It is built on the real Go library (Debian's muxado v1).
//
// Stream-type conventions (the SYN stream type):
//
//	0 ECHO        echo every byte back, Close() (FIN) after reading EOF
//	7 CLOSE_EARLY read one chunk, then Close() at once
//	8 RESET       the other side resets the stream after its first byte
//	9 GOAWAY      on accepting it, sess.Close() (GOAWAY NO_ERROR)
//
// Usage:
//
//	muxpeer serve [-listen 127.0.0.1:0] [-sessions 1] [-reset-poke=true] [-timeout 60s]
//	muxpeer dial -addr host:port -scenario NAME[,NAME...] [-streams 50]
//	             [-bytes 419430] [-idle 16s] [-wait 10s] [-timeout 60s]
//
// stdout (one event per line):
//
//	serve: LISTEN host:port
//	       SESSION_START <remote>
//	       STREAM_ERROR <id> <error text>       (type 8 streams)
//	       STREAM_EOF <id>                      (type 8 streams)
//	       GOAWAY_RECEIVED last=<id> code=<n> debug=<text>
//	       SESSION_END code=<n> err=<text>
//	dial:  RESET <id> code=<n> err=<text>       (reset scenario)
//	       GOAWAY_RECEIVED last=<id> code=<n> debug=<text>
//	       OK <scenario>
//	both:  FAIL: <reason>                       (exit 1; exit 2 on timeout/usage)
package main

import (
	"bytes"
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/inconshreveable/muxado"
)

const (
	typeEcho       = 0
	typeCloseEarly = 7
	typeReset      = 8
	typeGoAway     = 9
)

var outMu sync.Mutex

// emit prints one machine-readable event line on stdout.
func emit(format string, args ...interface{}) {
	outMu.Lock()
	fmt.Fprintf(os.Stdout, format+"\n", args...)
	outMu.Unlock()
}

// diag prints a diagnostic line on stderr.
func diag(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "muxpeer: "+format+"\n", args...)
}

// fail prints a FAIL line and exits with the given status.
func fail(status int, format string, args ...interface{}) {
	outMu.Lock()
	fmt.Fprintf(os.Stdout, "FAIL: "+format+"\n", args...)
	os.Exit(status)
}

// oneLine makes an error text safe to print on a single line.
func oneLine(s string) string {
	return strings.NewReplacer("\r", `\r`, "\n", `\n`).Replace(s)
}

func errText(err error) string {
	if err == nil {
		return "<nil>"
	}
	return oneLine(err.Error())
}

// current scenario, for the timeout / signal messages of dial mode
var current atomic.Value

func currentPrefix() string {
	if s, ok := current.Load().(string); ok && s != "" {
		return s + ": "
	}
	return ""
}

// guard installs the -timeout watchdog and the SIGTERM/SIGINT handler.
// onSignal is run (then the process exits) when a signal arrives.
func guard(timeout time.Duration, onSignal func(os.Signal)) {
	if timeout > 0 {
		time.AfterFunc(timeout, func() {
			fail(2, "%stimeout after %s", currentPrefix(), timeout)
		})
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		s := <-sigs
		onSignal(s)
	}()
}

//////////////////////////////////////////////////////////////////////////
// frame sniffer: muxado's public API does not expose the error code of a
// GOAWAY received from the peer (Wait() reports the local reason, which is
// EOF / INTERNAL_ERROR when the peer closes the TCP connection), so the
// inbound byte stream is parsed alongside the library to report it.
//////////////////////////////////////////////////////////////////////////

type goAwayInfo struct {
	lastID uint32
	code   uint32
	debug  []byte
}

type sniffConn struct {
	net.Conn
	hdr     [8]byte
	hdrN    int
	bodyLen int  // remaining payload bytes of the current frame
	inGA    bool // the current frame is a GOAWAY
	gaBody  []byte
	mu      sync.Mutex
	goAway  *goAwayInfo
	onGA    func(goAwayInfo)
}

func (c *sniffConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.feed(p[:n])
	if err != nil && c.inGA && len(c.gaBody) >= 8 {
		// a Go v1 peer promises debug bytes it never sends: report the
		// GOAWAY with whatever arrived before the connection ended
		c.record()
	}
	return n, err
}

func (c *sniffConn) feed(b []byte) {
	for len(b) > 0 {
		if !c.inGA && c.bodyLen == 0 {
			k := copy(c.hdr[c.hdrN:], b)
			c.hdrN += k
			b = b[k:]
			if c.hdrN < 8 {
				return
			}
			c.hdrN = 0
			c.bodyLen = int(binary.BigEndian.Uint16(c.hdr[0:2]) & 0x3FFF)
			if c.hdr[3]&0x1F == 6 {
				c.inGA = true
				c.gaBody = c.gaBody[:0]
			}
		} else {
			k := c.bodyLen
			if k > len(b) {
				k = len(b)
			}
			if c.inGA {
				c.gaBody = append(c.gaBody, b[:k]...)
			}
			c.bodyLen -= k
			b = b[k:]
		}
		if c.inGA && c.bodyLen == 0 {
			c.record()
		}
	}
}

// record reports the current GOAWAY frame (once per frame).
func (c *sniffConn) record() {
	c.inGA = false
	if len(c.gaBody) < 8 {
		diag("GOAWAY frame with a short body (%d bytes)", len(c.gaBody))
		return
	}
	info := goAwayInfo{
		lastID: binary.BigEndian.Uint32(c.gaBody[0:4]) & 0x7FFFFFFF,
		code:   binary.BigEndian.Uint32(c.gaBody[4:8]),
		debug:  append([]byte(nil), c.gaBody[8:]...),
	}
	c.mu.Lock()
	c.goAway = &info
	c.mu.Unlock()
	if c.onGA != nil {
		c.onGA(info)
	}
}

func (c *sniffConn) goAwaySeen() *goAwayInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.goAway
}

func reportGoAway(info goAwayInfo) {
	emit("GOAWAY_RECEIVED last=%d code=%d debug=%s", info.lastID, info.code, oneLine(string(info.debug)))
}

//////////////////////////////////////////////////////////////////////////
// session waiter: Session.Wait() may only be consumed once
//////////////////////////////////////////////////////////////////////////

type waiter struct {
	done  chan struct{}
	code  muxado.ErrorCode
	err   error
	debug []byte
}

func newWaiter(sess muxado.Session) *waiter {
	w := &waiter{done: make(chan struct{})}
	go func() {
		w.code, w.err, w.debug = sess.Wait()
		close(w.done)
	}()
	return w
}

func (w *waiter) ended() bool {
	select {
	case <-w.done:
		return true
	default:
		return false
	}
}

func (w *waiter) String() string {
	return fmt.Sprintf("code=%d err=%s", w.code, errText(w.err))
}

//////////////////////////////////////////////////////////////////////////
// serve
//////////////////////////////////////////////////////////////////////////

func serve(args []string) {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:0", "address to listen on")
	nsessions := fs.Int("sessions", 1, "exit after this many sessions have ended (0: never)")
	poke := fs.Bool("reset-poke", true, "on a type 8 stream, write one byte ('R') before reading until error")
	timeout := fs.Duration("timeout", 60*time.Second, "give up (FAIL, exit 2) after this long; 0 disables")
	fs.Parse(args)

	guard(*timeout, func(s os.Signal) {
		diag("serve: got %v, exiting", s)
		os.Exit(0)
	})

	// same as muxado.Listen (net.Listen + muxado.Server per connection),
	// with the connection wrapped to sniff the peer's GOAWAY
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		fail(1, "listen %s: %v", *listen, err)
	}
	emit("LISTEN %s", l.Addr())

	ended := make(chan struct{}, 16)
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				diag("accept: %v", err)
				return
			}
			go serveSession(conn, *poke, ended)
		}
	}()

	count := 0
	for range ended {
		count++
		if *nsessions > 0 && count >= *nsessions {
			os.Exit(0)
		}
	}
}

func serveSession(conn net.Conn, poke bool, ended chan<- struct{}) {
	sc := &sniffConn{Conn: conn, onGA: reportGoAway}
	sess := muxado.Server(sc)
	emit("SESSION_START %s", conn.RemoteAddr())
	w := newWaiter(sess)

	var handlers sync.WaitGroup
	for {
		st, err := sess.Accept()
		if err != nil {
			diag("session %s: accept: %v", conn.RemoteAddr(), err)
			break
		}
		handlers.Add(1)
		go func() {
			defer handlers.Done()
			handleStream(sess, st, poke)
		}()
	}
	<-w.done
	// let stream handlers report their final errors first (bounded)
	hd := make(chan struct{})
	go func() { handlers.Wait(); close(hd) }()
	select {
	case <-hd:
	case <-time.After(2 * time.Second):
		diag("session %s: some stream handlers still running", conn.RemoteAddr())
	}
	if len(w.debug) > 0 {
		diag("session %s: remote debug %q", conn.RemoteAddr(), w.debug)
	}
	emit("SESSION_END %s", w)
	ended <- struct{}{}
}

func handleStream(sess muxado.Session, st muxado.Stream, poke bool) {
	id := st.Id()
	switch st.StreamType() {
	case typeEcho:
		n, err := io.Copy(st, st)
		if err != nil {
			diag("stream %d echo: %d bytes, error %v", id, n, err)
			return
		}
		diag("stream %d echo: %d bytes, EOF", id, n)
		st.Close()

	case typeCloseEarly:
		buf := make([]byte, 65536)
		n, err := st.Read(buf)
		diag("stream %d close-early: read %d bytes (err %v), closing", id, n, err)
		if err == nil || err == io.EOF {
			st.Close()
		}

	case typeReset:
		if poke {
			go func() {
				if _, err := st.Write([]byte{'R'}); err != nil {
					diag("stream %d reset: poke write: %v", id, err)
				}
			}()
		}
		buf := make([]byte, 65536)
		total := 0
		for {
			n, err := st.Read(buf)
			total += n
			if err == io.EOF {
				diag("stream %d reset: EOF after %d bytes", id, total)
				emit("STREAM_EOF %d", id)
				st.Close()
				return
			}
			if err != nil {
				diag("stream %d reset: error after %d bytes", id, total)
				emit("STREAM_ERROR %d %s", id, errText(err))
				return
			}
		}

	case typeGoAway:
		diag("stream %d goaway: closing session", id)
		if err := sess.Close(); err != nil {
			diag("stream %d goaway: Close: %v", id, err)
		}

	default:
		diag("stream %d: unknown type %d, echoing", id, st.StreamType())
		if _, err := io.Copy(st, st); err == nil {
			st.Close()
		}
	}
}

//////////////////////////////////////////////////////////////////////////
// dial
//////////////////////////////////////////////////////////////////////////

type prng struct {
	s   uint64
	buf [8]byte
	pos int
}

func newPRNG(seed uint64) *prng {
	return &prng{s: seed*0x9E3779B97F4A7C15 + 0x2545F4914F6CDD1D, pos: 8}
}

func (p *prng) fill(b []byte) {
	for i := range b {
		if p.pos == 8 {
			// xorshift64*
			p.s ^= p.s >> 12
			p.s ^= p.s << 25
			p.s ^= p.s >> 27
			binary.LittleEndian.PutUint64(p.buf[:], p.s*0x2545F4914F6CDD1D)
			p.pos = 0
		}
		b[i] = p.buf[p.pos]
		p.pos++
	}
}

type dialer struct {
	sess    muxado.Session
	w       *waiter
	sc      *sniffConn
	streams int
	nbytes  int
	idle    time.Duration
	wait    time.Duration
}

func (d *dialer) alive() error {
	if d.w.ended() {
		return fmt.Errorf("session ended: %s", d.w)
	}
	return nil
}

// echoStream opens a type 0 stream, writes n pseudo-random bytes (seed)
// while reading the echo, half-closes, reads to EOF and verifies.
func (d *dialer) echoStream(seed uint64, n int) error {
	st, err := d.sess.OpenStream(0, typeEcho, false)
	if err != nil {
		return fmt.Errorf("open: %v", err)
	}
	id := st.Id()
	werr := make(chan error, 1)
	go func() {
		gen := newPRNG(seed)
		buf := make([]byte, 32768)
		left := n
		for left > 0 {
			k := len(buf)
			if k > left {
				k = left
			}
			gen.fill(buf[:k])
			if _, err := st.Write(buf[:k]); err != nil {
				werr <- fmt.Errorf("stream %d: write after %d bytes: %v", id, n-left, err)
				return
			}
			left -= k
		}
		if _, err := st.HalfClose(nil); err != nil {
			werr <- fmt.Errorf("stream %d: HalfClose: %v", id, err)
			return
		}
		werr <- nil
	}()

	gen := newPRNG(seed)
	buf := make([]byte, 32768)
	want := make([]byte, 32768)
	total := 0
	var rerr error
	for {
		k, err := st.Read(buf)
		if k > 0 {
			if total+k > n {
				rerr = fmt.Errorf("stream %d: got %d bytes, more than the %d sent", id, total+k, n)
				break
			}
			gen.fill(want[:k])
			if !bytes.Equal(buf[:k], want[:k]) {
				off := 0
				for off < k && buf[off] == want[off] {
					off++
				}
				rerr = fmt.Errorf("stream %d: data mismatch at offset %d", id, total+off)
				break
			}
			total += k
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			rerr = fmt.Errorf("stream %d: read after %d of %d bytes: %v", id, total, n, err)
			break
		}
	}
	if rerr == nil && total != n {
		rerr = fmt.Errorf("stream %d: EOF after %d of %d bytes", id, total, n)
	}
	if rerr != nil {
		st.Close()
		return rerr
	}
	if err := <-werr; err != nil {
		return err
	}
	st.Close()
	return nil
}

func (d *dialer) scEcho() error {
	errs := make(chan error, d.streams)
	for i := 0; i < d.streams; i++ {
		go func(i int) {
			errs <- d.echoStream(uint64(i+1), d.nbytes)
		}(i)
	}
	var first error
	for i := 0; i < d.streams; i++ {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	if first != nil {
		return first
	}
	diag("echo: %d streams x %d bytes = %d bytes verified", d.streams, d.nbytes, d.streams*d.nbytes)
	return d.alive()
}

func (d *dialer) scHalfClose() error {
	return d.echoStream(1000, 100000)
}

// freshEcho checks that a new echo stream still works.
func (d *dialer) freshEcho(seed uint64) error {
	if err := d.alive(); err != nil {
		return err
	}
	if err := d.echoStream(seed, 100000); err != nil {
		return fmt.Errorf("fresh echo stream: %v", err)
	}
	return d.alive()
}

var resetRe = regexp.MustCompile(`reset by peer with error (\d+)`)

func (d *dialer) scReset() error {
	st, err := d.sess.OpenStream(0, typeReset, false)
	if err != nil {
		return fmt.Errorf("open: %v", err)
	}
	id := st.Id()
	if _, err := st.Write([]byte{'x'}); err != nil {
		return fmt.Errorf("stream %d: write: %v", id, err)
	}
	st.SetReadDeadline(time.Now().Add(d.wait))
	buf := make([]byte, 4096)
	for {
		n, err := st.Read(buf)
		if n > 0 {
			diag("reset: stream %d: ignoring %d bytes of data", id, n)
		}
		if err == nil {
			continue
		}
		if err == io.EOF {
			return fmt.Errorf("stream %d: got EOF, expected a reset", id)
		}
		m := resetRe.FindStringSubmatch(err.Error())
		if m == nil {
			return fmt.Errorf("stream %d: expected a reset, got error %q", id, err.Error())
		}
		code, _ := strconv.Atoi(m[1])
		emit("RESET %d code=%d err=%s", id, code, errText(err))
		break
	}
	return d.freshEcho(2000)
}

func (d *dialer) scCloseEarly() error {
	st, err := d.sess.OpenStream(0, typeCloseEarly, false)
	if err != nil {
		return fmt.Errorf("open: %v", err)
	}
	id := st.Id()
	werr := make(chan error, 1)
	go func() {
		data := make([]byte, 1<<20)
		newPRNG(7).fill(data)
		_, err := st.Write(data)
		werr <- err
	}()
	// drain whatever the peer sends (nothing, then FIN or RST)
	go func() {
		n, err := io.Copy(io.Discard, st)
		diag("close-early: stream %d: read %d bytes, then %v", id, n, err)
	}()
	select {
	case err := <-werr:
		if err != nil {
			diag("close-early: stream %d: write stopped: %v", id, err)
		} else {
			diag("close-early: stream %d: write of 1 MiB completed", id)
			st.Close()
		}
	case <-time.After(d.wait):
		return fmt.Errorf("stream %d: write neither completed nor failed within %s", id, d.wait)
	}
	return d.freshEcho(3000)
}

func (d *dialer) scIdle() error {
	diag("idle: sleeping %s", d.idle)
	select {
	case <-time.After(d.idle):
	case <-d.w.done:
		return fmt.Errorf("session ended while idle: %s", d.w)
	}
	return d.freshEcho(4000)
}

func (d *dialer) scGoAway() error {
	if err := d.alive(); err != nil {
		return err
	}
	if err := d.sess.Close(); err != nil {
		return fmt.Errorf("Close: %v", err)
	}
	select {
	case <-d.w.done:
		diag("goaway: local session ended: %s", d.w)
	case <-time.After(d.wait):
		return fmt.Errorf("session did not end within %s of Close()", d.wait)
	}
	return nil
}

func (d *dialer) scWaitGoAway() error {
	st, err := d.sess.OpenStream(0, typeGoAway, false)
	if err != nil {
		return fmt.Errorf("open: %v", err)
	}
	diag("wait-goaway: opened stream %d", st.Id())
	select {
	case <-d.w.done:
	case <-time.After(d.wait):
		ga := d.sc.goAwaySeen()
		if ga != nil {
			return fmt.Errorf("GOAWAY code=%d received but the session did not end within %s", ga.code, d.wait)
		}
		return fmt.Errorf("session did not end within %s", d.wait)
	}
	diag("wait-goaway: session ended: %s debug=%q", d.w, d.w.debug)
	ga := d.sc.goAwaySeen()
	if ga == nil {
		return fmt.Errorf("session ended without a GOAWAY from the peer: %s", d.w)
	}
	if ga.code != 0 {
		return fmt.Errorf("peer's GOAWAY has code %d, want 0 (NO_ERROR)", ga.code)
	}
	diag("wait-goaway: peer GOAWAY last=%d code=%d debug=%q", ga.lastID, ga.code, ga.debug)
	return nil
}

func dial(args []string) {
	fs := flag.NewFlagSet("dial", flag.ExitOnError)
	addr := fs.String("addr", "", "muxado server address host:port (required)")
	scen := fs.String("scenario", "echo", "comma-separated scenarios: echo,halfclose,reset,close-early,idle,goaway,wait-goaway")
	streams := fs.Int("streams", 50, "concurrent streams in the echo scenario")
	nbytes := fs.Int("bytes", 419430, "bytes per stream in the echo scenario")
	idle := fs.Duration("idle", 16*time.Second, "idle time in the idle scenario")
	wait := fs.Duration("wait", 10*time.Second, "bound for waiting on a reset / write stop / session end")
	timeout := fs.Duration("timeout", 60*time.Second, "give up (FAIL, exit 2) after this long; 0 disables")
	fs.Parse(args)

	guard(*timeout, func(s os.Signal) {
		fail(1, "%sinterrupted by %v", currentPrefix(), s)
	})

	if *addr == "" {
		fail(2, "usage: -addr is required")
	}
	names := strings.Split(*scen, ",")
	for i, n := range names {
		switch n {
		case "echo", "halfclose", "reset", "close-early", "idle":
		case "goaway", "wait-goaway":
			if i != len(names)-1 {
				fail(2, "usage: scenario %s must be the last one", n)
			}
		default:
			fail(2, "usage: unknown scenario %q", n)
		}
	}

	conn, err := net.Dial("tcp", *addr)
	if err != nil {
		fail(1, "dial %s: %v", *addr, err)
	}
	sc := &sniffConn{Conn: conn, onGA: reportGoAway}
	sess := muxado.Client(sc)
	d := &dialer{
		sess:    sess,
		w:       newWaiter(sess),
		sc:      sc,
		streams: *streams,
		nbytes:  *nbytes,
		idle:    *idle,
		wait:    *wait,
	}

	last := ""
	for _, name := range names {
		current.Store(name)
		start := time.Now()
		var err error
		switch name {
		case "echo":
			err = d.scEcho()
		case "halfclose":
			err = d.scHalfClose()
		case "reset":
			err = d.scReset()
		case "close-early":
			err = d.scCloseEarly()
		case "idle":
			err = d.scIdle()
		case "goaway":
			err = d.scGoAway()
		case "wait-goaway":
			err = d.scWaitGoAway()
		}
		if err != nil {
			fail(1, "%s: %s", name, oneLine(err.Error()))
		}
		diag("%s passed in %s", name, time.Since(start).Round(time.Millisecond))
		emit("OK %s", name)
		last = name
	}
	current.Store("")
	if last != "goaway" && last != "wait-goaway" {
		sess.Close()
		select {
		case <-d.w.done:
		case <-time.After(2 * time.Second):
		}
	}
	os.Exit(0)
}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: muxpeer serve|dial [flags]")
		fail(2, "usage: missing mode")
	}
	switch os.Args[1] {
	case "serve":
		serve(os.Args[2:])
	case "dial":
		dial(os.Args[2:])
	default:
		fail(2, "usage: unknown mode %q (want serve or dial)", os.Args[1])
	}
}
