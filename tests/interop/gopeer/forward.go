package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"
)

const (
	// maxHeaderLine bounds the header line so a confused test cannot make us buffer forever.
	maxHeaderLine = 4096
	// headerTimeout bounds how long an accepted connection may take to send its header line.
	headerTimeout = 10 * time.Second
	// dialTimeout bounds writing the Connect message (remotedialer returns the stream as soon as
	// the Connect is written; there is no acknowledgement in the protocol).
	dialTimeout = 30 * time.Second
)

// dialFunc opens a tunnel stream for one forward connection. fields are the header line's
// space-separated fields; the last field (the address) may itself contain spaces.
type dialFunc func(ctx context.Context, fields []string) (net.Conn, error)

// serveForward accepts TCP connections on ln until ctx is done. Each connection first sends one
// header line, whose nFields fields are handed to dial; the rest of the connection is then piped
// through the returned tunnel stream.
func serveForward(ctx context.Context, ln net.Listener, nFields int, dial dialFunc) {
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() == nil {
				logrus.WithError(err).Error("forward: accept failed")
			}
			return
		}
		go handleForward(ctx, c, nFields, dial)
	}
}

func handleForward(ctx context.Context, c net.Conn, nFields int, dial dialFunc) {
	// A bufio.Reader reads the header efficiently; whatever payload it buffered past the newline
	// is not lost, because the reader itself (not the raw conn) is the source of the pipe below.
	br := bufio.NewReaderSize(c, maxHeaderLine)
	_ = c.SetReadDeadline(time.Now().Add(headerTimeout))
	fields, err := readHeader(br, nFields)
	_ = c.SetReadDeadline(time.Time{})
	if err != nil {
		logrus.WithError(err).Error("forward: bad header line")
		c.Close()
		return
	}

	dctx, cancel := context.WithTimeout(ctx, dialTimeout)
	stream, err := dial(dctx, fields)
	cancel()
	if err != nil {
		// Contract: on a failed dial write nothing, just close, so the test sees an immediate EOF.
		logrus.WithError(err).WithField("header", strings.Join(fields, " ")).Error("forward: dial failed")
		c.Close()
		return
	}
	logrus.WithField("header", strings.Join(fields, " ")).Debug("forward: stream open")
	pipe(stream, c, br)
}

// readHeader reads one "\n"-terminated line (a trailing "\r" is tolerated) and splits it into
// exactly n space-separated fields, the last of which takes the rest of the line.
func readHeader(br *bufio.Reader, n int) ([]string, error) {
	line, err := br.ReadSlice('\n')
	if err != nil {
		if errors.Is(err, bufio.ErrBufferFull) {
			return nil, fmt.Errorf("header line longer than %d bytes", maxHeaderLine)
		}
		return nil, fmt.Errorf("reading header line: %w", err)
	}
	s := strings.TrimRight(string(line), "\r\n")
	fields := strings.SplitN(s, " ", n)
	if len(fields) != n {
		return nil, fmt.Errorf("header line %q: want %d space-separated fields", s, n)
	}
	for _, f := range fields {
		if f == "" {
			return nil, fmt.Errorf("header line %q: empty field", s)
		}
	}
	return fields, nil
}

// pipe copies bytes both ways between a tunnel stream and a local TCP connection, reading the
// local side through src (which may hold bytes already buffered from it).
//
// It mirrors remotedialer's own pipe: the protocol has no half-close, so when either direction
// ends, both sides are closed fully (Close on the stream sends Error "EOF" to the peer). We then
// wait for the other copy to stop so no goroutine outlives the connection.
func pipe(stream net.Conn, local net.Conn, src io.Reader) {
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			stream.Close()
			local.Close()
		})
	}

	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		_, err := io.Copy(stream, src)
		logCopyEnd("local->tunnel", err)
		closeBoth()
	}()
	_, err := io.Copy(local, stream)
	logCopyEnd("tunnel->local", err)
	closeBoth()
	wg.Wait()
}

func logCopyEnd(dir string, err error) {
	if err != nil {
		logrus.WithError(err).Debugf("forward: %s copy ended", dir)
	}
}
