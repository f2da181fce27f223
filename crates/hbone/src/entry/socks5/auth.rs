//! SOCKS5 username/password authentication (RFC 1929): the credentials
//! file, the sub-negotiation's parser and the check.
//!
//! The file holds one `user:password` per line (the password is everything
//! after the first `:`); blank lines and lines starting with `#` are
//! skipped. Names and passwords are 1 to 255 bytes, as the protocol
//! carries them. The file must be readable by its owner only (mode 0600 or
//! stricter): the passwords are in it as the clients send them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use zeroize::{Zeroize, Zeroizing};

use super::{NegotiationError, Parsed};

/// The method number of username/password authentication.
pub(super) const USER_PASS: u8 = 0x02;
/// The version of the username/password sub-negotiation.
const AUTH_VERSION: u8 = 0x01;
/// Largest credentials file read: far more than any list of users.
const MAX_FILE: u64 = 1 << 20;

/// The users a SOCKS5 entry lets in, with their passwords. Its `Debug`
/// shows how many there are, never who or with what.
#[derive(Clone, Default)]
pub struct Credentials {
    users: Vec<User>,
}

/// A user name and its password, both wiped from memory when dropped.
#[derive(Clone)]
struct User {
    name: Zeroizing<Vec<u8>>,
    password: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("users", &self.users.len())
            .finish()
    }
}

/// Why a credentials file cannot be used, naming the file (and the line).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CredentialsError {
    /// The file could not be read.
    #[error("cannot read credentials file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Others than its owner may read the file.
    #[error(
        "credentials file {path} is readable by group or others (mode {mode:o}); fix: chmod 600 {path}"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A line is not `user:password`, or repeats a user.
    #[error("{path}:{line}: {problem}")]
    Line {
        /// The file.
        path: PathBuf,
        /// The line, from 1.
        line: usize,
        /// What is wrong with it.
        problem: String,
    },
    /// The file names no user (everyone would be refused).
    #[error("{0}: no user:password line; an entry with no user would refuse everyone")]
    Empty(PathBuf),
    /// The file is larger than any list of users needs to be.
    #[error("{0}: larger than 1 MiB; is this the credentials file?")]
    TooLarge(PathBuf),
}

impl Credentials {
    /// Reads `path`, refusing it if group or others may read it.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, CredentialsError> {
        let path = path.as_ref();
        let read_error = |source| CredentialsError::Read {
            path: path.to_owned(),
            source,
        };
        let metadata = std::fs::metadata(path).map_err(read_error)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = metadata.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(CredentialsError::Permissions {
                    path: path.to_owned(),
                    mode,
                });
            }
        }
        if metadata.len() > MAX_FILE {
            return Err(CredentialsError::TooLarge(path.to_owned()));
        }
        let text = Zeroizing::new(std::fs::read(path).map_err(read_error)?);
        Self::parse(&text, path)
    }

    /// Parses the text of a credentials file; `path` names it in errors.
    pub fn parse(text: &[u8], path: &Path) -> Result<Self, CredentialsError> {
        let mut users: Vec<User> = Vec::new();
        for (index, line) in text.split(|&b| b == b'\n').enumerate() {
            let problem = |problem: &str| CredentialsError::Line {
                path: path.to_owned(),
                line: index + 1,
                problem: problem.to_owned(),
            };
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.trim_ascii().is_empty() || line.trim_ascii_start().starts_with(b"#") {
                continue;
            }
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                return Err(problem("expected user:password"));
            };
            let (user, password) = (&line[..colon], &line[colon + 1..]);
            if user.is_empty() || user.len() > 255 {
                return Err(problem("the user name must be 1 to 255 bytes"));
            }
            if password.is_empty() || password.len() > 255 {
                return Err(problem("the password must be 1 to 255 bytes"));
            }
            if users.iter().any(|known| known.name.as_slice() == user) {
                return Err(problem(&format!(
                    "user {:?} is given twice",
                    String::from_utf8_lossy(user)
                )));
            }
            users.push(User {
                name: Zeroizing::new(user.to_vec()),
                password: Zeroizing::new(password.to_vec()),
            });
        }
        if users.is_empty() {
            return Err(CredentialsError::Empty(path.to_owned()));
        }
        Ok(Credentials { users })
    }

    /// How many users there are.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether there is no user (never so for a loaded file).
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `user` with `password` may come in. Every user is compared,
    /// each byte of each, whatever matched: how long the check takes says
    /// nothing of how much of a name or password was right.
    pub fn verify(&self, user: &[u8], password: &[u8]) -> bool {
        let mut matched = false;
        for known in &self.users {
            let both = equal(&known.name, user) & equal(&known.password, password);
            matched |= both;
        }
        matched
    }
}

/// Byte strings compared without stopping at the first difference.
fn equal(a: &[u8], b: &[u8]) -> bool {
    let mut difference = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        difference |= x ^ y;
    }
    std::hint::black_box(difference) == 0
}

/// The credentials an entry checks, replaceable while it runs (a reloaded
/// file applies to the clients that authenticate from then on).
#[derive(Debug, Clone)]
pub struct CredentialsHandle {
    current: Arc<RwLock<Arc<Credentials>>>,
}

