// An HBONE client written with Go's standard library only: net/http's
// Transport with its bundled HTTP/2 client, crypto/tls for mutual TLS 1.3,
// and crypto/x509 for the SPIFFE checks. It shares no code with hbone.
//
// It opens one CONNECT tunnel to -target through the HBONE server at
// -server, copies stdin into the tunnel (EOF on stdin ends the request
// body: END_STREAM, a half-close) and the tunnel to stdout, and exits 0
// once both directions have ended.
//
// Exit status: 0 on success, 1 on any failure (reason on stderr), 3 when
// the server answered the CONNECT with a status other than 200.
//
// Build: GO111MODULE=off GOPROXY=off go build -o go-client client.go
package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"sync"
	"time"
)

func main() {
	server := flag.String("server", "", "HBONE server address, ip:port")
	target := flag.String("target", "", "target authority sent in :authority, ip:port")
	certFile := flag.String("cert", "", "client certificate chain (PEM)")
	keyFile := flag.String("key", "", "client private key (PEM)")
	caFile := flag.String("ca", "", "trust bundle (PEM)")
	serverID := flag.String("server-id", "", "SPIFFE ID the server must present")
	timeout := flag.Duration("timeout", 60*time.Second, "limit for the whole run")
	flag.Parse()
	if *server == "" || *target == "" || *certFile == "" || *keyFile == "" || *caFile == "" || *serverID == "" {
		fail("usage: client -server ADDR -target ADDR -cert F -key F -ca F -server-id ID")
	}
	time.AfterFunc(*timeout, func() { fail("timed out after %s", *timeout) })

	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		fail("loading client certificate: %v", err)
	}
	roots, err := loadPool(*caFile)
	if err != nil {
		fail("%v", err)
	}

	tlsConfig := &tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS13,
		NextProtos:   []string{"h2"},
		// SPIFFE certificates carry a URI SAN and no DNS name, so the
		// default host name check cannot apply; VerifyConnection checks
		// the chain against the bundle and the URI SAN instead.
		InsecureSkipVerify: true,
		VerifyConnection:   verifyPeer(roots, *serverID, x509.ExtKeyUsageServerAuth),
	}
	transport := &http.Transport{
		TLSClientConfig:     tlsConfig,
		ForceAttemptHTTP2:   true,
		TLSHandshakeTimeout: 10 * time.Second,
	}
	defer transport.CloseIdleConnections()

	body := &trackedBody{reader: os.Stdin, closed: make(chan struct{})}
	req := &http.Request{
		Method: http.MethodConnect,
		// The URL says where to dial (the HBONE server); Host is the
		// :authority of the CONNECT (the target).
		URL:    &url.URL{Scheme: "https", Host: *server},
		Host:   *target,
		Header: make(http.Header),
		Body:   body,
		// Unknown length: the body streams until stdin ends.
		ContentLength: -1,
	}
	resp, err := transport.RoundTrip(req)
	if err != nil {
		fail("CONNECT %s via %s: %v", *target, *server, err)
	}
	if resp.ProtoMajor != 2 {
		fail("expected HTTP/2, got %s", resp.Proto)
	}
	if resp.StatusCode != http.StatusOK {
		fmt.Fprintf(os.Stderr, "go-client: status=%d\n", resp.StatusCode)
		os.Exit(3)
	}
	fmt.Fprintf(os.Stderr, "go-client: tunnel open proto=%s status=%d\n", resp.Proto, resp.StatusCode)

	n, err := io.Copy(os.Stdout, resp.Body)
	if err != nil {
		fail("reading the tunnel after %d bytes: %v", n, err)
	}
	fmt.Fprintf(os.Stderr, "go-client: response ended bytes=%d\n", n)
	// The response may end first (the target half-closed): the upload
	// goes on. The transport closes the request body once it has sent
	// END_STREAM (or given up on the stream); wait for that before
	// closing the response, which would cancel the stream, and before
	// exiting.
	select {
	case <-body.closed:
	case <-time.After(*timeout):
		fail("request body was never finished")
	}
	resp.Body.Close()
	if err := body.err(); err != nil {
		fail("reading stdin: %v", err)
	}
	if !body.ended() {
		fail("the stream ended before all of stdin was sent (%d bytes sent)", body.count())
	}
	fmt.Fprintf(os.Stderr, "go-client: done down=%d up=%d\n", n, body.count())
}

// trackedBody is the request body: stdin, counting bytes and signalling
// when the transport closes it.
type trackedBody struct {
	reader  io.Reader
	mu      sync.Mutex
	n       int64
	readErr error
	eof     bool
	once    sync.Once
	closed  chan struct{}
}

func (b *trackedBody) Read(p []byte) (int, error) {
	n, err := b.reader.Read(p)
	b.mu.Lock()
	b.n += int64(n)
	if err == io.EOF {
		b.eof = true
	} else if err != nil {
		b.readErr = err
	}
	b.mu.Unlock()
	return n, err
}

func (b *trackedBody) Close() error {
	b.once.Do(func() { close(b.closed) })
	return nil
}

func (b *trackedBody) count() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.n
}

func (b *trackedBody) ended() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.eof
}

func (b *trackedBody) err() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.readErr
}

func loadPool(path string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading trust bundle: %v", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("no certificates in trust bundle %s", path)
	}
	return pool, nil
}

// verifyPeer checks the peer's chain against roots and that its leaf has
// exactly one URI SAN, equal to want.
func verifyPeer(roots *x509.CertPool, want string, usage x509.ExtKeyUsage) func(tls.ConnectionState) error {
	return func(cs tls.ConnectionState) error {
		if cs.Version != tls.VersionTLS13 {
			return fmt.Errorf("negotiated TLS version %#x, want TLS 1.3", cs.Version)
		}
		if cs.NegotiatedProtocol != "h2" {
			return fmt.Errorf("negotiated ALPN %q, want h2", cs.NegotiatedProtocol)
		}
		if len(cs.PeerCertificates) == 0 {
			return errors.New("peer sent no certificate")
		}
		leaf := cs.PeerCertificates[0]
		intermediates := x509.NewCertPool()
		for _, c := range cs.PeerCertificates[1:] {
			intermediates.AddCert(c)
		}
		_, err := leaf.Verify(x509.VerifyOptions{
			Roots:         roots,
			Intermediates: intermediates,
			KeyUsages:     []x509.ExtKeyUsage{usage},
		})
		if err != nil {
			return fmt.Errorf("peer certificate chain: %v", err)
		}
		if len(leaf.URIs) != 1 {
			return fmt.Errorf("peer certificate has %d URI SANs, want exactly one SPIFFE ID", len(leaf.URIs))
		}
		if got := leaf.URIs[0].String(); got != want {
			return fmt.Errorf("peer SPIFFE ID is %s, want %s", got, want)
		}
		return nil
	}
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "go-client: "+format+"\n", args...)
	os.Exit(1)
}
