// Command goagent is a stand-in for Rancher's cattle-cluster-agent, built on the real
// github.com/rancher/remotedialer module (pinned in go.mod), for testing that our tunnel-server
// accepts a Go agent the way Rancher does.
//
// It does what Rancher's agent does on the wire (shared/spec/cattle-agent.md §3-§5), in the same
// order, and nothing of the rest (no Kubernetes client, no embedded Rancher):
//
//  1. run.sh's pre-flight: GET $CATTLE_SERVER/ping (insecure, must be 2xx); with
//     CATTLE_CA_CHECKSUM, GET /v3/settings/cacerts (insecure), SHA-256 of `value` plus "\n" must
//     equal it, and the PEM is kept as `serverca`;
//  2. the binary's CA pre-flight: a GET of the server trusting only `serverca` (fatal only with
//     STRICT_VERIFY=true), then one with the system roots plus `serverca`, where only x509
//     errors are fatal;
//  3. the main tunnel: remotedialer.ClientConnect to wss://<host>/v3/connect/register (plain
//     /v3/connect once ./connected exists or with CATTLE_AGENT_CONNECT=true) with
//     X-API-Tunnel-Token and X-API-Tunnel-Params (standard base64 of json.Marshal of a
//     map[string]interface{}, so keys sorted), Rancher's allow-list, 5 s + 5 s retry;
//  4. on connect: touch ./connected, then (once per process, as the embedded Rancher does) the
//     steve aggregation tunnel to <server>/v3/connect with only
//     "Authorization: Bearer stv-cluster-<token>", allowing every Connect and handing every
//     stream to an in-process HTTP/1.1 server that answers GET /ping with 200 "pong".
//
// Configuration is Rancher's environment plus flags for what Rancher finds in the pod (see
// ../README.md). stdout carries one JSON object per line (announcements); stderr the logs.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
)

// config is everything the agent reads, from the environment and flags.
type config struct {
	server        string // CATTLE_SERVER, or <credentials-dir>/url
	token         string // CATTLE_TOKEN, or <credentials-dir>/token
	caChecksum    string // CATTLE_CA_CHECKSUM
	strictVerify  bool   // STRICT_VERIFY
	alwaysConnect bool   // CATTLE_AGENT_CONNECT
	apiAddress    string // KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT, or --api-address
	saTokenFile   string
	saCAFile      string
	stateDir      string // where ./connected and serverca go
	steveOnly     bool
	retry         time.Duration
}

func main() {
	fs := flag.NewFlagSet("goagent", flag.ExitOnError)
	credDir := fs.String("credentials-dir", "",
		"read url and token from these files (the mounted cattle-credentials Secret, like Rancher 2.12+); they win over CATTLE_SERVER/CATTLE_TOKEN")
	apiAddress := fs.String("api-address", "",
		"host:port of the apiserver this agent fronts (default: KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT)")
	saTokenFile := fs.String("sa-token-file", "/var/run/secrets/kubernetes.io/serviceaccount/token",
		"service-account token sent as the cluster param token (whitespace-trimmed)")
	saCAFile := fs.String("sa-ca-file", "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
		"apiserver CA PEM sent, base64-encoded, as the cluster param caCert")
	stateDir := fs.String("state-dir", ".", "working directory: the connected marker and serverca")
	steveOnly := fs.Bool("steve-only", false,
		"run only the steve aggregation tunnel (what the embedded Rancher does with a given stv-aggregation Secret)")
	retry := fs.Duration("retry", 5*time.Second,
		"sleep of the connect loop after each ClientConnect (which sleeps 5 s itself on errors); Rancher: 5s")
	debug := fs.Bool("debug", false, "log at debug level")
	if err := fs.Parse(os.Args[1:]); err != nil {
		os.Exit(2)
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "goagent: unexpected argument %q\n", fs.Arg(0))
		os.Exit(2)
	}
	logrus.SetOutput(os.Stderr)
	logrus.SetFormatter(&logrus.TextFormatter{FullTimestamp: true, TimestampFormat: time.RFC3339Nano, DisableColors: true})
	if *debug {
		logrus.SetLevel(logrus.DebugLevel)
	}

	cfg := config{
		server:        os.Getenv("CATTLE_SERVER"),
		token:         os.Getenv("CATTLE_TOKEN"),
		caChecksum:    os.Getenv("CATTLE_CA_CHECKSUM"),
		strictVerify:  strings.ToLower(os.Getenv("STRICT_VERIFY")) == "true",
		alwaysConnect: os.Getenv("CATTLE_AGENT_CONNECT") == "true",
		apiAddress:    *apiAddress,
		saTokenFile:   *saTokenFile,
		saCAFile:      *saCAFile,
		stateDir:      *stateDir,
		steveOnly:     *steveOnly,
		retry:         *retry,
	}
	if *credDir != "" {
		// Read verbatim, no trimming (spec §3.2 step 3).
		url, err := os.ReadFile(filepath.Join(*credDir, "url"))
		fatalIf(err, "reading the credentials url")
		token, err := os.ReadFile(filepath.Join(*credDir, "token"))
		fatalIf(err, "reading the credentials token")
		cfg.server, cfg.token = string(url), string(token)
	}
	if cfg.apiAddress == "" && !cfg.steveOnly {
		host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
		if host == "" || port == "" {
			logrus.Fatal("KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT (or --api-address) are required")
		}
		cfg.apiAddress = net.JoinHostPort(host, port)
	}
	if cfg.server == "" {
		logrus.Fatal("CATTLE_SERVER (or --credentials-dir) is required")
	}
	if cfg.token == "" {
		logrus.Fatal("CATTLE_TOKEN (or --credentials-dir) is required")
	}

	// Rancher's connect loop ignores signals (spec §8); this stand-in just exits, tests kill it.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	pf, err := preflight(ctx, cfg)
	if err != nil {
		logrus.Error(err)
		os.Exit(1)
	}
	announce(map[string]interface{}{"preflight": map[string]interface{}{
		"server": pf.root, "cacertsValid": pf.cacertsValid, "pinned": pf.serverCA != nil,
	}})

	if cfg.steveOnly {
		go runSteve(ctx, pf, cfg.token)
	} else {
		params, err := clusterParams(cfg)
		fatalIf(err, "cluster params")
		go runMain(ctx, cfg, pf, params)
	}
	<-ctx.Done()
}

func fatalIf(err error, what string) {
	if err != nil {
		logrus.WithError(err).Fatal(what)
	}
}

// announce writes one JSON line to stdout (unbuffered).
func announce(v interface{}) {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	os.Stdout.Write(append(b, '\n'))
}
