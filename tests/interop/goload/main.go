// Command goload is the load generator and the direct echo server of
// “python -m benchmarks“, and the agent sessions of “python -m
// benchmarks.capacity“ (sessions.go: muxado v1 from GOPATH; builds in GOPATH
// mode like the other programs):
//
//	goload echo       -listen 127.0.0.1:0
//	goload throughput -addr H:P [-host NAME] [-conns 1] [-bytes 0] [-seconds 0] [-timeout 60s]
//	goload latency    -addr H:P[,H:P...] [-host NAME[,NAME...]] [-n 1000] [-block 50] [-seconds 0] [-rate 0 [-inflight 256]] [-timeout 10s]
//	goload cps        -addr H:P [-host NAME] [-conns 8] [-seconds 3] [-timeout 10s]
//	goload churn      -addr H:P [-conns 32] [-rate 0] [-seconds 3] [-rst] [-timeout 2s]
//	goload hold       -addr H:P [-host NAME] [-n 10000] [-parallel 32] [-ping] [-src CIDR] [-timeout 120s]
//	goload sessions   hold|churn -relay H:P ... (see sessions.go)
//
// -host NAME (throughput, latency, cps, hold): every connection first sends
// an HTTP request head naming NAME ("GET / HTTP/1.1\r\nHost: NAME\r\n\r\n",
// what a relay's shared HTTP entrance routes by) and reads its echo back,
// then goes on as without it. Throughput sends the heads before the clock
// starts; latency, cps and hold count them in (latency: connect + head and
// its echo + the 1-byte echo). For latency, -host is a comma-separated list
// matching -addr entry by entry, an empty entry meaning no head there.
//
// echo: listens, prints "LISTEN host:port", then echoes every connection
// exactly (io.Copy); after the peer's FIN has been read and everything
// echoed it half-closes, then closes. Runs until SIGTERM/SIGINT.
//
// throughput: opens -conns connections at once; each one writes a
// pseudo-random byte stream (-bytes bytes, or for -seconds seconds, or
// whichever ends first) while reading the echo concurrently and checking
// every byte against what was sent. It never half-closes (the original Go
// relay turns a visitor's half-close into a full close): it reads until all
// sent bytes came back, then closes. One JSON line on stdout:
//
//	{"mbps":..,"bytes":..,"seconds":..,"conns":..,"errors":..,"error":".."}
//
// mbps is echoed bytes (one direction) per second, MB = 10^6 bytes.
//
// latency: -n times in a row: connect, write 1 byte, read it back, close;
// prints {"n","errors","p50_us","p99_us","mean_us","max_us","min_us"}. With
// several addresses, each gets -n connections: they take turns, -block
// connections at a time, the order rotating every round (an address that
// fails 10 times in a row is not tried again: the rest count as errors); prints
// {"addrs":[..],"block":..,"results":[one object as above per address]}.
// With -seconds > 0 it also stops once that long has passed (n counts the
// connections made). With -rate R > 0 (one address) the loop is open: the
// connections start on a schedule of R per second (at most -inflight at
// once), each timed from its scheduled start, so that a stall of the relay
// counts for every connection due during it.
//
// cps: -conns goroutines each loop connect + 1-byte echo + close for
// -seconds; prints {"cps","completed","errors","seconds"}.
//
// churn: visitor churn, no echo awaited: -conns goroutines each loop
// connect, write 1 byte, close, for -seconds; with -rst the close is an
// abortive one (SO_LINGER 0: the peer gets a RST). With -rate > 0 the
// connections start on a schedule of that many per second in all
// (goroutines that fall behind start at once, never more than -conns in
// flight); 0 is as fast as they go. Prints
// {"cps","completed","errors","seconds","rate","conns","rst","error"}.
//
// hold: opens -n connections (-parallel dials at a time), with -ping each
// one echoes one byte first (so the whole path is known to be up), then
// prints {"held","errors","seconds","error"} and holds them idle until
// stdin reaches EOF or SIGTERM/SIGINT arrives; then closes them and exits 0.
// With -src CIDR (e.g. 127.0.0.0/8) each connection's socket is bound to the
// next address of that network before it connects (127.0.0.1, the network
// and broadcast addresses skipped), so that 100,000 connections to one port
// do not run out of ephemeral ports.
//
// Exit status: 0 when the JSON line was printed (errors are counted in it),
// 2 on bad usage.
package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"math/rand"
	"net"
	"os"
	"os/signal"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

