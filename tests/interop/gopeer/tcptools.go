package main

import (
	"context"
	"flag"
	"io"
	"net"

	"github.com/sirupsen/logrus"
)

// runTCPTool runs a plain TCP target for tunnel streams to dial, for benchmarks and tests that
// need no Rust code at the far end:
//
//	echo:   writes back everything it reads;
//	sink:   reads and discards everything;
//	source: writes --bytes zero bytes, then closes.
func runTCPTool(ctx context.Context, mode string, args []string) error {
	fs := flag.NewFlagSet(mode, flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:0", "address to listen on")
	var nbytes int64
	if mode == "source" {
		fs.Int64Var(&nbytes, "bytes", 100<<20, "bytes to send on each connection")
	}
	if err := parseFlags(fs, args); err != nil {
		return err
	}

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	announce(struct {
		Addr string `json:"addr"`
	}{ln.Addr().String()})

	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		go func() {
			defer c.Close()
			var err error
			switch mode {
			case "echo":
				_, err = io.Copy(c, c)
			case "sink":
				_, err = io.Copy(io.Discard, c)
			case "source":
				_, err = io.CopyN(c, zeroReader{}, nbytes)
			}
			if err != nil {
				logrus.WithError(err).Debugf("%s: connection ended", mode)
			}
		}()
	}
}

// zeroReader is an endless stream of zero bytes.
type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}
