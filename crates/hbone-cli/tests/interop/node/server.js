'use strict';
// An HBONE server written with Node.js's http2, tls and net modules only;
// it shares no code with hbone.
//
// Each CONNECT is answered the HBONE way: dial the target named in
// :authority, answer 200 only once that dial succeeded (503 if it did
// not), then copy both ways with half-close: END_STREAM from the client
// becomes a FIN towards the target, and the target's FIN becomes
// END_STREAM, while the other direction keeps flowing.
//
// It prints "node-server: ready listen=ADDR" on stderr once listening, and
// one "node-server: tunnel ..." line per finished tunnel.
//
// usage: node server.js --listen IP:PORT --cert F --key F --ca F --client-id ID

const http2 = require('http2');
const net = require('net');
const { parseArgs, checkSpiffeId, readPem } = require('./common');

function log(message) {
  process.stderr.write(`node-server: ${message}\n`);
}

let args;
try {
  args = parseArgs(process.argv.slice(2), ['listen', 'cert', 'key', 'ca', 'client-id']);
} catch (e) {
  log(e.message);
  process.exit(1);
}

const server = http2.createSecureServer({
  cert: readPem(args.cert),
  key: readPem(args.key),
  ca: readPem(args.ca),
  minVersion: 'TLSv1.3',
  ALPNProtocols: ['h2'],
  allowHTTP1: false,
  // The chain check: a client certificate is required and must chain to
  // the bundle.
  requestCert: true,
  rejectUnauthorized: true,
});

// A client whose chain does not verify never gets this far.
server.on('tlsClientError', (err) => {
  log(`refused TLS client: ${err.code || ''} ${err.message}`);
});

// The SPIFFE check on top: the client's URI SAN.
server.on('secureConnection', (socket) => {
  const err = checkSpiffeId(socket.getPeerCertificate(), args['client-id']);
  if (err) {
    log(`refused connection: ${err.message}`);
    socket.destroy();
  }
});

server.on('stream', (stream, headers) => {
  if (headers[':method'] !== 'CONNECT') {
    stream.respond({ ':status': 405 }, { endStream: true });
    return;
  }
  // Node's http2 has already refused a CONNECT with :scheme or :path.
  const target = headers[':authority'];
  const match = /^(?:\[([0-9a-fA-F:.]+)\]|([0-9.]+)):(\d+)$/.exec(target || '');
  if (!match) {
    stream.respond({ ':status': 400 }, { endStream: true });
    return;
  }
  const host = match[1] || match[2];
  const port = Number(match[3]);
  const extra = Object.keys(headers).filter((name) => !name.startsWith(':')).sort();

  // allowHalfOpen: the target's FIN must not end our write side to it.
  const socket = net.connect({ host, port, allowHalfOpen: true });
  let up = 0;
  let down = 0;
  let opened = false;
  const connectTimer = setTimeout(() => socket.destroy(new Error('connect timeout')), 5000);

  socket.on('connect', () => {
    clearTimeout(connectTimer);
    opened = true;
    socket.setNoDelay(true);
    stream.respond({ ':status': 200 });
    // Client -> target: END_STREAM ends the pipe, which ends (FINs) the
    // socket's write side.
    stream.on('data', (chunk) => {
      up += chunk.length;
    });
    stream.pipe(socket);
    // Target -> client: the target's FIN ends the stream (END_STREAM).
    socket.on('data', (chunk) => {
      down += chunk.length;
    });
    socket.pipe(stream);
  });
  socket.on('error', (e) => {
    clearTimeout(connectTimer);
    if (!opened) {
      log(`tunnel target=${target} refused: ${e.message}`);
      if (!stream.destroyed) {
        stream.respond({ ':status': 503 }, { endStream: true });
      }
    } else {
      stream.close(http2.constants.NGHTTP2_CONNECT_ERROR);
    }
  });
  stream.on('error', () => socket.destroy());
  stream.on('close', () => {
    if (opened) {
      log(`tunnel target=${target} up=${up} down=${down} rst=${stream.rstCode} headers=[${extra.join(',')}]`);
    }
    if (stream.rstCode !== http2.constants.NGHTTP2_NO_ERROR) {
      socket.destroy();
    }
  });
  socket.on('close', () => {
    if (opened && !stream.destroyed && stream.writableEnded === false) {
      stream.end();
    }
  });
});

const [, listenHost, listenPort] = /^\[?([^\]]+)\]?:(\d+)$/.exec(args.listen) || [];
server.listen(Number(listenPort), listenHost, () => {
  const addr = server.address();
  const shown = addr.family === 'IPv6' || addr.family === 6 ? `[${addr.address}]` : addr.address;
  log(`ready listen=${shown}:${addr.port}`);
});
