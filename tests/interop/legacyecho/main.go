// Command legacyecho is a service that behaves exactly like the original
// muxado echo service (echoserver.go) behind the original relay:
//
//	legacyecho -relay host:port [-timeout 60s]
//
// It dials the relay's control port, opens the first plain stream, reads it
// to EOF (the public address), closes it, then echoes every accepted stream
// with the original's quirk: it reads into a fresh 256-byte buffer and writes
// back the WHOLE buffer, so every reply is NUL-padded to 256 bytes.
//
// stdout (one event per line):
//
//	ADDRESS <text the relay sent, e.g. localhost:8081>
//	SESSION_END code=<n> err=<text>     (then exit 0)
//	FAIL: <reason>                      (exit 1; exit 2 on -timeout)
//
// SIGTERM/SIGINT: exit 0 at once without a GOAWAY (like killing the original).
package main

import (
	"flag"
	"fmt"
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
	fmt.Fprintf(os.Stderr, "legacyecho: "+format+"\n", args...)
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

// handleStream is the original echo loop, quirk included.
func handleStream(stream muxado.Stream) {
	for {
		buf := make([]byte, 256)
		_, err := stream.Read(buf)
		if err != nil {
			diag("stream %d: %v", stream.Id(), err)
			stream.Close()
			return
		}
		stream.Write(buf)
	}
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
