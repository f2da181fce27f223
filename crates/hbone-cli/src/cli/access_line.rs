//! Access records written straight into the log buffer.
//!
//! Every tunnel ends in an access record, two per tunnel when one process
//! holds both ends. Through `tracing`'s formatter a record costs a dozen
//! dynamically dispatched field visits, each a `format!` of its own, and a
//! calendar computation for the timestamp: on the connection workload the
//! access log was 5 to 8 % of the CPU per tunnel. This writer lays out the
//! same line, byte for byte what the `tracing` formatter writes for
//! [`TracingLog`]'s event (text without colours, or JSON), with plain
//! appends and a timestamp whose date and time of day are worked out once a
//! second, and hands it to the log buffer in one append.
//!
//! It follows the log filter: a filter that turns `hbone::access` off
//! (`--log warn`, `POST /logging`) turns these lines off too. On a terminal
//! the lines keep `tracing`'s colours, through [`TracingLog`].

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use hbone::access::{AccessLog, Outcome, TracingLog, TunnelRecord};

use super::logwriter::BatchWriter;
use tracing_subscriber::fmt::MakeWriter;

/// How this process writes its log, once logging is set up.
struct Layout {
    writer: BatchWriter,
    json: bool,
}

static LAYOUT: OnceLock<Layout> = OnceLock::new();

/// Makes [`access_log`] write its lines to `writer`, as text or JSON.
/// Not called for a terminal, whose lines are coloured.
pub(super) fn install(writer: BatchWriter, json: bool) {
    let _ = LAYOUT.set(Layout { writer, json });
}

/// The access log of a component whose identity comes from `source`.
pub(super) fn access_log(identity_source: &'static str) -> Arc<dyn AccessLog> {
    match LAYOUT.get() {
        Some(layout) => Arc::new(AccessLine {
            identity_source,
            layout,
        }),
        None => Arc::new(TracingLog::with_identity_source(identity_source)),
    }
}

/// Writes each record as the line [`TracingLog`] would have produced.
struct AccessLine {
    identity_source: &'static str,
    layout: &'static Layout,
}

thread_local! {
    /// The line being laid out, kept between records.
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
    /// The second the cached prefix is for, and `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl AccessLog for AccessLine {
    fn record(&self, record: &TunnelRecord) {
        if !tracing::enabled!(target: "hbone::access", tracing::Level::INFO) {
            return;
        }
        LINE.with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                return;
            };
            line.clear();
            let now = SystemTime::now();
            if self.layout.json {
                json_line(&mut line, now, self.identity_source, record);
            } else {
                text_line(&mut line, now, self.identity_source, record);
            }
            let _ = self.layout.writer.make_writer().write_all(line.as_bytes());
            // A burst's line is not kept.
            line.shrink_to(4 << 10);
        });
    }
}

/// One field's value, as the record gives it.
enum Value<'a> {
    /// Recorded from a `&str`: quoted (text) or a string (JSON).
    Str(&'a str),
    /// Recorded with `%`: as displayed (text) or a string (JSON).
    Shown(&'a dyn std::fmt::Display),
    /// A number.
    Number(u64),
}

/// The record's fields, in the order [`TracingLog`] records them.
fn fields<'a>(
    identity_source: &'static str,
    r: &'a TunnelRecord,
    scratch: &'a Scratch,
    visit: &mut dyn FnMut(&'static str, Value<'_>),
) {
    visit("role", Value::Str(r.role.as_str()));
    visit("source", Value::Shown(&r.source));
    visit("peer", Value::Str(&scratch.peer));
    visit("local", Value::Shown(&r.local_id));
    visit("identity_source", Value::Str(identity_source));
    visit("target_addr", Value::Shown(&r.target));
    visit("original", Value::Str(&scratch.original));
    if let Some(gateway) = &r.gateway {
        visit("gateway", Value::Shown(gateway));
    }
    visit("trace", Value::Str(&scratch.trace));
    match &r.outcome {
        Outcome::Refused {
            status,
            reason,
            detail,
        } => {
            visit("status", Value::Number(u64::from(*status)));
            visit("reason", Value::Str(reason));
            visit("detail", Value::Shown(detail));
        }
        Outcome::Completed => {
            visit("sent", Value::Number(r.bytes_sent));
            visit("received", Value::Number(r.bytes_received));
            visit("duration_ms", Value::Number(r.duration.as_millis() as u64));
            visit("result", Value::Shown(&"done"));
        }
        Outcome::Failed { end, detail } => {
            visit("sent", Value::Number(r.bytes_sent));
            visit("received", Value::Number(r.bytes_received));
            visit("duration_ms", Value::Number(r.duration.as_millis() as u64));
            visit("result", Value::Shown(&end.as_str()));
            visit("detail", Value::Shown(detail));
        }
        _ => {}
    }
}

