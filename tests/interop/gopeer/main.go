// Command gopeer is the Go interop peer for the Rust tunnel tests and benchmarks.
//
// It wraps the real github.com/rancher/remotedialer module (pinned in go.mod) so that the Rust
// implementation can be exercised against the reference implementation of the protocol, not
// against our reading of it. It deliberately adds no protocol logic of its own: every byte on the
// websocket is produced and checked by remotedialer.
//
// Subcommands (see ../README.md for the full contract):
//
//	gopeer server --listen ADDR --forward-listen ADDR [--debug]
//	gopeer client --url WSURL --id KEY --forward-listen ADDR [--docker-socket PATH] [--debug]
//	gopeer echo   --listen ADDR
//	gopeer sink   --listen ADDR
//	gopeer source --listen ADDR --bytes N
//
// Machine-readable announcements (addresses, "connected") go to stdout as one JSON object per
// line; all logging goes to stderr so tests can grep it.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/rancher/remotedialer"
	"github.com/sirupsen/logrus"
)

func usage() {
	fmt.Fprintln(os.Stderr, "usage: gopeer server|client|echo|sink|source [flags]  (gopeer CMD -h for flags)")
	os.Exit(2)
}

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	cmd, args := os.Args[1], os.Args[2:]

	// SIGINT/SIGTERM cancel the context so every subcommand can stop its listeners and, for the
	// client, leave its reconnect loop; tests simply kill the process.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	var err error
	switch cmd {
	case "server":
		err = runServer(ctx, args)
	case "client":
		err = runClient(ctx, args)
	case "echo", "sink", "source":
		err = runTCPTool(ctx, cmd, args)
	default:
		usage()
	}
	if err != nil && ctx.Err() == nil {
		logrus.WithError(err).Error("gopeer " + cmd + " failed")
		os.Exit(1)
	}
}

// logFlags registers the logging flags shared by server and client.
type logFlags struct {
	debug      bool
	tunnelData bool
}

func (l *logFlags) register(fs *flag.FlagSet) {
	fs.BoolVar(&l.debug, "debug", false, "log at debug level (remotedialer's own debug lines included)")
	fs.BoolVar(&l.tunnelData, "print-tunnel-data", false,
		"log every frame remotedialer reads and writes (same as CATTLE_TUNNEL_DATA_DEBUG=true); implies --debug")
}

// apply configures logrus, which remotedialer logs through. Everything goes to stderr, with full
// timestamps so the order of events can be compared with the Rust side's logs.
func (l *logFlags) apply() {
	logrus.SetOutput(os.Stderr)
	logrus.SetFormatter(&logrus.TextFormatter{FullTimestamp: true, DisableColors: true})
	if l.tunnelData {
		remotedialer.PrintTunnelData = true
	}
	if l.debug || remotedialer.PrintTunnelData {
		logrus.SetLevel(logrus.DebugLevel)
	}
}

// announce prints one JSON object as a single stdout line. os.Stdout is unbuffered in Go, so the
// line is visible to the parent process as soon as this returns.
func announce(v any) {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // only fixed, marshalable structs are passed
	}
	os.Stdout.Write(append(b, '\n'))
}

// parseFlags parses a subcommand's flags and rejects stray positional arguments, so a typo in a
// test's command line fails loudly instead of being ignored.
func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	return nil
}
