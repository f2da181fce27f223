//! The little of X.509 that identities and revocation need: the URI SANs,
//! validity period and serial number of a certificate, and the next
//! update of a CRL. rustls and webpki verify chains, signatures and
//! revocation; this only reads those fields, with a strict DER walker that
//! refuses anything malformed instead of guessing, and pulls in no parser
//! crates.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why a certificate could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DerError(&'static str);

/// What identities need of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CertInfo<'a> {
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
    /// Every `uniformResourceIdentifier` of the subjectAltName extension.
    pub(crate) uris: Vec<&'a str>,
}

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const OID: u8 = 0x06;
const BOOLEAN: u8 = 0x01;
const OCTET_STRING: u8 = 0x04;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
/// `[0] EXPLICIT` version, `[3] EXPLICIT` extensions.
const VERSION: u8 = 0xa0;
const EXTENSIONS: u8 = 0xa3;
/// `[6] IMPLICIT IA5String` inside GeneralNames.
const URI_NAME: u8 = 0x86;
/// id-ce-subjectAltName, 2.5.29.17.
const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

/// Reads a DER-encoded certificate.
pub(crate) fn parse(der: &[u8]) -> Result<CertInfo<'_>, DerError> {
    let mut outer = Reader::new(der);
    let certificate = outer.expect(SEQUENCE)?;
    outer.end()?;
    let mut certificate = Reader::new(certificate);
    let tbs = certificate.expect(SEQUENCE)?;
    certificate.expect(SEQUENCE)?; // signatureAlgorithm
    certificate.any()?; // signatureValue (BIT STRING)
    certificate.end()?;

    let mut tbs = Reader::new(tbs);
    if tbs.peek() == Some(VERSION) {
        tbs.any()?;
    }
    tbs.expect(INTEGER)?; // serialNumber
    tbs.expect(SEQUENCE)?; // signature
    tbs.expect(SEQUENCE)?; // issuer
    let mut validity = Reader::new(tbs.expect(SEQUENCE)?);
    let not_before = time(&mut validity)?;
    let not_after = time(&mut validity)?;
    validity.end()?;
    tbs.expect(SEQUENCE)?; // subject
    tbs.expect(SEQUENCE)?; // subjectPublicKeyInfo
    let mut uris = Vec::new();
    while let Some(tag) = tbs.peek() {
        let value = tbs.any()?;
        if tag == EXTENSIONS {
            let mut wrapper = Reader::new(value);
            let mut extensions = Reader::new(wrapper.expect(SEQUENCE)?);
            wrapper.end()?;
            while !extensions.is_empty() {
                let mut extension = Reader::new(extensions.expect(SEQUENCE)?);
                let id = extension.expect(OID)?;
                if extension.peek() == Some(BOOLEAN) {
                    extension.any()?;
                }
                let value = extension.expect(OCTET_STRING)?;
                extension.end()?;
                if id == SUBJECT_ALT_NAME {
                    if !uris.is_empty() {
                        return Err(DerError("two subjectAltName extensions"));
                    }
                    uris = uri_names(value)?;
                }
            }
        }
    }
    Ok(CertInfo {
        not_before,
        not_after,
        uris,
    })
}

/// The `nextUpdate` of a DER-encoded CRL (RFC 5280 §5.1), which must be
/// present: webpki refuses CRLs without one.
pub(crate) fn crl_next_update(der: &[u8]) -> Result<SystemTime, DerError> {
    let mut outer = Reader::new(der);
    let list = outer.expect(SEQUENCE)?;
    outer.end()?;
    let mut list = Reader::new(list);
    let mut tbs = Reader::new(list.expect(SEQUENCE)?);
    if tbs.peek() == Some(INTEGER) {
        tbs.any()?; // version
    }
    tbs.expect(SEQUENCE)?; // signature
    tbs.expect(SEQUENCE)?; // issuer
    time(&mut tbs)?; // thisUpdate
    match tbs.peek() {
        Some(UTC_TIME | GENERALIZED_TIME) => time(&mut tbs),
        _ => Err(DerError("no nextUpdate")),
    }
}

/// The serial number of a DER-encoded certificate, as its DER INTEGER
/// content bytes.
#[cfg(feature = "ca")]
pub(crate) fn serial(der: &[u8]) -> Result<&[u8], DerError> {
    let mut outer = Reader::new(der);
    let certificate = outer.expect(SEQUENCE)?;
    outer.end()?;
    let mut tbs = Reader::new(Reader::new(certificate).expect(SEQUENCE)?);
    if tbs.peek() == Some(VERSION) {
        tbs.any()?;
    }
    tbs.expect(INTEGER)
}

/// The URIs among GeneralNames.
fn uri_names(value: &[u8]) -> Result<Vec<&str>, DerError> {
    let mut wrapper = Reader::new(value);
    let mut names = Reader::new(wrapper.expect(SEQUENCE)?);
    wrapper.end()?;
    let mut uris = Vec::new();
    while let Some(tag) = names.peek() {
        let name = names.any()?;
        if tag == URI_NAME {
            let uri = std::str::from_utf8(name)
                .ok()
                .filter(|uri| uri.is_ascii())
                .ok_or(DerError("a URI SAN that is not IA5 text"))?;
            uris.push(uri);
        }
    }
    Ok(uris)
}

