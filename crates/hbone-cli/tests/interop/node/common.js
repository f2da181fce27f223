'use strict';
// Shared helpers for the Node.js interop peers: argument parsing and the
// SPIFFE check on a peer certificate. Node's own TLS stack verifies the
// chain against the bundle (`ca` plus rejectUnauthorized); these helpers
// add the check that the URI SAN is the expected SPIFFE ID.

const fs = require('fs');

/** Parses `--name value` pairs; every name in `required` must be present. */
function parseArgs(argv, required) {
  const args = {};
  for (let i = 0; i < argv.length; i += 2) {
    const name = argv[i];
    if (!name.startsWith('--') || i + 1 >= argv.length) {
      throw new Error(`bad argument ${name}`);
    }
    args[name.slice(2)] = argv[i + 1];
  }
  for (const name of required) {
    if (!(name in args)) {
      throw new Error(`missing --${name}`);
    }
  }
  return args;
}

/** The URI SANs of a certificate from getPeerCertificate(). */
function uriSans(cert) {
  if (!cert || !cert.subjectaltname) {
    return [];
  }
  // e.g. "URI:spiffe://cluster.local/ns/test/sa/server"; SPIFFE IDs
  // contain no ", " so splitting on it is safe here.
  return cert.subjectaltname
    .split(', ')
    .filter((entry) => entry.startsWith('URI:'))
    .map((entry) => entry.slice(4));
}

/** An Error if `cert` does not carry exactly the SPIFFE ID `want`. */
function checkSpiffeId(cert, want) {
  const uris = uriSans(cert);
  if (uris.length !== 1 || uris[0] !== want) {
    const err = new Error(`peer SPIFFE IDs [${uris.join(', ')}], want ${want}`);
    err.code = 'ERR_SPIFFE_ID_MISMATCH';
    return err;
  }
  return undefined;
}

function readPem(path) {
  return fs.readFileSync(path);
}

module.exports = { parseArgs, uriSans, checkSpiffeId, readPem };
