//! The distill job spec: one structure, TOML for people and JSON on the wire,
//! parsed in two stages (raw serde with `deny_unknown_fields`, then
//! `validate()` into the spec the rest of the code uses).
//!
//! ```text
//! job.toml / JSON ──serde──► raw::RawSpec ──validate──► JobSpec ──serialize──► JSON
//!                  (syntax, unknown   (defaults, requirements,
//!                   fields, types)     ranges, cross-field rules)
//! ```
//!
//! Every error names the field path (`training.batch_size`) and, for TOML,
//! the line. Validation reports every problem it finds, not only the first.
//! A `JobSpec` serialises to the same structure as the job file with every
//! default written out, so the JSON the coordinator stores parses back to an
//! equal spec.
//!
//! What it must never do: depend on libtorch. The coordinator, the worker and
//! the CLI all use this crate.

mod raw;
mod types;
mod validate;

use std::fmt;
use std::path::Path;

pub use types::*;
pub use validate::{default_heads, parse_preset};

/// One problem in a job spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field (`training.batch_size`, `data.labels[1]`);
    /// empty for document-level syntax errors.
    pub field: String,
    /// 1-based line in the TOML source, when known.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)?;
        if let Some(line) = self.line {
            write!(f, " (line {line})")?;
        }
        Ok(())
    }
}

/// Why a job spec was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read job spec {path}: {message}")]
    Io { path: String, message: String },
    /// Syntax, type or validation problems, in document order where known.
    #[error("{}", join(.0))]
    Invalid(Vec<FieldError>),
}

impl SpecError {
    /// The individual problems (empty for an I/O error).
    pub fn problems(&self) -> &[FieldError] {
        match self {
            SpecError::Io { .. } => &[],
            SpecError::Invalid(v) => v,
        }
    }
}

fn join(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The text format of a job spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Toml,
    Json,
}

/// Parses and validates a job spec written in `format`.
pub fn parse(src: &str, format: Format) -> Result<JobSpec, SpecError> {
    match format {
        Format::Toml => from_toml_str(src),
        Format::Json => from_json_str(src),
    }
}

/// Parses and validates a TOML job spec; errors carry field paths and lines.
pub fn from_toml_str(src: &str) -> Result<JobSpec, SpecError> {
    let de = toml::de::Deserializer::parse(src)
        .map_err(|e| SpecError::Invalid(vec![toml_error("", &e, src)]))?;
    let raw: raw::RawSpec = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = field_path(e.path());
        SpecError::Invalid(vec![toml_error(&field, e.inner(), src)])
    })?;
    validate::validate(raw).map_err(|mut errors| {
        for e in &mut errors {
            e.line = locate(src, &e.field);
        }
        errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
        SpecError::Invalid(errors)
    })
}

/// Parses and validates a JSON job spec (the structure of the TOML file).
pub fn from_json_str(src: &str) -> Result<JobSpec, SpecError> {
    let mut de = serde_json::Deserializer::from_str(src);
    let raw: raw::RawSpec = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = field_path(e.path());
        let inner = e.into_inner();
        let line = (inner.line() > 0).then_some(inner.line());
        // serde_json appends " at line L column C"; the line is kept separately.
        let message = inner.to_string();
        let message = message
            .split(" at line ")
            .next()
            .unwrap_or(&message)
            .to_string();
        SpecError::Invalid(vec![FieldError {
            field,
            line,
            message,
        }])
    })?;
    validate::validate(raw).map_err(|mut errors| {
        for e in &mut errors {
            e.line = locate_json(src, &e.field);
        }
        errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
        SpecError::Invalid(errors)
    })
}

/// Reads and parses a job file; `.json` files are JSON, everything else TOML.
pub fn load(path: &Path) -> Result<JobSpec, SpecError> {
    let src = std::fs::read_to_string(path).map_err(|e| SpecError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let format = if path.extension().is_some_and(|e| e == "json") {
        Format::Json
    } else {
        Format::Toml
    };
    parse(&src, format)
}

impl JobSpec {
    /// The spec as JSON, every default written out; `from_json_str` of the
    /// result gives back an equal spec.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a job spec always serialises")
    }
}

fn field_path(p: &serde_path_to_error::Path) -> String {
    let s = p.to_string();
    if s == "." {
        String::new()
    } else {
        s
    }
}