const (
	patternSize = 1 << 20 // bytes of the pseudo-random pattern
	chunkSize   = 64 << 10
)

// pattern is the pseudo-random data every connection sends: connection i
// starts at offset i*7919 and walks it cyclically.
var pattern []byte

func init() {
	r := rand.New(rand.NewSource(20240605))
	// chunkSize extra bytes so that any chunk starting inside the pattern
	// can be taken as one slice (the tail repeats the head)
	pattern = make([]byte, patternSize+chunkSize)
	r.Read(pattern[:patternSize])
	copy(pattern[patternSize:], pattern[:chunkSize])
}

// slice returns up to n expected bytes at stream offset off for a
// connection starting at start (never more than chunkSize).
func slice(start, off int64, n int) []byte {
	if n > chunkSize {
		n = chunkSize
	}
	p := (start + off) % patternSize
	return pattern[p : p+int64(n)]
}

func emitJSON(v interface{}) {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	os.Stdout.Write(append(b, '\n'))
}

func usage(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "goload: "+format+"\n", args...)
	os.Exit(2)
}

func main() {
	if len(os.Args) < 2 {
		usage("usage: goload echo|throughput|latency|cps|churn|hold|sessions [flags]")
	}
	cmd, args := os.Args[1], os.Args[2:]
	switch cmd {
	case "echo":
		echoMain(args)
	case "throughput":
		throughputMain(args)
	case "latency":
		latencyMain(args)
	case "cps":
		cpsMain(args)
	case "churn":
		churnMain(args)
	case "hold":
		holdMain(args)
	case "sessions":
		sessionsMain(args)
	default:
		usage("unknown command %q (echo, throughput, latency, cps, churn, hold, sessions)", cmd)
	}
}

func parse(fs *flag.FlagSet, args []string) {
	if err := fs.Parse(args); err != nil {
		os.Exit(2)
	}
	if fs.NArg() != 0 {
		usage("%s: unexpected arguments %v", fs.Name(), fs.Args())
	}
}

func exitOnSignal() {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		os.Exit(0)
	}()
}

// ---------------------------------------------------------------- echo

func echoMain(args []string) {
	fs := flag.NewFlagSet("echo", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:0", "address to listen on")
	parse(fs, args)
	exitOnSignal()
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Printf("FAIL: listen %s: %v\n", *listen, err)
		os.Exit(1)
	}
	fmt.Printf("LISTEN %s\n", ln.Addr())
	for {
		conn, err := ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Temporary() {
				time.Sleep(5 * time.Millisecond)
				continue
			}
			fmt.Fprintf(os.Stderr, "goload echo: accept: %v\n", err)
			os.Exit(1)
		}
		go func(c *net.TCPConn) {
			defer c.Close()
			if err := echo(c); err == nil {
				c.CloseWrite()
				// wait for the peer to close before closing ourselves
				io.Copy(ioutil.Discard, c)
			}
		}(conn.(*net.TCPConn))
	}
}

// echo copies c back to itself until EOF (nil) or an error. Plain read and
// write, not io.Copy: TCPConn.ReadFrom would splice, and every blocked
// splice holds a pipe (two more descriptors per idle connection). The
// buffer starts small (idle connections are cheap) and grows to chunkSize
// the first time a read fills it.
func echo(c *net.TCPConn) error {
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return werr
			}
			if n == len(buf) && len(buf) < chunkSize {
				buf = make([]byte, chunkSize)
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// ---------------------------------------------------------- throughput

type throughputResult struct {
	MBps    float64 `json:"mbps"`
	Bytes   int64   `json:"bytes"`
	Seconds float64 `json:"seconds"`
	Conns   int     `json:"conns"`
	Errors  int     `json:"errors"`
	Error   string  `json:"error,omitempty"`
}

type firstError struct {
	mu  sync.Mutex
	err error
	n   int
}

func (f *firstError) add(err error) {
	f.mu.Lock()
	if f.err == nil {
		f.err = err
	}
	f.n++
	f.mu.Unlock()
}

func (f *firstError) text() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.err == nil {
		return ""
	}
	return f.err.Error()
}

// stopChannel is closed at SIGTERM, SIGINT or stdin's EOF, whichever comes first.
func stopChannel() <-chan struct{} {
	stop := make(chan struct{})
	var once sync.Once
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-sigs
		once.Do(func() { close(stop) })
	}()
	go func() {
		io.Copy(ioutil.Discard, os.Stdin)
		once.Do(func() { close(stop) })
	}()
	return stop
}