/// UTCTime (`YYMMDDHHMMSSZ`, years 1950–2049) or GeneralizedTime
/// (`YYYYMMDDHHMMSSZ`), as RFC 5280 §4.1.2.5 requires them.
fn time(reader: &mut Reader<'_>) -> Result<SystemTime, DerError> {
    let tag = reader.peek().ok_or(DerError("missing time"))?;
    let text = reader.any()?;
    let bad = DerError("malformed time");
    let (year, rest) = match (tag, text.len()) {
        (UTC_TIME, 13) => {
            let yy = digits(&text[..2]).ok_or(bad.clone())?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        (GENERALIZED_TIME, 15) => (digits(&text[..4]).ok_or(bad.clone())?, &text[4..]),
        _ => return Err(bad),
    };
    if rest[10] != b'Z' {
        return Err(bad);
    }
    let field = |i: usize| digits(&rest[i..i + 2]).ok_or(bad.clone());
    let (month, day, hour, minute, second) =
        (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return Err(bad);
    }
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
    let seconds = u64::try_from(seconds).map_err(|_| DerError("time before 1970"))?;
    Ok(UNIX_EPOCH + Duration::from_secs(seconds))
}

fn digits(text: &[u8]) -> Option<u32> {
    text.iter().try_fold(0u32, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0'))
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: u32, month: u32, day: u32) -> i64 {
    let (year, month, day) = (i64::from(year), i64::from(month), i64::from(day));
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_index = (month + 9) % 12;
    let day_of_year = (153 * month_index + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Reads DER tag-length-value items in order.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn peek(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    fn end(&self) -> Result<(), DerError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DerError("trailing bytes"))
        }
    }

    /// The value of the next item, which must have tag `tag`.
    fn expect(&mut self, tag: u8) -> Result<&'a [u8], DerError> {
        if self.peek() != Some(tag) {
            return Err(DerError("unexpected element"));
        }
        self.any()
    }

    /// The value of the next item, whatever its tag (single-byte tags only,
    /// as every tag in a certificate is).
    fn any(&mut self) -> Result<&'a [u8], DerError> {
        let truncated = DerError("truncated");
        let (&tag, rest) = self.rest.split_first().ok_or(truncated.clone())?;
        if tag & 0x1f == 0x1f {
            return Err(DerError("multi-byte tag"));
        }
        let (&first, mut rest) = rest.split_first().ok_or(truncated.clone())?;
        let length = if first < 0x80 {
            usize::from(first)
        } else {
            let count = usize::from(first & 0x7f);
            if count == 0 || count > 4 || rest.len() < count {
                return Err(DerError("bad length"));
            }
            let (bytes, after) = rest.split_at(count);
            rest = after;
            let length = bytes.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b));
            // DER: the shortest form, and no leading zero byte.
            if length < 0x80 || bytes[0] == 0 {
                return Err(DerError("non-minimal length"));
            }
            length
        };
        if rest.len() < length {
            return Err(truncated);
        }
        let (value, after) = rest.split_at(length);
        self.rest = after;
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 12, 1), 20_788);
    }

    #[test]
    fn times() {
        let at = |der: &[u8]| time(&mut Reader::new(der));
        let secs = |s: u64| Ok(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(b"\x17\x0d491231235959Z"), secs(2_524_607_999));
        assert_eq!(at(b"\x18\x0f20500101000000Z"), secs(2_524_608_000));
        for bad in [
            &b"\x17\x0d500101000000Z"[..], // 1950: before the epoch
            b"\x17\x0d491331000000Z",      // month 13
            b"\x17\x0d4912312359590",      // no Z
            b"\x17\x0b4912312359Z",        // no seconds
            b"\x17\x0d49123123595+Z",
            b"\x04\x0d491231235959Z", // not a time
        ] {
            assert!(at(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lengths_must_be_minimal_and_complete() {
        assert_eq!(Reader::new(b"\x04\x02ab").any(), Ok(&b"ab"[..]));
        assert!(Reader::new(b"\x04\x03ab").any().is_err());
        assert!(Reader::new(b"\x04\x81\x02ab").any().is_err());
        assert!(Reader::new(b"\x04\x82\x00\x80").any().is_err());
        assert!(Reader::new(b"\x1f\x01\x01a").any().is_err());
        assert!(Reader::new(b"").any().is_err());
        let long = [&[0x04, 0x81, 0x80][..], &[7u8; 0x80]].concat();
        assert_eq!(Reader::new(&long).any().map(<[u8]>::len), Ok(0x80));
    }

    #[test]
    fn garbage_is_refused() {
        for bad in [
            &b""[..],
            b"\x30\x00",
            b"\x30\x03\x30\x01\x00",
            b"not DER at all",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
