//! TOML syntax errors as one line (`line N: what`), for files the server
//! reads and reloads: the toml crate's own text spans several lines with a
//! drawing of the offending spot, which a log record should not carry.

/// `error` in `text`, as `line N: message`.
pub(crate) fn one_line(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim().replace('\n', " ");
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {message}")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_line_names_the_line() {
        let text = "a = 1\nb = [\n";
        let error = toml::from_str::<toml::Table>(text).unwrap_err();
        let line = super::one_line(text, &error);
        assert!(
            line.starts_with("line 2: ") || line.starts_with("line 3: "),
            "{line}"
        );
        assert!(!line.contains('\n'), "{line}");
    }
}
