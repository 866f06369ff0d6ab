// Command echosvc is an efficient Go echo service behind a relay:
//
//	echosvc -relay host:port [-timeout 60s]
//
// Same handshake as the original echo service (dial the relay's control
// port, open the first plain stream, read it to EOF, print the address,
// close it). Each accepted stream is echoed exactly: io.Copy(stream, stream),
// and once the visitor's FIN has been read and everything echoed, Close()
// (FIN). Half-close is therefore preserved.
//
// stdout (one event per line):
//
//	ADDRESS <text the relay sent, e.g. localhost:8081>
//	SESSION_END code=<n> err=<text>     (then exit 0)
//	FAIL: <reason>                      (exit 1; exit 2 on -timeout)
//
// SIGTERM/SIGINT: exit 0 at once without a GOAWAY.
package main

import (
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"os"
	"os/signal"
	"strings"
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
	fmt.Fprintf(os.Stderr, "echosvc: "+format+"\n", args...)
}

func fail(status int, format string, args ...interface{}) {
	outMu.Lock()
	fmt.Fprintf(os.Stdout, "FAIL: "+format+"\n", args...)
	os.Exit(status)
}

func oneLine(s string) string {
	return strings.NewReplacer("\r", `\r`, "\n", `\n`).Replace(s)
}

func errText(err error) string {
	if err == nil {
		return "<nil>"
	}
	return oneLine(err.Error())
}

func handleStream(stream muxado.Stream) {
	n, err := io.Copy(stream, stream)
	if err != nil {
		// reset by the peer or session gone: the stream is already dead,
		// a FIN now would only be noise
		diag("stream %d: %d bytes, then %v", stream.Id(), n, err)
		return
	}
	diag("stream %d: %d bytes, EOF", stream.Id(), n)
	stream.Close()
}

func main() {
	relay := flag.String("relay", "", "relay control address host:port (required)")
	timeout := flag.Duration("timeout", 60*time.Second, "give up (FAIL, exit 2) after this long; 0 disables")
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

	if *relay == "" {
		fail(2, "usage: -relay is required")
	}

	sess, err := muxado.Dial("tcp", *relay)
	if err != nil {
		fail(1, "dial %s: %v", *relay, err)
	}
	dead := make(chan struct{})
	var code muxado.ErrorCode
	var werr error
	go func() {
		code, werr, _ = sess.Wait()
		close(dead)
	}()

	stream, err := sess.Open()
	if err != nil {
		fail(1, "open handshake stream: %v", err)
	}
	addr, err := ioutil.ReadAll(stream)
	if err != nil {
		fail(1, "read handshake stream: %v", err)
	}
	stream.Close()
	emit("ADDRESS %s", oneLine(string(addr)))

	for {
		stream, err := sess.Accept()
		if err != nil {
			diag("accept: %v", err)
			break
		}
		go handleStream(stream)
	}
	<-dead
	emit("SESSION_END code=%d err=%s", code, errText(werr))
	os.Exit(0)
}