// openAll calls open n times, parallel calls at once, each given the time
// left until timeout (none left: an error "timed out opening WHAT"), and
// stops starting new ones once stop is closed. What opened, the errors, and
// whether stop came first.
func openAll[T any](n, parallel int, timeout time.Duration, stop <-chan struct{}, what string,
	open func(left time.Duration) (T, error)) ([]T, *firstError, bool) {
	errs := &firstError{}
	var mu sync.Mutex
	opened := make([]T, 0, n)
	deadline := time.Now().Add(timeout)
	jobs := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < parallel; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range jobs {
				left := time.Until(deadline)
				if left <= 0 {
					errs.add(fmt.Errorf("timed out opening %s", what))
					continue
				}
				t, err := open(left)
				if err != nil {
					errs.add(err)
					continue
				}
				mu.Lock()
				opened = append(opened, t)
				mu.Unlock()
			}
		}()
	}
	stopped := false
feed:
	for i := 0; i < n; i++ {
		select {
		case jobs <- struct{}{}:
		case <-stop:
			stopped = true
			break feed
		}
	}
	close(jobs)
	wg.Wait()
	return opened, errs, stopped
}

func throughputMain(args []string) {
	fs := flag.NewFlagSet("throughput", flag.ContinueOnError)
	addr := fs.String("addr", "", "host:port to connect to")
	host := fs.String("host", "", "send an HTTP request head naming this host first (and read its echo)")
	conns := fs.Int("conns", 1, "concurrent connections")
	nbytes := fs.Int64("bytes", 0, "bytes each connection sends (0: no limit, use -seconds)")
	seconds := fs.Float64("seconds", 0, "stop sending after this long (0: no limit, use -bytes)")
	timeout := fs.Duration("timeout", 60*time.Second, "give up on a connection after this long")
	parse(fs, args)
	if *addr == "" || *conns < 1 || (*nbytes <= 0 && *seconds <= 0) {
		usage("throughput: need -addr, -conns >= 1 and -bytes or -seconds")
	}
	var errs firstError
	var total int64
	var ready, wg sync.WaitGroup
	startGun := make(chan struct{})
	// connect everything first, then start the clock
	connsList := make([]net.Conn, *conns)
	for i := range connsList {
		c, err := dialHead(*addr, *host, 10*time.Second)
		if err != nil {
			errs.add(err)
			continue
		}
		connsList[i] = c
	}
	var stopAt time.Time
	for i, c := range connsList {
		if c == nil {
			continue
		}
		ready.Add(1)
		wg.Add(1)
		go func(i int, c net.Conn) {
			defer wg.Done()
			defer c.Close()
			ready.Done()
			<-startGun
			deadline := time.Now().Add(*timeout)
			c.SetDeadline(deadline)
			n, err := echoStream(c, int64(i)*7919, *nbytes, stopAt, deadline)
			atomic.AddInt64(&total, n)
			if err != nil {
				errs.add(err)
			}
		}(i, c)
	}
	ready.Wait()
	start := time.Now()
	if *seconds > 0 {
		stopAt = start.Add(time.Duration(*seconds * float64(time.Second)))
	}
	close(startGun)
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	emitJSON(throughputResult{
		MBps:    float64(total) / elapsed / 1e6,
		Bytes:   total,
		Seconds: elapsed,
		Conns:   *conns,
		Errors:  errs.n,
		Error:   errs.text(),
	})
}

