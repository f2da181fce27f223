//! From TOML to command-line words, one field at a time: names, types and
//! each value through its flag's parser.

use std::ffi::OsString;
use std::path::Path;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::schema::{Key, Schema, SectionSchema, Shape, ValueKind, closest};
use super::{ConfigError, Field, Section, Source, check};

/// The top-level fields and the sections of a parsed document.
pub(super) fn document(
    schema: &Schema,
    src: &Source<'_>,
    document: &DeTable<'_>,
) -> Result<(Vec<Field>, Vec<Section>), ConfigError> {
    let mut global = Vec::new();
    let mut sections = Vec::new();
    for (key, value) in in_file_order(document) {
        let name: &str = key.get_ref();
        let line = src.line(key.span().start);
        if let Some(section) = schema.section(name) {
            read_sections(schema, section, src, value, &mut sections)?;
        } else if let Some(field) = schema.global(name) {
            global.push(read_field(&schema.top_level, field, "", src, key, value)?);
        } else if is_table_like(value.get_ref()) {
            let suggestion = closest(name, schema.sections.iter().map(|s| s.kind))
                .and_then(|kind| schema.section(kind))
                .map(|s| format!("did you mean {}? ", s.header()))
                .unwrap_or_default();
            return Err(src.error(
                line,
                "",
                format!(
                    "unknown section [{name}]; {suggestion}valid sections: {}",
                    schema.section_list().join(", ")
                ),
            ));
        } else {
            return Err(unknown_top_level(schema, src, line, name));
        }
    }
    Ok((global, sections))
}

fn unknown_top_level(schema: &Schema, src: &Source<'_>, line: usize, name: &str) -> ConfigError {
    let owners: Vec<String> = schema
        .sections
        .iter()
        .filter(|s| s.key(name).is_some())
        .map(|s| s.header())
        .collect();
    let names = schema.globals.iter().map(|k| k.name.as_str());
    let message = if !owners.is_empty() {
        format!(
            "{name} is not a top-level field: it belongs in a section ({})",
            owners.join(", ")
        )
    } else {
        let suggestion = closest(name, names.clone())
            .map(|n| format!("did you mean {n}? "))
            .unwrap_or_default();
        format!(
            "unknown top-level field {name}; {suggestion}valid top-level fields: {}",
            names.collect::<Vec<_>>().join(", ")
        )
    };
    src.error(line, "", message)
}

type Entry<'a, 'i> = (
    &'a Spanned<std::borrow::Cow<'i, str>>,
    &'a Spanned<DeValue<'i>>,
);

/// TOML tables come back sorted by key; errors and sections should follow
/// the file.
fn in_file_order<'a, 'i>(table: &'a DeTable<'i>) -> Vec<Entry<'a, 'i>> {
    let mut entries: Vec<_> = table.iter().collect();
    entries.sort_by_key(|(key, _)| key.span().start);
    entries
}

fn is_table_like(value: &DeValue<'_>) -> bool {
    match value {
        DeValue::Table(_) => true,
        DeValue::Array(items) => items.iter().any(|v| v.get_ref().is_table()),
        _ => false,
    }
}

fn read_sections(
    schema: &Schema,
    section: &SectionSchema,
    src: &Source<'_>,
    value: &Spanned<DeValue<'_>>,
    out: &mut Vec<Section>,
) -> Result<(), ConfigError> {
    let kind = section.kind;
    let line = src.line(value.span().start);
    match (value.get_ref(), section.repeats) {
        (DeValue::Table(table), false) => {
            out.push(read_section(
                schema,
                section,
                src,
                table,
                line,
                &section.header(),
            )?);
        }
        (DeValue::Array(items), true) if items.iter().all(|i| i.get_ref().is_table()) => {
            for (index, item) in items.iter().enumerate() {
                let DeValue::Table(table) = item.get_ref() else {
                    unreachable!("checked above");
                };
                let line = src.line(item.span().start);
                let label = format!("[[{kind}]] #{}", index + 1);
                out.push(read_section(schema, section, src, table, line, &label)?);
            }
        }
        (DeValue::Array(_), false) => {
            return Err(src.error(
                line,
                "",
                format!(
                    "{kind} must be one [{kind}] table, not an array: a file has at most one [{kind}] \
                     (only [[forward]] and [[socks5]] repeat)"
                ),
            ));
        }
        (DeValue::Table(_), true) => {
            return Err(src.error(
                line,
                "",
                format!("write [[{kind}]] with double brackets: {kind} sections may repeat"),
            ));
        }
        (other, _) => {
            return Err(src.error(
                line,
                "",
                format!(
                    "{kind} must be a section ({}), not {}",
                    section.header(),
                    article(other.type_str())
                ),
            ));
        }
    }
    Ok(())
}

