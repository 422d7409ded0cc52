package main

import (
	"context"
	"errors"
	"flag"
	"net"
	"net/http"
	"time"

	"github.com/rancher/remotedialer"
	"github.com/sirupsen/logrus"
)

// tunnelIDHeader carries the client key, as in remotedialer's example client and server.
const tunnelIDHeader = "X-Tunnel-ID"

// runServer runs a remotedialer.Server at /connect plus a forward listener whose connections
// become server-initiated streams ("the normal direction", spec §4.1).
func runServer(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("server", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:0", "address of the websocket (http) listener")
	fwdListen := fs.String("forward-listen", "127.0.0.1:0", "address of the forward TCP listener")
	// TLS, for comparing memory per tunnel with tunnel-server's wss (server-side/benches/scale.rs).
	tlsCert := fs.String("tls-cert", "", "serve wss with this certificate chain (PEM; with -tls-key)")
	tlsKey := fs.String("tls-key", "", "key of -tls-cert (PEM)")
	var lf logFlags
	lf.register(fs)
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	lf.apply()

	// The client key is the X-Tunnel-ID header. Returning authed=false (not an error) for a
	// missing key keeps remotedialer's default answer: 401 "failed authentication".
	auth := func(req *http.Request) (string, bool, error) {
		id := req.Header.Get(tunnelIDHeader)
		return id, id != "", nil
	}
	srv := remotedialer.New(auth, remotedialer.DefaultErrorWriter)
	// Client-initiated streams (spec §4.5) are refused by a nil authorizer, and a refusal kills
	// the whole session; allow tcp so the client's forward listener works.
	srv.ClientConnectAuthorizer = func(proto, address string) bool {
		ok := proto == "tcp"
		if !ok {
			logrus.WithFields(logrus.Fields{"proto": proto, "address": address}).
				Warn("server: refusing client-initiated connect")
		}
		return ok
	}

	wsLn, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	fwdLn, err := net.Listen("tcp", *fwdListen)
	if err != nil {
		return err
	}

	mux := http.NewServeMux()
	mux.Handle("/connect", srv)
	httpSrv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		httpSrv.Close()
	}()

	// Header "KEY PROTO ADDRESS": dial the named client's session.
	go serveForward(ctx, fwdLn, 3, func(ctx context.Context, f []string) (net.Conn, error) {
		return srv.Dialer(f[0])(ctx, f[1], f[2])
	})

	scheme := "ws://"
	if *tlsCert != "" {
		scheme = "wss://"
	}
	announce(struct {
		WS      string `json:"ws"`
		Forward string `json:"forward"`
	}{scheme + wsLn.Addr().String() + "/connect", fwdLn.Addr().String()})

	if *tlsCert != "" {
		err = httpSrv.ServeTLS(wsLn, *tlsCert, *tlsKey)
	} else {
		err = httpSrv.Serve(wsLn)
	}
	if err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