// echoStream sends limit bytes (0: unlimited) or until stopAt (zero: never)
// and reads the echo concurrently, verifying it; returns the bytes that
// came back verified. deadline bounds the whole exchange.
func echoStream(c net.Conn, start, limit int64, stopAt, deadline time.Time) (int64, error) {
	var sent int64  // written by the writer before it sets wdone
	var wdone int32 // 1 once the writer has finished
	var werr error  // the writer's error, read after wdone
	go func() {
		var off int64
		var err error
		for limit <= 0 || off < limit {
			if !stopAt.IsZero() && time.Now().After(stopAt) {
				break
			}
			n := chunkSize
			if limit > 0 && limit-off < int64(n) {
				n = int(limit - off)
			}
			var w int
			w, err = c.Write(slice(start, off, n))
			off += int64(w)
			if err != nil {
				break
			}
		}
		sent = off
		werr = err
		atomic.StoreInt32(&wdone, 1)
		// wake the reader if it is blocked waiting for bytes that will
		// never come (it resets the deadline and checks the total)
		c.SetReadDeadline(time.Unix(1, 0))
	}()
	buf := make([]byte, chunkSize)
	var got int64
	for {
		if atomic.LoadInt32(&wdone) == 1 {
			if werr != nil {
				return got, fmt.Errorf("write: %w", werr)
			}
			if got >= sent {
				break
			}
		}
		n, err := c.Read(buf)
		if n > 0 {
			if !bytes.Equal(buf[:n], slice(start, got, n)) {
				c.Close()
				return got, fmt.Errorf("echo differs from what was sent near offset %d", got)
			}
			got += int64(n)
		}
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() && atomic.LoadInt32(&wdone) == 1 && time.Now().Before(deadline) {
				c.SetReadDeadline(deadline)
				continue
			}
			c.Close()
			return got, fmt.Errorf("read after %d bytes: %w", got, err)
		}
	}
	if got > sent {
		return got, fmt.Errorf("echo longer than what was sent (%d > %d)", got, sent)
	}
	return got, nil
}

// ------------------------------------------------------------- latency

// httpHead is the request head -host sends first.
func httpHead(host string) []byte {
	return []byte("GET / HTTP/1.1\r\nHost: " + host + "\r\n\r\n")
}

// sendHead writes the request head naming host (nothing when host is
// empty) and reads its echo back, checking it.
func sendHead(c net.Conn, host string) error {
	if host == "" {
		return nil
	}
	head := httpHead(host)
	if _, err := c.Write(head); err != nil {
		return fmt.Errorf("write head: %w", err)
	}
	got := make([]byte, len(head))
	if n, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("read head echo (%q so far): %w", got[:n], err)
	}
	if !bytes.Equal(got, head) {
		return fmt.Errorf("head echo differs: %q", got)
	}
	return nil
}

// parseHosts splits latency's -host list: one entry per address (an
// empty list: no heads at all).
func parseHosts(list string, addrs int) ([]string, error) {
	if list == "" {
		return make([]string, addrs), nil
	}
	hosts := strings.Split(list, ",")
	if len(hosts) != addrs {
		return nil, fmt.Errorf("-host has %d entries for %d addresses", len(hosts), addrs)
	}
	for _, h := range hosts {
		if strings.ContainsAny(h, " \t\r\n") {
			return nil, fmt.Errorf("-host %q holds white space", h)
		}
	}
	return hosts, nil
}

// sources: the -src network (hold, and the sessions' -src), each socket bound
// to its next address before it connects (empty: the kernel chooses).
type sources struct {
	mu    sync.Mutex
	base  uint32
	size  uint32
	next  uint32
	empty bool
}

func newSources(cidr string) (*sources, error) {
	if cidr == "" {
		return &sources{empty: true}, nil
	}
	_, n, err := net.ParseCIDR(cidr)
	if err != nil {
		return nil, err
	}
	ip4 := n.IP.To4()
	ones, bits := n.Mask.Size()
	if ip4 == nil || bits-ones < 2 {
		return nil, fmt.Errorf("-src %s: an IPv4 network of at least 4 addresses", cidr)
	}
	return &sources{base: binary.BigEndian.Uint32(ip4), size: uint32(1) << uint(bits-ones), next: 1}, nil
}

// dialer returns a dialer bound to the next source address (the network
// and broadcast addresses and 127.0.0.1 skipped).
func (s *sources) dialer(timeout time.Duration) *net.Dialer {
	d := &net.Dialer{Timeout: timeout}
	if s.empty {
		return d
	}
	s.mu.Lock()
	var a uint32
	for {
		a = s.base + s.next
		s.next++
		if s.next >= s.size-1 {
			s.next = 1
		}
		if a != 0x7f000001 {
			break
		}
	}
	s.mu.Unlock()
	ip := make(net.IP, 4)
	binary.BigEndian.PutUint32(ip, a)
	d.LocalAddr = &net.TCPAddr{IP: ip}
	return d
}

// src is hold's -src network (none unless it is given).
var src = &sources{empty: true}

// dialTCP connects to addr, from the next -src address if there is one.
func dialTCP(addr string, timeout time.Duration) (net.Conn, error) {
	return src.dialer(timeout).Dial("tcp", addr)
}