impl CredentialsHandle {
    /// A handle that starts with `credentials`.
    pub fn new(credentials: Credentials) -> Self {
        CredentialsHandle {
            current: Arc::new(RwLock::new(Arc::new(credentials))),
        }
    }

    /// The credentials now; keep them for one check.
    pub fn current(&self) -> Arc<Credentials> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts `credentials` in force for every check from now on.
    pub fn replace(&self, credentials: Credentials) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(credentials);
    }
}

/// A username/password request as the client sent it.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserPassword<'a> {
    /// The user name (1 to 255 bytes in a well-formed request; 0 is read,
    /// and matches nobody).
    pub user: &'a [u8],
    /// The password.
    pub password: &'a [u8],
}

/// Reads the username/password request (version 1, ULEN, UNAME, PLEN,
/// PASSWD) at the start of `data`. Pure, like the other parsers.
#[doc(hidden)]
pub fn parse_auth(data: &[u8]) -> Result<Parsed<UserPassword<'_>>, NegotiationError> {
    match data.first() {
        None => return Ok(Parsed::Incomplete),
        Some(&version) if version != AUTH_VERSION => {
            return Err(NegotiationError::BadAuthVersion);
        }
        Some(_) => {}
    }
    let Some(&user_len) = data.get(1) else {
        return Ok(Parsed::Incomplete);
    };
    let user_end = 2 + usize::from(user_len);
    let Some(&password_len) = data.get(user_end) else {
        return Ok(Parsed::Incomplete);
    };
    let end = user_end + 1 + usize::from(password_len);
    if data.len() < end {
        return Ok(Parsed::Incomplete);
    }
    Ok(Parsed::Complete(
        UserPassword {
            user: &data[2..user_end],
            password: &data[user_end + 1..end],
        },
        end,
    ))
}

/// The answer to a username/password request.
pub(super) fn auth_reply(accepted: bool) -> [u8; 2] {
    [AUTH_VERSION, if accepted { 0x00 } else { 0x01 }]
}

/// Wipes the first `used` bytes of `buf` (a password went through them)
/// and removes them.
pub(super) fn consume_secret(buf: &mut Vec<u8>, used: usize) {
    buf[..used].zeroize();
    buf.drain(..used);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Credentials, String> {
        Credentials::parse(text.as_bytes(), Path::new("users")).map_err(|e| e.to_string())
    }

    #[test]
    fn the_file_is_user_colon_password_per_line() {
        let credentials = parse(
            "# who may use the entry\n\nalice:s3cret\r\n  # indented comment\nbob:pa:ss word\n",
        )
        .unwrap();
        assert_eq!(credentials.len(), 2);
        assert!(credentials.verify(b"alice", b"s3cret"));
        assert!(credentials.verify(b"bob", b"pa:ss word"));
        assert!(!credentials.verify(b"alice", b"pa:ss word"));
        assert!(!credentials.verify(b"alice", b"s3cre"));
        assert!(!credentials.verify(b"alice", b"s3crets"));
        assert!(!credentials.verify(b"", b""));
        assert!(!format!("{credentials:?}").contains("s3cret"));
    }

    #[test]
    fn bad_lines_are_named() {
        assert_eq!(
            parse("alice:x\n\nbob\n").unwrap_err(),
            "users:3: expected user:password"
        );
        assert_eq!(
            parse(":x\n").unwrap_err(),
            "users:1: the user name must be 1 to 255 bytes"
        );
        assert_eq!(
            parse("a:\n").unwrap_err(),
            "users:1: the password must be 1 to 255 bytes"
        );
        let long = format!("a:{}\n", "p".repeat(256));
        assert_eq!(
            parse(&long).unwrap_err(),
            "users:1: the password must be 1 to 255 bytes"
        );
        assert_eq!(
            parse("a:1\na:2\n").unwrap_err(),
            "users:2: user \"a\" is given twice"
        );
        assert!(
            parse("# nobody\n")
                .unwrap_err()
                .contains("no user:password")
        );
    }

    #[test]
    fn auth_requests_are_decided_on_the_bytes_they_need() {
        let request = [&[1u8, 5][..], b"alice", &[2], b"pw", b"rest"].concat();
        for short in 0..10 {
            assert_eq!(parse_auth(&request[..short]), Ok(Parsed::Incomplete));
        }
        assert_eq!(
            parse_auth(&request),
            Ok(Parsed::Complete(
                UserPassword {
                    user: b"alice",
                    password: b"pw"
                },
                10
            ))
        );
        assert_eq!(parse_auth(&[5, 1]), Err(NegotiationError::BadAuthVersion));
        assert_eq!(
            parse_auth(&[1, 0, 0]),
            Ok(Parsed::Complete(
                UserPassword {
                    user: b"",
                    password: b""
                },
                3
            ))
        );
    }

    #[test]
    fn consuming_a_secret_keeps_what_follows() {
        let mut buf = b"secretREST".to_vec();
        consume_secret(&mut buf, 6);
        assert_eq!(buf, b"REST");
    }
}