fn toml_error(field: &str, e: &toml::de::Error, src: &str) -> FieldError {
    FieldError {
        field: field.to_string(),
        line: e.span().map(|s| line_of(src, s.start)),
        message: e.message().trim_end().trim_end_matches('.').to_string(),
    }
}

fn line_of(src: &str, offset: usize) -> usize {
    src[..offset.min(src.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

/// The line of the field at dotted `path` (`a.b[2]`) in a TOML document: the
/// value's line for a leaf, the key's for a table. For a field that is not
/// written (a missing value), the line of its nearest written parent.
fn locate(src: &str, path: &str) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let doc = DeTable::parse(src).ok()?;
    let mut table: &DeTable = doc.get_ref();
    let mut line = None;
    let mut segments = path.split('.').peekable();
    while let Some(seg) = segments.next() {
        let (key, index) = match seg.split_once('[') {
            Some((k, rest)) => (k, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (seg, None),
        };
        let Some((k, v)) = table.iter().find(|(k, _)| k.get_ref() == key) else {
            break;
        };
        let mut value = v;
        line = Some(line_of(
            src,
            if value.get_ref().is_table() {
                k.span().start
            } else {
                value.span().start
            },
        ));
        if let (Some(i), DeValue::Array(items)) = (index, value.get_ref()) {
            if let Some(item) = items.iter().nth(i) {
                value = item;
                line = Some(line_of(src, value.span().start));
            }
        }
        match value.get_ref() {
            DeValue::Table(t) if segments.peek().is_some() => table = t,
            _ => break,
        }
    }
    line
}

/// [`locate`] for a JSON document (already known to parse): the line of the
/// value at dotted `path` (the key's line for an object), or of its nearest
/// written parent.
fn locate_json(src: &str, path: &str) -> Option<usize> {
    let b = src.as_bytes();
    let mut pos = 0;
    let mut line = None;
    for seg in path.split('.') {
        let (key, index) = match seg.split_once('[') {
            Some((k, rest)) => (k, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (seg, None),
        };
        pos = ws(b, pos);
        if b.get(pos) != Some(&b'{') {
            break;
        }
        // Members of this object until `key`.
        let mut found = None;
        pos += 1;
        loop {
            pos = ws(b, pos);
            if b.get(pos) != Some(&b'"') {
                break;
            }
            let key_start = pos;
            let key_end = skip_value(b, pos)?;
            let name: String = serde_json::from_str(&src[key_start..key_end]).ok()?;
            pos = ws(b, key_end);
            pos = ws(b, pos + 1); // the ':'
            if name == key {
                found = Some((key_start, pos));
                break;
            }
            pos = ws(b, skip_value(b, pos)?);
            if b.get(pos) == Some(&b',') {
                pos += 1;
            }
        }
        let Some((key_start, value_start)) = found else {
            break;
        };
        pos = value_start;
        let is_object = b.get(pos) == Some(&b'{');
        line = Some(line_of(src, if is_object { key_start } else { pos }));
        if let (Some(i), Some(b'[')) = (index, b.get(pos)) {
            pos += 1;
            for _ in 0..i {
                pos = ws(b, skip_value(b, ws(b, pos))?);
                pos += 1; // the ','
            }
            pos = ws(b, pos);
            line = Some(line_of(src, pos));
        }
    }
    line
}

fn ws(b: &[u8], mut pos: usize) -> usize {
    while b.get(pos).is_some_and(|c| c.is_ascii_whitespace()) {
        pos += 1;
    }
    pos
}

/// The end of the JSON value starting at `pos` (strings honour escapes;
/// containers nest; scalars run to the next delimiter).
fn skip_value(b: &[u8], pos: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = pos;
    loop {
        match *b.get(i)? {
            b'"' => {
                i += 1;
                while *b.get(i)? != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'{' | b'[' => {
                depth += 1;
                i += 1;
            }
            b'}' | b']' if depth > 0 => {
                depth -= 1;
                i += 1;
            }
            b'}' | b']' | b',' if depth == 0 => return Some(i),
            c if depth == 0 && c.is_ascii_whitespace() => return Some(i),
            _ => i += 1,
        }
        if depth == 0 && (b.get(pos) == Some(&b'"') || matches!(b.get(i - 1), Some(b'}' | b']'))) {
            return Some(i);
        }
    }
}
