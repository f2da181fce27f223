'use strict';
// An HBONE client written with Node.js's http2 and tls modules only; it
// shares no code with hbone.
//
// It opens one CONNECT tunnel to --target through the HBONE server at
// --server, copies stdin into the tunnel (EOF on stdin ends the stream:
// END_STREAM, a half-close) and the tunnel to stdout, and exits 0 once
// both directions have ended.
//
// Exit status: 0 on success, 1 on any failure (reason on stderr), 3 when
// the server answered the CONNECT with a status other than 200.
//
// usage: node client.js --server IP:PORT --target IP:PORT --cert F --key F
//                       --ca F --server-id SPIFFE-ID [--timeout-ms N]

const http2 = require('http2');
const { parseArgs, checkSpiffeId, readPem } = require('./common');

function fail(message) {
  process.stderr.write(`node-client: ${message}\n`);
  process.exit(1);
}

let args;
try {
  args = parseArgs(process.argv.slice(2), ['server', 'target', 'cert', 'key', 'ca', 'server-id']);
} catch (e) {
  fail(e.message);
}
const timeoutMs = Number(args['timeout-ms'] || 60000);
setTimeout(() => fail(`timed out after ${timeoutMs} ms`), timeoutMs).unref();

const session = http2.connect(`https://${args.server}`, {
  ca: readPem(args.ca),
  cert: readPem(args.cert),
  key: readPem(args.key),
  minVersion: 'TLSv1.3',
  ALPNProtocols: ['h2'],
  // Node checks the chain against `ca` (rejectUnauthorized defaults to
  // true); SPIFFE certificates have no DNS name, so the host name check is
  // replaced by the URI SAN check.
  rejectUnauthorized: true,
  checkServerIdentity: (_host, cert) => checkSpiffeId(cert, args['server-id']),
});
session.on('error', (e) => fail(`session: ${e.code || ''} ${e.message}`));
session.on('connect', (_session, socket) => {
  if (socket.alpnProtocol !== 'h2' || socket.getProtocol() !== 'TLSv1.3') {
    fail(`negotiated ${socket.getProtocol()} ALPN ${socket.alpnProtocol}, want TLSv1.3 h2`);
  }
});

// For CONNECT, Node sends only :method and :authority (no :scheme/:path).
const stream = session.request({
  ':method': 'CONNECT',
  ':authority': args.target,
});

let up = 0;
let down = 0;
let readDone = false;
let writeDone = false;

function maybeFinish() {
  if (readDone && writeDone) {
    process.stderr.write(`node-client: done down=${down} up=${up}\n`);
    session.close(() => process.exit(0));
  }
}

stream.on('response', (headers) => {
  const status = headers[':status'];
  if (status !== 200) {
    process.stderr.write(`node-client: status=${status}\n`);
    process.exit(3);
  }
  process.stderr.write(`node-client: tunnel open status=${status}\n`);
  process.stdin.on('data', (chunk) => {
    up += chunk.length;
  });
  // pipe() ends the stream (END_STREAM) when stdin ends.
  process.stdin.pipe(stream);
});
stream.on('finish', () => {
  writeDone = true;
  maybeFinish();
});

stream.on('data', (chunk) => {
  down += chunk.length;
  if (!process.stdout.write(chunk)) {
    stream.pause();
    process.stdout.once('drain', () => stream.resume());
  }
});
stream.on('end', () => {
  process.stderr.write(`node-client: response ended bytes=${down}\n`);
  readDone = true;
  maybeFinish();
});
stream.on('error', (e) => fail(`stream: ${e.code || ''} ${e.message}`));
stream.on('close', () => {
  if (!(readDone && writeDone)) {
    fail(`stream closed (RST_STREAM code ${stream.rstCode}) before both directions ended: down=${down} up=${up}`);
  }
});
