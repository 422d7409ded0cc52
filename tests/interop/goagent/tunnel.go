package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/gorilla/websocket"
	"github.com/rancher/remotedialer"
	"github.com/sirupsen/logrus"
)

// allow is Rancher's agent allow-list (spec §5): tcp to any address, unix only the Docker
// socket, npipe only the Docker pipe. A refusal ends the whole session (remotedialer).
func allow(proto, address string) bool {
	switch proto {
	case "tcp":
		return true
	case "unix":
		return address == "/var/run/docker.sock"
	case "npipe":
		return address == "//./pipe/docker_engine"
	}
	logrus.WithFields(logrus.Fields{"proto": proto, "address": address}).Warn("goagent: refusing connect")
	return false
}

// runMain is the agent's connect loop (spec §4.1): ClientConnect (which logs a failure and
// sleeps 5 s), then the loop's own sleep, forever.
func runMain(ctx context.Context, cfg config, info *serverInfo, params map[string]interface{}) {
	b, err := json.Marshal(params)
	fatalIf(err, "marshalling params")
	headers := http.Header{
		"X-API-Tunnel-Token":  {cfg.token},
		"X-API-Tunnel-Params": {base64.StdEncoding.EncodeToString(b)},
	}
	// For the tests: the params header exactly as sent (it carries the SA token). The keys are
	// written as Rancher writes them, not canonicalised, so Header.Get would not find them.
	announce(map[string]string{"params": headers["X-API-Tunnel-Params"][0]})
	dialer := &websocket.Dialer{
		Proxy:            http.ProxyFromEnvironment,
		HandshakeTimeout: remotedialer.HandshakeTimeOut,
		TLSClientConfig:  info.tls,
	}
	connected := filepath.Join(cfg.stateDir, "connected")
	var steve sync.Once
	for {
		wsURL := fmt.Sprintf("wss://%s/v3/connect", info.host)
		if _, err := os.Stat(connected); !cfg.alwaysConnect && err != nil {
			wsURL += "/register"
		}
		logrus.Infof("Connecting to %s with token starting with %s", wsURL, cfg.token[:len(cfg.token)/2])
		onConnect := func(_ context.Context, _ *remotedialer.Session) error {
			if f, err := os.Create(connected); err == nil {
				f.Close()
			} else {
				logrus.WithError(err).Warn("cannot write the connected marker")
			}
			announce(map[string]string{"connected": "main", "url": wsURL})
			// The embedded Rancher starts once per process and opens the steve tunnel.
			steve.Do(func() { go runSteve(ctx, info, cfg.token) })
			return nil
		}
		err := remotedialer.ClientConnect(ctx, wsURL, headers, dialer, allow, onConnect)
		if ctx.Err() != nil {
			return
		}
		announce(map[string]string{"disconnected": "main", "error": fmt.Sprint(err)})
		select {
		case <-ctx.Done():
			return
		case <-time.After(cfg.retry):
		}
	}
}

// runSteve keeps the steve aggregation tunnel up (spec §4.5): the stv-aggregation Secret's url
// (server + /v3/connect) as wss, only "Authorization: Bearer stv-cluster-<token>", every Connect
// allowed and served in process, a retry every 5 s.
func runSteve(ctx context.Context, info *serverInfo, token string) {
	url := info.root + "/v3/connect"
	url = strings.Replace(url, "https://", "wss://", 1)
	url = strings.Replace(url, "http://", "ws://", 1)
	headers := http.Header{}
	headers.Set("Authorization", "Bearer stv-cluster-"+token)
	dialer := &websocket.Dialer{
		Proxy:            http.ProxyFromEnvironment,
		HandshakeTimeout: remotedialer.HandshakeTimeOut,
		TLSClientConfig:  info.tls,
	}
	for {
		err := serveSteve(ctx, url, headers, dialer)
		if ctx.Err() != nil {
			return
		}
		logrus.WithError(err).Error("Failed to dial steve aggregation server")
		announce(map[string]string{"disconnected": "steve", "error": fmt.Sprint(err)})
		select {
		case <-ctx.Done():
			return
		case <-time.After(5 * time.Second):
		}
	}
}

// serveSteve runs one aggregation session: no socket is dialed; each stream the server opens,
// whatever its address, becomes a connection of the in-process HTTP server.
func serveSteve(ctx context.Context, url string, headers http.Header, dialer *websocket.Dialer) error {
	ln := newPipeListener()
	srv := &http.Server{Handler: steveHandler(), ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	defer srv.Close()
	onConnect := func(context.Context, *remotedialer.Session) error {
		announce(map[string]string{"connected": "steve", "url": url})
		return nil
	}
	allowAll := func(string, string) bool { return true }
	return remotedialer.ConnectToProxyWithDialer(ctx, url, headers, allowAll, dialer, ln.dial, onConnect)
}

// steveHandler stands in for steve: GET /ping is 200 "pong" (what the server's Connected probe
// needs), /healthz "ok", the rest 404.
func steveHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /ping", func(w http.ResponseWriter, r *http.Request) {
		logrus.WithFields(logrus.Fields{"host": r.Host, "user": r.Header.Get("Impersonate-User")}).Debug("steve: GET /ping")
		w.Write([]byte("pong"))
	})
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte("ok"))
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "goagent serves only /ping and /healthz of steve", http.StatusNotFound)
	})
	return mux
}

// pipeListener is a net.Listener fed by dial: each dial is one end of a net.Pipe, the other
// end is accepted by the HTTP server.
type pipeListener struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

func (l *pipeListener) dial(ctx context.Context, _, _ string) (net.Conn, error) {
	client, server := net.Pipe()
	select {
	case l.conns <- server:
		return client, nil
	case <-l.done:
	case <-ctx.Done():
	}
	client.Close()
	server.Close()
	return nil, net.ErrClosed
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return pipeAddr{} }

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "steve" }