// dialHead connects to addr and sends the head naming host (if any).
func dialHead(addr, host string, timeout time.Duration) (net.Conn, error) {
	c, err := dialTCP(addr, timeout)
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	if host != "" {
		c.SetDeadline(time.Now().Add(timeout))
		if err := sendHead(c, host); err != nil {
			c.Close()
			return nil, err
		}
		c.SetDeadline(time.Time{})
	}
	return c, nil
}

func ping(addr, host string, timeout time.Duration) (net.Conn, error) {
	c, err := dialTCP(addr, timeout)
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	c.SetDeadline(time.Now().Add(timeout))
	if err := sendHead(c, host); err != nil {
		c.Close()
		return nil, err
	}
	if _, err := c.Write([]byte{'x'}); err != nil {
		c.Close()
		return nil, fmt.Errorf("write: %w", err)
	}
	var b [1]byte
	if _, err := io.ReadFull(c, b[:]); err != nil {
		c.Close()
		return nil, fmt.Errorf("read: %w", err)
	}
	if b[0] != 'x' {
		c.Close()
		return nil, fmt.Errorf("echo returned %q, not 'x'", b[0])
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

type latencyResult struct {
	N      int     `json:"n"`
	Errors int     `json:"errors"`
	P50    float64 `json:"p50_us"`
	P99    float64 `json:"p99_us"`
	Mean   float64 `json:"mean_us"`
	Min    float64 `json:"min_us"`
	Max    float64 `json:"max_us"`
	Error  string  `json:"error,omitempty"`
}

func percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	// nearest rank
	i := int(p/100*float64(len(sorted))+0.999999) - 1
	if i < 0 {
		i = 0
	}
	if i >= len(sorted) {
		i = len(sorted) - 1
	}
	return sorted[i]
}

func latencyMain(args []string) {
	fs := flag.NewFlagSet("latency", flag.ContinueOnError)
	addrList := fs.String("addr", "", "host:port to connect to; several, comma-separated, take turns")
	hostList := fs.String("host", "", "send an HTTP request head naming this host first; comma-separated, one per -addr (empty: none)")
	n := fs.Int("n", 1000, "connections, one after another (to each address)")
	block := fs.Int("block", 50, "with several addresses: connections to one before the next takes its turn")
	seconds := fs.Float64("seconds", 0, "also stop after this long (0: no limit)")
	timeout := fs.Duration("timeout", 10*time.Second, "give up on one connection after this long")
	rate := fs.Float64("rate", 0, "open loop: start connections on this schedule (per second), one address only")
	inflight := fs.Int("inflight", 256, "with -rate: most connections in flight")
	parse(fs, args)
	addrs := strings.Split(*addrList, ",")
	if *rate > 0 {
		if len(addrs) != 1 || *inflight < 1 {
			usage("latency: -rate takes one -addr and -inflight >= 1")
		}
		hosts, err := parseHosts(*hostList, 1)
		if err != nil {
			usage("latency: %v", err)
		}
		emitJSON(openLoop(addrs[0], hosts[0], *n, *rate, *inflight, *seconds, *timeout))
		return
	}
	var stopAt time.Time
	if *seconds > 0 {
		stopAt = time.Now().Add(time.Duration(*seconds * float64(time.Second)))
	}
	if *addrList == "" || *n < 1 || *block < 1 {
		usage("latency: need -addr, -n >= 1 and -block >= 1")
	}
	hosts, err := parseHosts(*hostList, len(addrs))
	if err != nil {
		usage("latency: %v", err)
	}
	errs := make([]firstError, len(addrs))
	samples := make([][]float64, len(addrs))
	done := make([]int, len(addrs))
	failing := make([]int, len(addrs)) // consecutive errors
	const giveUp = 10
	// Several addresses take turns in blocks, the order rotating every
	// round, so that a machine that speeds up or slows down during the run
	// affects them alike.
	for round := 0; ; round++ {
		busy := false
		for k := range addrs {
			j := (k + round) % len(addrs)
			for i := 0; i < *block && done[j] < *n; i++ {
				if !stopAt.IsZero() && time.Now().After(stopAt) {
					break
				}
				busy = true
				done[j]++
				if failing[j] >= giveUp {
					// a dead or hung address: count the rest as errors
					// rather than let it hold up the others
					errs[j].add(fmt.Errorf("gave up after %d errors in a row", giveUp))
					continue
				}
				t0 := time.Now()
				c, err := ping(addrs[j], hosts[j], *timeout)
				us := float64(time.Since(t0).Nanoseconds()) / 1e3
				if err != nil {
					errs[j].add(err)
					failing[j]++
					continue
				}
				failing[j] = 0
				c.Close()
				samples[j] = append(samples[j], us)
			}
		}
		if !busy {
			break
		}
	}
	results := make([]latencyResult, len(addrs))
	for j := range addrs {
		results[j] = summarize(samples[j], &errs[j])
	}
	if len(addrs) == 1 {
		emitJSON(results[0])
		return
	}
	emitJSON(map[string]interface{}{"addrs": addrs, "hosts": hosts, "block": *block, "results": results})
}

// openLoop starts connection i at start + i/rate whatever became of the
// ones before (up to inflight at once; one that cannot start then starts as
// soon as a slot frees) and times each from its scheduled start, so that a
// stall of the server delays every connection due during it, as it would
// delay visitors arriving on their own (a closed loop, one connection after
// another, sees a stall once however long it lasts).
func openLoop(addr, host string, n int, rate float64, inflight int, seconds float64, timeout time.Duration) latencyResult {
	var errs firstError
	var mu sync.Mutex
	samples := make([]float64, 0, n)
	slots := make(chan struct{}, inflight)
	var wg sync.WaitGroup
	start := time.Now()
	interval := time.Duration(float64(time.Second) / rate)
	for i := 0; i < n; i++ {
		due := start.Add(time.Duration(i) * interval)
		if seconds > 0 && due.Sub(start).Seconds() > seconds {
			break
		}
		if d := time.Until(due); d > 0 {
			time.Sleep(d)
		}
		slots <- struct{}{}
		wg.Add(1)
		go func(due time.Time) {
			defer wg.Done()
			defer func() { <-slots }()
			c, err := ping(addr, host, timeout)
			us := float64(time.Since(due).Nanoseconds()) / 1e3
			if err != nil {
				errs.add(err)
				return
			}
			c.Close()
			mu.Lock()
			samples = append(samples, us)
			mu.Unlock()
		}(due)
	}
	wg.Wait()
	return summarize(samples, &errs)
}

func summarize(samples []float64, errs *firstError) latencyResult {
	sort.Float64s(samples)
	res := latencyResult{N: len(samples), Errors: errs.n, Error: errs.text()}
	if len(samples) > 0 {
		var sum float64
		for _, us := range samples {
			sum += us
		}
		res.P50 = percentile(samples, 50)
		res.P99 = percentile(samples, 99)
		res.Mean = sum / float64(len(samples))
		res.Min = samples[0]
		res.Max = samples[len(samples)-1]
	}
	return res
}

// ----------------------------------------------------------------- cps

type cpsResult struct {
	CPS       float64 `json:"cps"`
	Completed int64   `json:"completed"`
	Errors    int     `json:"errors"`
	Seconds   float64 `json:"seconds"`
	Error     string  `json:"error,omitempty"`
}

func cpsMain(args []string) {
	fs := flag.NewFlagSet("cps", flag.ContinueOnError)
	addr := fs.String("addr", "", "host:port to connect to")
	host := fs.String("host", "", "send an HTTP request head naming this host first (and read its echo)")
	conns := fs.Int("conns", 8, "concurrent clients")
	seconds := fs.Float64("seconds", 3, "how long to run")
	timeout := fs.Duration("timeout", 10*time.Second, "give up on one connection after this long")
	parse(fs, args)
	if *addr == "" || *conns < 1 || *seconds <= 0 {
		usage("cps: need -addr, -conns >= 1 and -seconds > 0")
	}
	var errs firstError
	var done int64
	var wg sync.WaitGroup
	start := time.Now()
	stopAt := start.Add(time.Duration(*seconds * float64(time.Second)))
	for i := 0; i < *conns; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stopAt) {
				c, err := ping(*addr, *host, *timeout)
				if err != nil {
					errs.add(err)
					if errs.n > 1000 {
						return
					}
					continue
				}
				c.Close()
				atomic.AddInt64(&done, 1)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	emitJSON(cpsResult{
		CPS:       float64(done) / elapsed,
		Completed: done,
		Errors:    errs.n,
		Seconds:   elapsed,
		Error:     errs.text(),
	})
}

// --------------------------------------------------------------- churn

type churnResult struct {
	CPS       float64 `json:"cps"`
	Completed int64   `json:"completed"`
	Errors    int     `json:"errors"`
	Seconds   float64 `json:"seconds"`
	Rate      float64 `json:"rate"`
	Conns     int     `json:"conns"`
	RST       bool    `json:"rst"`
	Error     string  `json:"error,omitempty"`
}

// churnOnce connects, writes one byte and closes (abortively with rst).
func churnOnce(addr string, timeout time.Duration, rst bool) error {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte{'x'}); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if rst {
		if err := c.(*net.TCPConn).SetLinger(0); err != nil {
			return fmt.Errorf("linger: %w", err)
		}
	}
	return nil
}

