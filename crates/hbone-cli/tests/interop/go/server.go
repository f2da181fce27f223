// An HBONE server written with Go's standard library only: net/http's
// Server with its bundled HTTP/2 server and crypto/tls requiring a client
// certificate. It shares no code with hbone.
//
// Each CONNECT is answered the HBONE way: dial the target named in
// :authority (r.Host), answer 200 only once that dial succeeded (503 if it
// did not), then copy both ways. END_STREAM from the client becomes a FIN
// (CloseWrite) towards the target while the target's answer keeps flowing
// back; the handler returns, ending the response stream, once both
// directions are done.
//
// It prints "go-server: ready listen=ADDR" on stderr once listening, and
// one "go-server: tunnel ..." line per finished tunnel.
//
// Build: GO111MODULE=off GOPROXY=off go build -o go-server server.go
package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sort"
	"strings"
	"sync"
	"time"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	certFile := flag.String("cert", "", "server certificate chain (PEM)")
	keyFile := flag.String("key", "", "server private key (PEM)")
	caFile := flag.String("ca", "", "trust bundle for client certificates (PEM)")
	clientID := flag.String("client-id", "", "SPIFFE ID every client must present")
	flag.Parse()
	if *certFile == "" || *keyFile == "" || *caFile == "" || *clientID == "" {
		fail("usage: server -listen ADDR -cert F -key F -ca F -client-id ID")
	}

	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		fail("loading server certificate: %v", err)
	}
	bundle, err := os.ReadFile(*caFile)
	if err != nil {
		fail("reading trust bundle: %v", err)
	}
	clientCAs := x509.NewCertPool()
	if !clientCAs.AppendCertsFromPEM(bundle) {
		fail("no certificates in trust bundle %s", *caFile)
	}

	tlsConfig := &tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS13,
		NextProtos:   []string{"h2"},
		// The standard check: a chain to the bundle, client-auth usage.
		ClientAuth: tls.RequireAndVerifyClientCert,
		ClientCAs:  clientCAs,
		// And the SPIFFE check on top: the client's URI SAN.
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("client sent no certificate")
			}
			leaf := cs.PeerCertificates[0]
			if len(leaf.URIs) != 1 || leaf.URIs[0].String() != *clientID {
				return fmt.Errorf("client SPIFFE IDs %v, want %s", leaf.URIs, *clientID)
			}
			return nil
		},
	}

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fail("listen: %v", err)
	}
	srv := &http.Server{
		Handler:           http.HandlerFunc(handle),
		TLSConfig:         tlsConfig,
		ReadHeaderTimeout: 10 * time.Second,
	}
	fmt.Fprintf(os.Stderr, "go-server: ready listen=%s\n", ln.Addr())
	if err := srv.ServeTLS(ln, "", ""); err != nil {
		fail("serve: %v", err)
	}
}

func handle(w http.ResponseWriter, r *http.Request) {
	if r.ProtoMajor != 2 {
		http.Error(w, "HTTP/2 only", http.StatusHTTPVersionNotSupported)
		return
	}
	if r.Method != http.MethodConnect {
		http.Error(w, "CONNECT only", http.StatusMethodNotAllowed)
		return
	}
	// For CONNECT the h2 server has already refused :scheme and :path
	// (PROTOCOL_ERROR); r.Host is :authority.
	target := r.Host
	if _, _, err := net.SplitHostPort(target); err != nil {
		http.Error(w, "bad authority", http.StatusBadRequest)
		return
	}
	conn, err := net.DialTimeout("tcp", target, 5*time.Second)
	if err != nil {
		logf("tunnel target=%s refused: %v", target, err)
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	}
	tcp := conn.(*net.TCPConn)
	defer tcp.Close()

	flusher, ok := w.(http.Flusher)
	if !ok {
		logf("response writer cannot flush")
		return
	}
	w.WriteHeader(http.StatusOK)
	flusher.Flush()

	var wg sync.WaitGroup
	var up int64
	var upErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		// Client -> target; END_STREAM (EOF on the body) becomes a FIN.
		up, upErr = io.Copy(tcp, r.Body)
		tcp.CloseWrite()
	}()

	// Target -> client, flushing each read so nothing waits in a buffer.
	var down int64
	var downErr error
	buf := make([]byte, 64<<10)
	for {
		n, err := tcp.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				downErr = werr
				break
			}
			flusher.Flush()
			down += int64(n)
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			downErr = err
			break
		}
	}
	// Returning ends the response (END_STREAM); wait for the upload so
	// the request body is not cut off.
	wg.Wait()
	logf("tunnel target=%s up=%d down=%d up_err=%v down_err=%v headers=%s",
		target, up, down, upErr, downErr, headerNames(r.Header))
}

func headerNames(h http.Header) string {
	names := make([]string, 0, len(h))
	for k := range h {
		names = append(names, strings.ToLower(k))
	}
	sort.Strings(names)
	return "[" + strings.Join(names, ",") + "]"
}

func logf(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "go-server: "+format+"\n", args...)
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "go-server: "+format+"\n", args...)
	os.Exit(1)
}