/// The fields made from other values, laid out once per record.
struct Scratch {
    peer: String,
    original: String,
    trace: String,
}

impl Scratch {
    fn of(r: &TunnelRecord) -> Scratch {
        let mut scratch = Scratch {
            peer: String::new(),
            original: String::new(),
            trace: String::new(),
        };
        if let Some(peer) = &r.peer_id {
            let _ = write!(scratch.peer, "{peer}");
        }
        if let Some(original) = &r.original_source {
            let _ = write!(scratch.original, "{original}");
        }
        if let Some(trace) = &r.trace {
            scratch.trace = trace.trace_id_hex();
        }
        scratch
    }
}

fn message(r: &TunnelRecord) -> &'static str {
    match r.outcome {
        Outcome::Refused { .. } => "tunnel refused",
        _ => "tunnel closed",
    }
}

/// `tracing`'s full text format without colours:
/// `TIME  INFO hbone::access: MESSAGE name=value ...`.
fn text_line(line: &mut String, now: SystemTime, identity_source: &'static str, r: &TunnelRecord) {
    timestamp(line, now);
    line.push_str("  INFO hbone::access: ");
    line.push_str(message(r));
    let scratch = Scratch::of(r);
    fields(identity_source, r, &scratch, &mut |name, value| {
        line.push(' ');
        line.push_str(name);
        line.push('=');
        let _ = match value {
            Value::Str(s) => write!(line, "{s:?}"),
            Value::Shown(shown) => write!(line, "{shown}"),
            Value::Number(n) => write!(line, "{n}"),
        };
    });
    line.push('\n');
}

/// `tracing`'s JSON format with the event's fields flattened:
/// `{"timestamp":…,"level":"INFO","message":…,FIELDS,"target":"hbone::access"}`.
fn json_line(line: &mut String, now: SystemTime, identity_source: &'static str, r: &TunnelRecord) {
    line.push_str("{\"timestamp\":\"");
    timestamp(line, now);
    line.push_str("\",\"level\":\"INFO\",\"message\":\"");
    line.push_str(message(r));
    line.push('"');
    let scratch = Scratch::of(r);
    let mut shown = String::new();
    fields(identity_source, r, &scratch, &mut |name, value| {
        line.push_str(",\"");
        line.push_str(name);
        line.push_str("\":");
        match value {
            Value::Str(s) => json_string(line, s),
            Value::Shown(value) => {
                shown.clear();
                let _ = write!(shown, "{value}");
                json_string(line, &shown);
            }
            Value::Number(n) => {
                let _ = write!(line, "{n}");
            }
        }
    });
    line.push_str(",\"target\":\"hbone::access\"}\n");
}

/// `s` as a JSON string, escaped as serde_json escapes it.
fn json_string(line: &mut String, s: &str) {
    line.push('"');
    for c in s.chars() {
        match c {
            '"' => line.push_str("\\\""),
            '\\' => line.push_str("\\\\"),
            '\n' => line.push_str("\\n"),
            '\r' => line.push_str("\\r"),
            '\t' => line.push_str("\\t"),
            '\u{8}' => line.push_str("\\b"),
            '\u{c}' => line.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(line, "\\u{:04x}", c as u32);
            }
            c => line.push(c),
        }
    }
    line.push('"');
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ` in UTC, as `tracing`'s timer writes it;
/// the part before the fraction is worked out once a second per thread.
fn timestamp(line: &mut String, now: SystemTime) {
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let second = since_epoch.as_secs();
    SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != second {
            cached.1.clear();
            let (year, month, day) = civil_from_days((second / 86_400) as i64);
            let of_day = second % 86_400;
            let _ = write!(
                cached.1,
                "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
                of_day / 3600,
                of_day % 3600 / 60,
                of_day % 60
            );
            cached.0 = second;
        }
        line.push_str(&cached.1);
    });
    let _ = write!(line, ".{:06}Z", since_epoch.subsec_micros());
}

/// The proleptic Gregorian date of a day counted from 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Days from 0000-03-01, so that a leap day ends each year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests;
