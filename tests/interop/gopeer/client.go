package main

import (
	"context"
	"errors"
	"flag"
	"net"
	"net/http"
	"sync/atomic"

	"github.com/gorilla/websocket"
	"github.com/rancher/remotedialer"
	"github.com/sirupsen/logrus"
)

// runClient runs a remotedialer client session (an agent) that reconnects every second, plus a
// forward listener whose connections become client-initiated streams (spec §4.5).
func runClient(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	url := fs.String("url", "", "websocket URL of the server, e.g. ws://127.0.0.1:PORT/connect")
	id := fs.String("id", "", "client key, sent as the X-Tunnel-ID header")
	fwdListen := fs.String("forward-listen", "127.0.0.1:0", "address of the forward TCP listener")
	dockerSocket := fs.String("docker-socket", "", "the one unix socket path the server may dial")
	var lf logFlags
	lf.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	lf.apply()
	if *url == "" || *id == "" {
		return errors.New("client: --url and --id are required")
	}

	// Like the Rancher agent's authorizer: any tcp, unix only for the Docker socket, nothing
	// else. Remember that a refusal tears down the whole session (spec §2.6): tests rely on it.
	authorize := func(proto, address string) bool {
		switch {
		case proto == "tcp":
			return true
		case proto == "unix" && *dockerSocket != "" && address == *dockerSocket:
			return true
		}
		logrus.WithFields(logrus.Fields{"proto": proto, "address": address}).Warn("client: refusing connect")
		return false
	}

	// The session that is up right now, for client-initiated dials; nil between sessions.
	var current atomic.Pointer[remotedialer.Session]
	onConnect := func(ctx context.Context, s *remotedialer.Session) error {
		current.Store(s)
		announce(struct {
			Connected bool `json:"connected"`
		}{true})
		// ctx ends when this session ends; forget it then (unless a newer one replaced it).
		<-ctx.Done()
		current.CompareAndSwap(s, nil)
		return nil
	}

	fwdLn, err := net.Listen("tcp", *fwdListen)
	if err != nil {
		return err
	}
	// Header "PROTO ADDRESS": a client-initiated stream through the current session. The Go
	// server dials the target itself (with net.Dialer) if its ClientConnectAuthorizer allows.
	go serveForward(ctx, fwdLn, 2, func(ctx context.Context, f []string) (net.Conn, error) {
		s := current.Load()
		if s == nil {
			return nil, errors.New("no session is connected")
		}
		return s.Dial(ctx, f[0], f[1])
	})
	announce(struct {
		Forward string `json:"forward"`
	}{fwdLn.Addr().String()})

	// Same websocket settings as remotedialer's default dialer (10 s handshake, 4096-byte write
	// buffer, hence 4096-byte frames), minus the environment proxy: traffic must stay on loopback.
	wsDialer := &websocket.Dialer{HandshakeTimeout: remotedialer.HandshakeTimeOut}
	headers := http.Header{tunnelIDHeader: []string{*id}}
	// ClientConnectWithOpts loops until ctx is cancelled. A fixed 1 s retry (it adds +-10 %
	// jitter) instead of the 5 s default keeps reconnect tests short.
	opts := &remotedialer.ConnectOpts{Backoff: remotedialer.Backoff{Min: remotedialer.DefaultRetryMin / 5}}
	err = remotedialer.ClientConnectWithOpts(ctx, *url, headers, wsDialer, authorize, onConnect, opts)
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}
