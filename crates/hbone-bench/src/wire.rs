//! The one-line result a load generator prints on stdout: `key=value`
//! pairs of numbers, e.g. `bytes=1048576 seconds=1.002`. Plain text keeps
//! the load generator usable by hand and trivial to parse here.

use std::collections::BTreeMap;

use anyhow::{Context, bail};

/// Named numbers from one result line.
#[derive(Debug, Default)]
pub struct Fields(BTreeMap<String, f64>);

impl Fields {
    /// Formats pairs as one line.
    pub fn line(pairs: &[(&str, f64)]) -> String {
        pairs
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub fn parse(line: &str) -> anyhow::Result<Fields> {
        let mut fields = BTreeMap::new();
        for pair in line.split_whitespace() {
            let (key, value) = pair
                .split_once('=')
                .with_context(|| format!("{pair:?} in {line:?} is not key=value"))?;
            let value: f64 = value
                .parse()
                .with_context(|| format!("{key} in {line:?} is not a number"))?;
            fields.insert(key.to_owned(), value);
        }
        if fields.is_empty() {
            bail!("empty result line");
        }
        Ok(Fields(fields))
    }

    /// The value of `key`, which must be present and positive: a zero
    /// count or duration would make every derived rate meaningless.
    pub fn positive(&self, key: &str) -> anyhow::Result<f64> {
        match self.0.get(key) {
            Some(&value) if value > 0.0 && value.is_finite() => Ok(value),
            Some(value) => bail!("{key}={value} in the load generator's result is not positive"),
            None => bail!("the load generator's result has no {key}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let line = Fields::line(&[("bytes", 1024.0), ("seconds", 0.5)]);
        assert_eq!(line, "bytes=1024 seconds=0.5");
        let fields = Fields::parse(&line).unwrap();
        assert_eq!(fields.positive("bytes").unwrap(), 1024.0);
        assert!(fields.positive("missing").is_err());
        assert!(Fields::parse("bytes").is_err());
        assert!(Fields::parse("n=0").unwrap().positive("n").is_err());
    }
}
