package main

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/sirupsen/logrus"
)

// serverInfo is what the pre-flight learnt about the server.
type serverInfo struct {
	root         string      // scheme://host[:port] of the server URL, path dropped
	host         string      // host[:port], for wss://<host>/v3/connect
	serverCA     []byte      // the checked CA PEM (value + "\n"); nil without CATTLE_CA_CHECKSUM
	tls          *tls.Config // the tunnels' TLS: system roots plus serverCA (SSL_CERT_DIR)
	cacertsValid bool        // a GET trusting only serverCA succeeded
}

// preflight does run.sh's checks (spec §3.1 steps 3-4) and the binary's CA check (§3.2 step 4).
func preflight(ctx context.Context, cfg config) (*serverInfo, error) {
	u, err := url.Parse(cfg.server)
	if err != nil || u.Host == "" {
		return nil, fmt.Errorf("server URL %q is not a URL", cfg.server)
	}
	info := &serverInfo{root: u.Scheme + "://" + u.Host, host: u.Host}
	server := strings.TrimRight(cfg.server, "/")
	insecure := &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{
			Proxy:           http.ProxyFromEnvironment,
			TLSClientConfig: &tls.Config{InsecureSkipVerify: true},
		},
	}

	// run.sh: curl --insecure -fL $CATTLE_SERVER/ping must succeed.
	if _, err := get(ctx, insecure, server+"/ping", true); err != nil {
		return nil, fmt.Errorf("%s/ping is not accessible (%v)", server, err)
	}

	// run.sh: with a checksum, the served CA (jq -r .value, plus a newline) must match it.
	if cfg.caChecksum != "" {
		body, err := get(ctx, insecure, server+"/v3/settings/cacerts", true)
		if err != nil {
			return nil, fmt.Errorf("%s/v3/settings/cacerts is not accessible (%v)", server, err)
		}
		var setting struct {
			Value string `json:"value"`
		}
		if err := json.Unmarshal(body, &setting); err != nil {
			return nil, fmt.Errorf("%s/v3/settings/cacerts is not JSON: %v", server, err)
		}
		if setting.Value == "" {
			return nil, fmt.Errorf("the environment variable CATTLE_CA_CHECKSUM is set but there is no CA certificate configured at %s/v3/settings/cacerts", server)
		}
		caPEM := []byte(setting.Value + "\n")
		if block, _ := pem.Decode(caPEM); block == nil {
			return nil, fmt.Errorf("value from %s/v3/settings/cacerts does not look like an x509 certificate", server)
		} else if _, err := x509.ParseCertificate(block.Bytes); err != nil {
			return nil, fmt.Errorf("value from %s/v3/settings/cacerts does not look like an x509 certificate (%v)", server, err)
		}
		sum := sha256.Sum256(caPEM)
		if got := hex.EncodeToString(sum[:]); got != cfg.caChecksum {
			return nil, fmt.Errorf("Configured cacerts checksum (%s) does not match given --ca-checksum (%s)", got, cfg.caChecksum)
		}
		if err := os.WriteFile(filepath.Join(cfg.stateDir, "serverca"), caPEM, 0o600); err != nil {
			return nil, err
		}
		info.serverCA = caPEM
		logrus.Infof("CA checksum %s matches %s/v3/settings/cacerts", cfg.caChecksum, server)
	}

	// The binary: first trusting only serverca (any HTTP status counts), then system roots.
	if info.serverCA != nil {
		only := x509.NewCertPool()
		only.AppendCertsFromPEM(info.serverCA)
		if _, err := get(ctx, clientTrusting(only, 5*time.Second), info.root, false); err == nil {
			info.cacertsValid = true
			logrus.Info("Certificate details from serverca: CA valid")
		} else if cfg.strictVerify {
			return nil, fmt.Errorf("strict verify: the server does not verify with serverca: %v", err)
		} else {
			logrus.WithError(err).Warn("the server does not verify with serverca alone")
		}
	} else if cfg.strictVerify {
		return nil, fmt.Errorf("strict verify: no serverca (CATTLE_CA_CHECKSUM is empty)")
	}

	// SSL_CERT_DIR adds serverca to Go's system pool: that pool is what the tunnels trust.
	pool, err := x509.SystemCertPool()
	if err != nil {
		pool = x509.NewCertPool()
	}
	if info.serverCA != nil {
		pool.AppendCertsFromPEM(info.serverCA)
	}
	info.tls = &tls.Config{RootCAs: pool}
	if !info.cacertsValid {
		// Only x509 errors are fatal here; timeouts and the like are ignored, as in Rancher.
		if _, err := get(ctx, clientTrusting(pool, 5*time.Second), info.root, false); err != nil && strings.Contains(err.Error(), "x509:") {
			return nil, fmt.Errorf("issuer of the server certificate is not trusted: %v", err)
		}
	}
	return info, nil
}

func clientTrusting(pool *x509.CertPool, timeout time.Duration) *http.Client {
	return &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			Proxy:           http.ProxyFromEnvironment,
			TLSClientConfig: &tls.Config{RootCAs: pool},
		},
	}
}

// get fetches url; with need2xx a non-2xx status is an error (curl -f).
func get(ctx context.Context, c *http.Client, url string, need2xx bool) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	if need2xx && (resp.StatusCode < 200 || resp.StatusCode > 299) {
		return nil, fmt.Errorf("HTTP %s", resp.Status)
	}
	return body, nil
}

// clusterParams are the cluster agent's X-API-Tunnel-Params (spec §4.2), as Rancher builds
// them: a map, so json.Marshal sorts the keys (address, caCert, token).
func clusterParams(cfg config) (map[string]interface{}, error) {
	caData, err := os.ReadFile(cfg.saCAFile)
	if err != nil {
		return nil, err
	}
	token, err := os.ReadFile(cfg.saTokenFile)
	if err != nil {
		return nil, err
	}
	return map[string]interface{}{
		"cluster": map[string]interface{}{
			"address": cfg.apiAddress,
			"token":   strings.TrimSpace(string(token)),
			"caCert":  base64.StdEncoding.EncodeToString(caData),
		},
	}, nil
}
