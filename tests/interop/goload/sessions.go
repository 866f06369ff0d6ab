// goload sessions holds or churns many muxado v1 agent sessions against a
// relay's control port, for “python -m benchmarks.capacity”:
//
//	goload sessions hold  -relay H:P [-n 10000] [-parallel 64] [-src 127.0.0.0/8]
//	                        [-http PREFIX] [-hold 60s] [-timeout 120s]
//	goload sessions churn -relay H:P [-conns 8] [-seconds 10] [-life-min 200ms]
//	                        [-life-max 2s] [-src 127.0.0.0/8] [-http PREFIX] [-timeout 10s]
//
// Every session is what echosvc is: dial the control port, run muxado's
// heartbeat extension (the same as muxado v1's own: a heartbeat every 3 s,
// the session closed after 3 s + 10 s without an echo, and the relay's
// heartbeats echoed), open the first plain stream, read the relay's address
// to EOF; then each stream the relay opens is echoed (io.Copy). The only
// difference from muxado's own heartbeat is that this one records the round
// trip of every heartbeat and counts its timeouts.
//
// -src CIDR: each session's socket is bound to the next address of that
// network before it connects (the network and broadcast addresses and
// 127.0.0.1 skipped), so that many sessions do not run out of ephemeral
// ports or hit a relay's per-address limit. Empty: the kernel chooses.
//
// hold: opens -n sessions (-parallel at a time, giving up after -timeout)
// and prints {"opened","errors","seconds","error"}; then holds them for
// -hold (or until stdin reaches EOF or SIGTERM/SIGINT arrives) and prints
// {"held","lost","hb_timeouts","heartbeats","rtt_p50_ms","rtt_p99_ms",
// "rtt_max_ms","open_rtt_p50_ms","open_rtt_p99_ms","seconds"}: the rtt
// figures are the heartbeats' round trips while held, the open_ ones those
// while the sessions were being opened; lost counts sessions that ended while
// held (for any reason, the relay's heartbeat timeout included),
// hb_timeouts the relay's heartbeats left unanswered for 13 s by this
// side's view, heartbeats the echoes received. Then closes them all and
// exits 0.
//
// churn: -conns goroutines each loop for -seconds: open a session (as above),
// keep it for a random time between -life-min and -life-max, close it.
// Prints {"sessions","errors","seconds","error"}.
//
// -http PREFIX: instead of the legacy handshake, each session speaks
// tcprelay's extended dialect and claims the named HTTP route PREFIX<n>
// (n counting from 1), so that it needs no public port (and no descriptor
// for a listening socket in the relay). The control stream stays open.
//
// Exit status: 0 when the JSON line(s) were printed, 2 on bad usage.
package main

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"math/rand"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/inconshreveable/muxado/proto"
	"github.com/inconshreveable/muxado/proto/frame"
)

const (
	hbInterval  = 3 * time.Second
	hbTolerance = 10 * time.Second
	hbType      = frame.StreamType(proto.MinExtensionType) // muxado's heartbeat
	controlType = frame.StreamType(0x54435243)             // tcprelay's TCRC
)

// ----------------------------------------------------------- heartbeat

// stats are shared by every session of the process.
type stats struct {
	heartbeats int64
	timeouts   int64
	mu         sync.Mutex
	rtts       []float64 // milliseconds, capped at maxSamples
}

const maxSamples = 1 << 20

func (st *stats) rtt(d time.Duration) {
	atomic.AddInt64(&st.heartbeats, 1)
	st.mu.Lock()
	if len(st.rtts) < maxSamples {
		st.rtts = append(st.rtts, float64(d.Microseconds())/1000)
	}
	st.mu.Unlock()
}

// heartbeat is muxado's ext.Heartbeat with the round trips recorded.
type heartbeat struct {
	st     *stats
	sess   proto.ISession
	accept proto.ExtAccept
	mark   chan struct{}
	done   chan struct{}
}

func (h *heartbeat) Start(sess proto.ISession, accept proto.ExtAccept) frame.StreamType {
	h.sess = sess
	h.accept = accept
	go h.respond()
	go h.request()
	go h.check()
	return hbType
}

func (h *heartbeat) check() {
	t := time.NewTimer(hbInterval + hbTolerance)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			atomic.AddInt64(&h.st.timeouts, 1)
			h.sess.Close()
			return
		case <-h.mark:
			t.Reset(hbInterval + hbTolerance)
		case <-h.done:
			return
		}
	}
}

func (h *heartbeat) respond() {
	defer h.sess.Close()
	stream, err := h.accept()
	if err != nil {
		return
	}
	buf := make([]byte, 4)
	for {
		if _, err := io.ReadFull(stream, buf); err != nil {
			return
		}
		if _, err := stream.Write(buf); err != nil {
			return
		}
	}
}