func churnMain(args []string) {
	fs := flag.NewFlagSet("churn", flag.ContinueOnError)
	addr := fs.String("addr", "", "host:port to connect to")
	conns := fs.Int("conns", 32, "concurrent clients")
	rate := fs.Float64("rate", 0, "connections per second in all (0: as fast as they go)")
	seconds := fs.Float64("seconds", 3, "how long to run")
	rst := fs.Bool("rst", false, "close with a RST (SO_LINGER 0) instead of a FIN")
	timeout := fs.Duration("timeout", 2*time.Second, "give up on one connection after this long")
	parse(fs, args)
	if *addr == "" || *conns < 1 || *seconds <= 0 || *rate < 0 {
		usage("churn: need -addr, -conns >= 1, -seconds > 0 and -rate >= 0")
	}
	exitOnSignal()
	var errs firstError
	var done, slot int64
	var wg sync.WaitGroup
	start := time.Now()
	stopAt := start.Add(time.Duration(*seconds * float64(time.Second)))
	for i := 0; i < *conns; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				if *rate > 0 {
					// the next slot of the shared schedule
					k := atomic.AddInt64(&slot, 1) - 1
					at := start.Add(time.Duration(float64(k) / *rate * float64(time.Second)))
					if at.After(stopAt) {
						return
					}
					if wait := time.Until(at); wait > 0 {
						time.Sleep(wait)
					}
				} else if time.Now().After(stopAt) {
					return
				}
				if err := churnOnce(*addr, *timeout, *rst); err != nil {
					errs.add(err)
					continue
				}
				atomic.AddInt64(&done, 1)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	emitJSON(churnResult{
		CPS:       float64(done) / elapsed,
		Completed: done,
		Errors:    errs.n,
		Seconds:   elapsed,
		Rate:      *rate,
		Conns:     *conns,
		RST:       *rst,
		Error:     errs.text(),
	})
}