fn read_section(
    schema: &Schema,
    section: &SectionSchema,
    src: &Source<'_>,
    table: &DeTable<'_>,
    line: usize,
    label: &str,
) -> Result<Section, ConfigError> {
    let mut fields = Vec::new();
    for (key, value) in in_file_order(table) {
        let name: &str = key.get_ref();
        let Some(field) = section.key(name) else {
            return Err(unknown_field(schema, section, src, label, key));
        };
        fields.push(read_field(&section.cmd, field, label, src, key, value)?);
    }
    Ok(Section {
        kind: section.kind,
        line,
        fields,
    })
}

fn unknown_field(
    schema: &Schema,
    section: &SectionSchema,
    src: &Source<'_>,
    label: &str,
    key: &Spanned<std::borrow::Cow<'_, str>>,
) -> ConfigError {
    let name: &str = key.get_ref();
    let line = src.line(key.span().start);
    let names = section.keys.iter().map(|k| k.name.as_str());
    let message = if schema.global(name).is_some() {
        "a top-level field: put it at the top of the file, before any section".to_owned()
    } else {
        let suggestion = closest(name, names.clone())
            .map(|n| format!("did you mean {n}? "))
            .unwrap_or_default();
        format!(
            "unknown field; {suggestion}valid fields: {}",
            names.collect::<Vec<_>>().join(", ")
        )
    };
    src.error(line, &format!("{label} {name}"), message)
}

/// Turns one `name = value` into command-line words, checking the value's
/// type and, with the flag's own parser, its content.
fn read_field(
    cmd: &clap::Command,
    key: &Key,
    label: &str,
    src: &Source<'_>,
    name: &Spanned<std::borrow::Cow<'_, str>>,
    value: &Spanned<DeValue<'_>>,
) -> Result<Field, ConfigError> {
    let line = src.line(name.span().start);
    let subject = if label.is_empty() {
        key.name.clone()
    } else {
        format!("{label} {}", key.name)
    };
    let mut args = Vec::new();
    let items: Vec<&Spanned<DeValue<'_>>> = match (key.shape, value.get_ref()) {
        (Shape::Switch, DeValue::Boolean(on)) => {
            if *on {
                args.push(key.flag().into());
            }
            Vec::new()
        }
        (Shape::Switch, other) => {
            return Err(src.error(
                line,
                &subject,
                format!(
                    "expected true or false, found {}",
                    article(other.type_str())
                ),
            ));
        }
        (Shape::One, DeValue::Array(_)) => {
            return Err(src.error(
                line,
                &subject,
                "takes a single value, not an array (only repeatable fields take arrays)",
            ));
        }
        (Shape::Many, DeValue::Array(items)) => items.iter().collect(),
        _ => vec![value],
    };
    for item in items {
        let item_line = src.line(item.span().start);
        let text = scalar(item.get_ref()).ok_or_else(|| {
            let expected = match key.kind(cmd) {
                ValueKind::Integer => "an integer",
                _ => "a string",
            };
            let what = if key.shape == Shape::Many {
                "each value"
            } else {
                "the value"
            };
            src.error(
                item_line,
                &subject,
                format!(
                    "{what} must be {expected}, found {}",
                    article(item.get_ref().type_str())
                ),
            )
        })?;
        let value = match key.path_in(&text) {
            Some((before, path)) if !path.is_empty() && Path::new(path).is_relative() => {
                let mut value = OsString::from(before);
                value.push(src.base.join(path));
                value
            }
            _ => OsString::from(&text),
        };
        if let Err(e) = key.check(cmd, &value) {
            let cause = check::value_error(key, cmd, &text, &e);
            let quoted = format!("{text:?}");
            let message = if cause.contains(&quoted) {
                cause
            } else {
                format!("invalid value {quoted}: {cause}")
            };
            return Err(src.error(item_line, &subject, message));
        }
        key.push_value(&mut args, value);
    }
    Ok(Field {
        name: key.name.clone(),
        line,
        args,
    })
}

/// Strings as they are; integers as decimal text.
fn scalar(value: &DeValue<'_>) -> Option<String> {
    match value {
        DeValue::String(s) => Some(s.to_string()),
        DeValue::Integer(i) => i128::from_str_radix(i.as_str(), i.radix())
            .ok()
            .map(|n| n.to_string()),
        _ => None,
    }
}

fn article(type_name: &str) -> String {
    let a = if type_name.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{a} {type_name}")
}