func (h *heartbeat) request() {
	defer h.sess.Close()
	stream, err := h.sess.OpenStream(frame.StreamPriority(0x7FFFFFFF), hbType, false)
	if err != nil {
		return
	}
	var id uint32
	buf := make([]byte, 4)
	// the first heartbeat at a random point of the interval, so that
	// sessions opened together do not heartbeat together
	first := time.Duration(rand.Int63n(int64(hbInterval)))
	for {
		select {
		case <-time.After(first):
		case <-h.done:
			return
		}
		first = hbInterval
		id++
		binary.BigEndian.PutUint32(buf, id)
		sent := time.Now()
		if _, err := stream.Write(buf); err != nil {
			return
		}
		if _, err := io.ReadFull(stream, buf); err != nil {
			return
		}
		if binary.BigEndian.Uint32(buf) != id {
			return
		}
		h.st.rtt(time.Since(sent))
		select {
		case h.mark <- struct{}{}:
		case <-h.done:
			return
		}
	}
}

// ------------------------------------------------------------ sessions

type session struct {
	sess proto.ISession
	dead chan struct{}
	hb   *heartbeat
}

func (s *session) close() {
	s.sess.Close()
	<-s.dead
}

// register claims the HTTP name in tcprelay's extended dialect
// (docs/protocol.rst): a control stream of type TCRC that stays open,
// length-prefixed JSON messages, hello from the relay, register from us,
// then ready (or refused).
func register(sess proto.ISession, name string) error {
	stream, err := sess.OpenStream(0, controlType, false)
	if err != nil {
		return fmt.Errorf("open control stream: %w", err)
	}
	read := func() (map[string]interface{}, error) {
		var head [2]byte
		if _, err := io.ReadFull(stream, head[:]); err != nil {
			return nil, err
		}
		body := make([]byte, binary.BigEndian.Uint16(head[:]))
		if _, err := io.ReadFull(stream, body); err != nil {
			return nil, err
		}
		var m map[string]interface{}
		if err := json.Unmarshal(body, &m); err != nil {
			return nil, err
		}
		return m, nil
	}
	if _, err := read(); err != nil { // hello
		return fmt.Errorf("read hello: %w", err)
	}
	body, _ := json.Marshal(map[string]interface{}{
		"type": "register", "v": 1, "route": "http", "name": name,
	})
	msg := append([]byte{byte(len(body) >> 8), byte(len(body))}, body...)
	if _, err := stream.Write(msg); err != nil {
		return fmt.Errorf("write register: %w", err)
	}
	for {
		m, err := read()
		if err != nil {
			return fmt.Errorf("read answer: %w", err)
		}
		switch m["type"] {
		case "ready":
			return nil
		case "refused":
			return fmt.Errorf("refused: %v", m["reason"])
		}
	}
}

func open(relay string, src *sources, st *stats, timeout time.Duration, name string) (*session, error) {
	conn, err := src.dialer(timeout).Dial("tcp", relay)
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	hb := &heartbeat{st: st, mark: make(chan struct{}), done: make(chan struct{})}
	sess := proto.NewSession(conn, proto.NewStream, true, []proto.Extension{hb})
	s := &session{sess: sess, dead: make(chan struct{}), hb: hb}
	go func() {
		sess.Wait()
		close(hb.done)
		close(s.dead)
	}()
	conn.SetDeadline(time.Now().Add(timeout))
	if name == "" {
		stream, err := sess.Open()
		if err != nil {
			s.close()
			return nil, fmt.Errorf("open handshake stream: %w", err)
		}
		if _, err := ioutil.ReadAll(stream); err != nil {
			s.close()
			return nil, fmt.Errorf("read handshake stream: %w", err)
		}
		stream.Close()
	} else if err := register(sess, name); err != nil {
		s.close()
		return nil, err
	}
	conn.SetDeadline(time.Time{})
	go func() {
		for {
			st, err := sess.Accept()
			if err != nil {
				return
			}
			go func() {
				io.Copy(st, st)
				st.Close()
			}()
		}
	}()
	return s, nil
}

// ---------------------------------------------------------------- hold