// ---------------------------------------------------------------- hold

type holdResult struct {
	Held    int     `json:"held"`
	Errors  int     `json:"errors"`
	Seconds float64 `json:"seconds"`
	Error   string  `json:"error,omitempty"`
}

func holdMain(args []string) {
	fs := flag.NewFlagSet("hold", flag.ContinueOnError)
	addr := fs.String("addr", "", "host:port to connect to")
	host := fs.String("host", "", "send an HTTP request head naming this host first (and read its echo)")
	n := fs.Int("n", 10000, "connections to open and hold")
	parallel := fs.Int("parallel", 32, "dials in flight at once")
	doPing := fs.Bool("ping", true, "echo one byte on each connection before holding it")
	timeout := fs.Duration("timeout", 120*time.Second, "give up opening after this long")
	cidr := fs.String("src", "", "bind each connection to the next address of this IPv4 network (e.g. 127.0.0.0/8)")
	parse(fs, args)
	if *addr == "" || *n < 1 || *parallel < 1 {
		usage("hold: need -addr, -n >= 1 and -parallel >= 1")
	}
	var err error
	if src, err = newSources(*cidr); err != nil {
		usage("hold: %v", err)
	}
	stop := stopChannel()
	start := time.Now()
	held, errs, stopped := openAll(*n, *parallel, *timeout, stop, "connections",
		func(left time.Duration) (net.Conn, error) {
			if *doPing {
				return ping(*addr, *host, left)
			}
			return dialHead(*addr, *host, left)
		})
	emitJSON(holdResult{
		Held:    len(held),
		Errors:  errs.n,
		Seconds: time.Since(start).Seconds(),
		Error:   errs.text(),
	})
	if !stopped {
		<-stop
	}
	for _, c := range held {
		c.Close()
	}
}