func sessionsHoldMain(args []string) {
	fs := flag.NewFlagSet("sessions hold", flag.ContinueOnError)
	relay := fs.String("relay", "", "relay control address host:port")
	n := fs.Int("n", 10000, "sessions to open and hold")
	parallel := fs.Int("parallel", 64, "sessions being opened at once")
	cidr := fs.String("src", "", "bind each socket to the next address of this IPv4 network")
	http := fs.String("http", "", "extended dialect: claim the HTTP name PREFIX<n> instead of a port")
	var seq int64
	hold := fs.Duration("hold", 60*time.Second, "how long to hold them once open")
	timeout := fs.Duration("timeout", 120*time.Second, "give up opening after this long")
	parse(fs, args)
	if *relay == "" || *n < 1 || *parallel < 1 {
		usage("sessions hold: need -relay, -n >= 1 and -parallel >= 1")
	}
	src, err := newSources(*cidr)
	if err != nil {
		usage("%v", err)
	}
	stop := stopChannel()
	st := &stats{}
	start := time.Now()
	held, errs, stopped := openAll(*n, *parallel, *timeout, stop, "sessions",
		func(left time.Duration) (*session, error) {
			if left > 30*time.Second {
				left = 30 * time.Second
			}
			name := ""
			if *http != "" {
				name = fmt.Sprintf("%s%d", *http, atomic.AddInt64(&seq, 1))
			}
			return open(*relay, src, st, left, name)
		})
	emitJSON(map[string]interface{}{
		"opened": len(held), "errors": errs.n,
		"seconds": time.Since(start).Seconds(), "error": errs.text(),
	})
	// the round trips while the sessions were being opened, apart
	st.mu.Lock()
	opening := append([]float64(nil), st.rtts...)
	st.rtts = st.rtts[:0]
	st.mu.Unlock()
	sort.Float64s(opening)
	// a session lost while opening the others counts as lost too
	heldAt := time.Now()
	if !stopped {
		select {
		case <-time.After(*hold):
		case <-stop:
		}
	}
	lost := 0
	for _, s := range held {
		select {
		case <-s.dead:
			lost++
		default:
		}
	}
	st.mu.Lock()
	rtts := append([]float64(nil), st.rtts...)
	st.mu.Unlock()
	sort.Float64s(rtts)
	max := 0.0
	if len(rtts) > 0 {
		max = rtts[len(rtts)-1]
	}
	emitJSON(map[string]interface{}{
		"held": len(held), "lost": lost,
		"hb_timeouts": atomic.LoadInt64(&st.timeouts),
		"heartbeats":  atomic.LoadInt64(&st.heartbeats),
		"rtt_p50_ms":  percentile(rtts, 50), "rtt_p99_ms": percentile(rtts, 99),
		"rtt_max_ms": max, "seconds": time.Since(heldAt).Seconds(),
		"open_rtt_p50_ms": percentile(opening, 50), "open_rtt_p99_ms": percentile(opening, 99),
	})
	for _, s := range held {
		s.sess.Close()
	}
}

// --------------------------------------------------------------- churn

func sessionsChurnMain(args []string) {
	fs := flag.NewFlagSet("sessions churn", flag.ContinueOnError)
	relay := fs.String("relay", "", "relay control address host:port")
	conns := fs.Int("conns", 8, "sessions coming and going at once")
	seconds := fs.Float64("seconds", 10, "how long to churn")
	lifeMin := fs.Duration("life-min", 200*time.Millisecond, "shortest session life")
	lifeMax := fs.Duration("life-max", 2*time.Second, "longest session life")
	cidr := fs.String("src", "", "bind each socket to the next address of this IPv4 network")
	http := fs.String("http", "", "extended dialect: claim the HTTP name PREFIX<n> instead of a port")
	var seq int64
	timeout := fs.Duration("timeout", 10*time.Second, "limit on opening one session")
	parse(fs, args)
	if *relay == "" || *conns < 1 || *seconds <= 0 || *lifeMax < *lifeMin {
		usage("sessions churn: need -relay, -conns >= 1, -seconds > 0, -life-max >= -life-min")
	}
	src, err := newSources(*cidr)
	if err != nil {
		usage("%v", err)
	}
	stop := stopChannel()
	st := &stats{}
	var errs firstError
	var done int64
	start := time.Now()
	end := start.Add(time.Duration(*seconds * float64(time.Second)))
	var wg sync.WaitGroup
	for w := 0; w < *conns; w++ {
		wg.Add(1)
		go func(seed int64) {
			defer wg.Done()
			r := rand.New(rand.NewSource(seed))
			for time.Now().Before(end) {
				select {
				case <-stop:
					return
				default:
				}
				name := ""
				if *http != "" {
					name = fmt.Sprintf("%s%d", *http, atomic.AddInt64(&seq, 1))
				}
				s, err := open(*relay, src, st, *timeout, name)
				if err != nil {
					errs.add(err)
					time.Sleep(100 * time.Millisecond)
					continue
				}
				life := *lifeMin
				if *lifeMax > *lifeMin {
					life += time.Duration(r.Int63n(int64(*lifeMax - *lifeMin)))
				}
				select {
				case <-time.After(life):
				case <-s.dead:
					errs.add(errors.New("session ended before its time"))
				case <-stop:
				}
				s.close()
				atomic.AddInt64(&done, 1)
			}
		}(int64(w) + time.Now().UnixNano())
	}
	wg.Wait()
	emitJSON(map[string]interface{}{
		"sessions": atomic.LoadInt64(&done), "errors": errs.n,
		"seconds": time.Since(start).Seconds(), "error": errs.text(),
	})
}

// sessionsMain: goload sessions hold|churn [flags].
func sessionsMain(args []string) {
	if len(args) < 1 {
		usage("usage: goload sessions hold|churn [flags]")
	}
	switch args[0] {
	case "hold":
		sessionsHoldMain(args[1:])
	case "churn":
		sessionsChurnMain(args[1:])
	default:
		usage("unknown sessions command %q (hold, churn)", args[0])
	}
}
